"""Start a server under test on a free loopback port, wait until it answers, stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from .peers import ServerSpec

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, spec: ServerSpec, log_path: Path):
        self.spec = spec
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.argv = spec.command(self.port)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSPARK_")}  # only what the config says
        if "DSPARK_CPU_DTYPE" in os.environ:  # the peers' default dtype follows it too (peers.default_dtype)
            env["DSPARK_CPU_DTYPE"] = os.environ["DSPARK_CPU_DTYPE"]
        env.update({"PYTHONUNBUFFERED": "1", **spec.env})
        # Its own process group, so stop() reaches the workers a server may fork (and nothing else).
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        """Seconds until `health_path` answered 200; raises if the process dies or the time runs out."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name}: server exited with {self.proc.returncode}; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.spec.health_path, timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.spec.name}: not ready after {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM (our server drains, nothing is in flight by then), SIGKILL after `grace` seconds."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
