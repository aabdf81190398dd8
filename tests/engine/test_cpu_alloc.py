"""glibc malloc tuning: applied once, and off with DSPARK_MALLOC_TUNING=0."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = "from dspark_serve.engine.cpu_alloc import keep_freed_memory as k; print(k(), k())"


def _run(env_value: str | None) -> str:
    import os

    env = dict(os.environ)
    env.pop("DSPARK_MALLOC_TUNING", None)
    if env_value is not None:
        env["DSPARK_MALLOC_TUNING"] = env_value
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_applied_once_on_linux():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert _run(None) == ["True", "True"]


def test_disabled_by_environment():
    assert _run("0") == ["False", "False"]
