"""A real `dspark serve`: every metric the dashboard, the alerts and the HPA read is exposed by /metrics,
and the image's HEALTHCHECK command passes against it.

Where the machine allows it (root, `unshare`), the server runs as in the chart's pod: read-only
root filesystem, writable emptyDirs only at /tmp, DSPARK_CACHE_DIR and ~/.cache.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest

from deploy_testing import (DEPLOY, ServerProcess, alert_exprs, as_promql, dashboard_exprs, hpa_metric_names,
                            metric_names, read_only_sandbox_available, resolve_series)

SERVER_ARGS = ["--num-threads", "1", "--max-model-len", "1024", "--kv-cache-memory", "128MiB",
               "--shutdown-grace-period", "2"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(SERVER_ARGS, tmp_path_factory.mktemp("deploy-server") / "server.log",
                        read_only_pod=read_only_sandbox_available())
    try:
        # the sandboxed pod starts with an empty cache (an emptyDir, as in the chart), so it builds the
        # CPU kernels from source before it is ready: over a minute on one busy core
        srv.wait_ready(300)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def exposition(server) -> str:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        # One tiny chat so the histograms and the success counter have samples.
        r = client.post("/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        # One error, so the error counter has a `code` series too.
        assert client.get("/v1/models/no-such-model").status_code == 404
        return client.get("/metrics").text


@pytest.fixture(scope="module")
def families(exposition) -> dict[str, dict]:
    """name -> {"type": ..., "labels": label names seen on its samples}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(exposition):
        labels = set()
        for sample in family.samples:
            labels |= set(sample.labels)
        out[family.name] = {"type": family.type, "labels": labels - {"le", "quantile"}}
    return out


def referenced() -> dict[str, list[str]]:
    """Series name -> where it is used (dashboard, alerts, HPA)."""
    out: dict[str, list[str]] = {}
    for source, exprs in (("dashboard", dashboard_exprs()), ("alerts", alert_exprs())):
        for expr in exprs:
            for name in metric_names(expr):
                out.setdefault(name, []).append(source)
    for name in hpa_metric_names():
        out.setdefault(name, []).append("hpa")
    return out


def test_every_referenced_series_is_exposed(families, exposition):
    types = {name: f["type"] for name, f in families.items()}
    refs = referenced()
    assert len(refs) >= 20 and "dspark_num_requests_waiting" in refs
    missing = {name: where for name, where in refs.items() if resolve_series(name, types) is None}
    assert not missing, f"not exposed by /metrics (or wrong suffix for the type): {missing}"
    # Histogram series names appear verbatim in the exposition once there are samples.
    for name in refs:
        if name.endswith(("_bucket", "_sum", "_count")) and "spec_decode" not in name:
            assert re.search(rf"^{name}[{{ ]", exposition, re.M), name


def test_label_matchers_name_real_labels(families):
    promql = pytest.importorskip("promql_parser", reason="pip install promql-parser")
    types = {name: f["type"] for name, f in families.items()}
    checked = 0
    for expr in dashboard_exprs() + alert_exprs():
        selectors = []
        promql.walk(promql.parse(as_promql(expr)),
                    lambda node: selectors.append(node) if isinstance(node, promql.VectorSelector) else None)
        for sel in selectors:
            family = families[resolve_series(sel.name, types)]
            for matcher in sel.matchers.matchers:
                if matcher.name in ("job", "instance", "__name__"):
                    continue  # added by Prometheus at scrape time
                assert matcher.name in family["labels"], f"{sel.name} has no label {matcher.name!r} ({expr})"
                checked += 1
    assert checked >= 3


def test_image_healthcheck_command_passes_against_the_server(server):
    """The Dockerfiles' HEALTHCHECK, run as written with DSPARK_PORT pointing at the test server."""
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        text = (DEPLOY / "docker" / dockerfile).read_text()
        command = json.loads(re.search(r"HEALTHCHECK .*?\\\n\s*CMD (\[.*\])", text).group(1))
        assert command[0] == "python"
        env = {**os.environ, "DSPARK_PORT": str(server.port)}
        proc = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        # ...and fails when nothing answers.
        env["DSPARK_PORT"] = "1"
        proc = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0


def test_server_runs_with_a_read_only_root_filesystem(server, exposition):
    """The chart sets readOnlyRootFilesystem: the server must need no writable path beyond its emptyDirs."""
    if not server.read_only_pod:
        pytest.skip("needs root and `unshare` (a private mount namespace) to make the filesystem read-only")
    assert server.proc.poll() is None, server.log_tail()
    assert "dspark_generation_tokens_total" in exposition  # it served the chat request above
