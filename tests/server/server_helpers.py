"""Helpers shared by the server tests: a server subprocess, SSE parsing, metric reading."""

from __future__ import annotations

import json

import httpx

from dspark_testing import REPO, STARTUP_TIMEOUT, ServerProcess, free_port, wait_until  # noqa: F401

API_KEY = "test-key"


def chat_body(content: str = "What is the capital of France?", **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 16, **kw}


def sse_events(lines) -> list:
    """Parse SSE `data:` lines into JSON objects; the final `[DONE]` is kept as the string."""
    events = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream_events(client: httpx.Client, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample's value from Prometheus text (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and (labels is None or all(s.labels.get(k) == v for k, v in labels.items())):
                return s.value
    return 0.0


def kv_used_blocks(client: httpx.Client) -> float:
    return metric_value(client.get("/metrics").text, "dspark_kv_cache_used_blocks")


def server_idle(client: httpx.Client) -> bool:
    """Nothing running or waiting, no KV block in use (a waiting request holds no blocks)."""
    text = client.get("/metrics").text
    return all(metric_value(text, name) == 0 for name in (
        "dspark_num_requests_running", "dspark_num_requests_waiting", "dspark_kv_cache_used_blocks"))
