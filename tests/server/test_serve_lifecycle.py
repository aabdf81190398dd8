"""A second, small server: settings from YAML + env + flags, 429 when the queue is full, SIGTERM drain.

It runs at most 2 requests and lets 1 wait, so a handful of streams fill it.
Its settings come from all three layers, each overriding the one below.
"""

from __future__ import annotations

import signal
import threading

import httpx
import pytest

from server_helpers import ServerProcess, chat_body, metric_value, server_idle, sse_events, wait_until

CHAT = "/v1/chat/completions"
ENDLESS = chat_body(content="Tell me a very long story.", max_tokens=900, ignore_eos=True, stream=True)
GRACE = 4.0


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small-server")
    config = tmp / "serve.yaml"
    config.write_text(
        "served-model-name: tiny-smol\n"
        "max_num_seqs: 8            # overridden by DSPARK_MAX_NUM_SEQS\n"
        "shutdown-grace-period: 60  # overridden by the flag\n"
        "max-model-len: 1024\n"
        "kv-cache-memory: 64MiB\n"
    )
    srv = ServerProcess(
        ["--config", str(config), "--shutdown-grace-period", str(GRACE)], tmp / "server.log",
        env={"DSPARK_MAX_NUM_SEQS": "2", "DSPARK_MAX_WAITING": "1"},
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _metrics(srv) -> str:
    return httpx.get(f"{srv.url}/metrics").text


def _idle(srv) -> bool:
    with httpx.Client(base_url=srv.url) as c:
        return server_idle(c)


class StreamReader(threading.Thread):
    """Reads one SSE stream in the background, until its end or until `close()`."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.lines: list[str] = []
        self.status: int | None = None
        self._closing = threading.Event()
        self.start()

    def run(self) -> None:
        with httpx.stream("POST", f"{self.url}{CHAT}", json=self.body, timeout=60) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                self.lines.append(line)
                if self._closing.is_set():
                    break  # leaving the `with` drops the connection: the server aborts the request

    def close(self) -> None:
        self._closing.set()
        self.join(30)

    def content_chunks(self) -> int:
        return sum(1 for line in self.lines if '"content"' in line and '"role"' not in line)

    def events(self) -> list:
        return sse_events(self.lines)


def test_settings_layers_apply(small_server):
    """YAML gave the model name; the flag beat YAML on the grace period; env beat YAML on max-num-seqs."""
    models = httpx.get(f"{small_server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-smol"]
    assert models["data"][0]["max_model_len"] == 1024
    r = httpx.post(f"{small_server.url}{CHAT}", json={**chat_body(max_tokens=2), "model": "tiny-smol"})
    assert r.status_code == 200 and r.json()["model"] == "tiny-smol"
    assert "'shutdown_grace_period': 4.0" in small_server.log_text()
    assert "'max_num_seqs': 2" in small_server.log_text()


def test_full_queue_answers_429_with_retry_after(small_server):
    url = small_server.url
    running = []
    for k in (1, 2):
        # One at a time: the engine counts a request not yet scheduled as waiting, even with free
        # slots, so two arriving together at an idle server with --max-waiting 1 would get a 429.
        running.append(StreamReader(url, ENDLESS))
        wait_until(lambda: metric_value(_metrics(small_server), "dspark_num_requests_running") == k, 30,
                   what=f"{k} running request(s)")
    queued = StreamReader(url, ENDLESS)
    wait_until(lambda: metric_value(_metrics(small_server), "dspark_num_requests_waiting") == 1, 30,
               what="1 waiting request")
    try:
        for body in (chat_body(max_tokens=4), ENDLESS):
            r = httpx.post(f"{url}{CHAT}", json=body, timeout=30)
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
        assert metric_value(_metrics(small_server), "dspark_request_errors_total", {"code": "429"}) == 2
        # Nothing of the refused requests is left behind.
        assert metric_value(_metrics(small_server), "dspark_num_requests_waiting") == 1
        assert metric_value(_metrics(small_server), "dspark_num_requests_running") == 2
    finally:
        for s in running + [queued]:
            s.close()
    assert all(s.status == 200 for s in running + [queued])
    wait_until(lambda: _idle(small_server), 10, what="no request left, KV blocks back to 0")


def test_sigterm_drains_then_exits(small_server):
    url = small_server.url
    wait_until(lambda: _idle(small_server), 10, what="an idle server")
    long = StreamReader(url, ENDLESS)
    wait_until(lambda: long.content_chunks() > 0, 30, what="the long stream to start")
    short = StreamReader(url, chat_body(max_tokens=16, ignore_eos=True, stream=True))
    wait_until(lambda: short.content_chunks() > 0, 30, what="the short stream to start")
    small_server.proc.send_signal(signal.SIGTERM)

    wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, 5, what="/health to report draining")
    r = httpx.post(f"{url}{CHAT}", json=chat_body(max_tokens=2))
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "shutting_down"

    # A request that ends within the grace period ends normally...
    short.join(GRACE + 10)
    events = short.events()
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    # ...one still running after it gets an error event; then the process exits with status 0.
    long.join(GRACE + 20)
    events = long.events()
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "shutting_down"
    assert small_server.proc.wait(GRACE + 20) == 0
    assert "grace period over: aborting 1 request" in small_server.log_text()
