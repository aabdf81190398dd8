"""Streams under stress: clients that leave early, and many streams at once."""

from __future__ import annotations

import asyncio
import threading

import httpx

from server_helpers import (chat_body, kv_used_blocks, metric_value, server_idle, sse_events, stream_events,
                            wait_until)

CHAT = "/v1/chat/completions"
# Long enough that only an abort can free the blocks within the test's patience.
ENDLESS = dict(content="Tell me a very long story.", max_tokens=1500, ignore_eos=True)


def _aborts(client) -> float:
    return metric_value(client.get("/metrics").text, "dspark_request_success_total", {"finish_reason": "abort"})


def test_closing_a_stream_aborts_the_request_and_frees_its_blocks(client):
    wait_until(lambda: server_idle(client), 30, what="an idle server")
    aborts = _aborts(client)
    with client.stream("POST", CHAT, json=chat_body(stream=True, **ENDLESS)) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(5):  # role chunk and a few tokens: the request is running
            next(line for line in lines if line.startswith("data: "))
        assert kv_used_blocks(client) > 0
    # Leaving the `with` closes the connection mid-stream.
    wait_until(lambda: kv_used_blocks(client) == 0, 10, what="KV blocks back to 0")
    assert _aborts(client) == aborts + 1
    wait_until(lambda: server_idle(client), 10, what="an idle server")


def test_a_client_leaving_a_non_streamed_request_aborts_it(server, client):
    wait_until(lambda: server_idle(client), 30, what="an idle server")
    aborts = _aborts(client)
    with httpx.Client(base_url=server.url, headers=client.headers, timeout=1.0) as impatient:
        try:
            impatient.post(CHAT, json=chat_body(**ENDLESS))
            raise AssertionError("the request should have outlived the client's timeout")
        except httpx.ReadTimeout:
            pass
    wait_until(lambda: kv_used_blocks(client) == 0, 10, what="KV blocks back to 0")
    assert _aborts(client) == aborts + 1


def test_other_streams_are_unaffected_by_clients_leaving(client):
    """While clients open streams and leave, a concurrent stream still completes in full."""
    result = {}

    def good():
        result["events"] = stream_events(client, CHAT, chat_body(
            content="Name some colours.", max_tokens=24, ignore_eos=True, stream_options={"include_usage": True}))

    t = threading.Thread(target=good)
    t.start()
    while t.is_alive():
        with client.stream("POST", CHAT, json=chat_body(stream=True, **ENDLESS)) as r:
            next(line for line in r.iter_lines() if '"content"' in line and '"role"' not in line)
    t.join(60)
    events = result["events"]
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 24
    wait_until(lambda: server_idle(client), 10, what="an idle server")


def test_32_concurrent_streams_all_complete(server, client):
    async def one(c: httpx.AsyncClient, i: int) -> tuple[str, dict]:
        body = chat_body(content=f"Give me a fun fact about the number {i}.", max_tokens=16, seed=i,
                         stream=True, stream_options={"include_usage": True})
        async with c.stream("POST", CHAT, json=body) as r:
            assert r.status_code == 200
            events = sse_events([line async for line in r.aiter_lines()])
        assert events[-1] == "[DONE]"
        text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in events[:-1] if ch["choices"])
        return text, events[-2]["usage"]

    async def all_streams():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, headers=client.headers, timeout=120, limits=limits) as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(32))), 180)

    results = asyncio.run(all_streams())
    assert len(results) == 32
    for text, usage in results:
        assert 1 <= usage["completion_tokens"] <= 16
    assert sum(1 for text, _ in results if text) >= 30  # an immediate EOS is possible, not common
    wait_until(lambda: server_idle(client), 10, what="an idle server")
