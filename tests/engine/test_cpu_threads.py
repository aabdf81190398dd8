"""Default torch threads: physical cores within the affinity mask and the cgroup CPU quota."""

from pathlib import Path

from dspark_serve.engine import cpu_threads


def _topology(root: Path, siblings: dict[int, str]) -> Path:
    for cpu, group in siblings.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(group + "\n")
    return root


def test_smt_siblings_count_once(tmp_path):
    sys_cpu = _topology(tmp_path / "cpu", {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    assert cpu_threads.physical_cores({0, 1, 2, 3}, sys_cpu) == 2
    assert cpu_threads.physical_cores({0, 2}, sys_cpu) == 1
    assert cpu_threads.physical_cores({0, 1}, tmp_path / "missing") == 2  # unreadable: the CPUs themselves


def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpu_threads.cgroup_cpu_limit(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_threads.cgroup_cpu_limit(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_threads.cgroup_cpu_limit(tmp_path / "v1") == 2.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_threads.cgroup_cpu_limit(tmp_path / "v1") is None
    assert cpu_threads.cgroup_cpu_limit(tmp_path / "none") is None


def test_default_is_the_smallest_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_threads, "_allowed_cpus", lambda: set(range(8)))
    sys_cpu = _topology(tmp_path / "cpu", {i: f"{i % 4},{i % 4 + 4}" for i in range(8)})  # 4 cores x 2 threads
    cg = tmp_path / "cg"
    cg.mkdir()
    assert cpu_threads.default_num_threads(cg, sys_cpu) == 4  # no quota: physical cores
    (cg / "cpu.max").write_text("250000 100000\n")
    assert cpu_threads.default_num_threads(cg, sys_cpu) == 3  # 2.5 CPUs of quota, rounded up
    (cg / "cpu.max").write_text("10000 100000\n")
    assert cpu_threads.default_num_threads(cg, sys_cpu) == 1


def test_this_machine_gets_at_least_one_thread():
    assert 1 <= cpu_threads.default_num_threads() <= (len(cpu_threads._allowed_cpus()) or 1)
