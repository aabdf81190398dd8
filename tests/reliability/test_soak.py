"""Soak: a real server on 127.0.0.1 under mixed traffic, disconnects, malformed bodies and bursts.

`make test` runs the short version (80 requests); `make soak` the long one
(DSPARK_SOAK_REQUESTS=2000), which also writes its figures into docs/reliability.md
(DSPARK_SOAK_REPORT). The server runs at most 4 requests and lets 8 wait, so bursts of
up to 16 concurrent requests overflow it and some answers are clean 429s.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from dspark_testing import serving, wait_until


NUM_REQUESTS = int(os.environ.get("DSPARK_SOAK_REQUESTS", "80"))
REPORT = os.environ.get("DSPARK_SOAK_REPORT")  # a markdown file whose soak section is rewritten
SEED = int(os.environ.get("DSPARK_SOAK_SEED", "0"))
MAX_NUM_SEQS, MAX_WAITING = 4, 8
RSS_GROWTH_LIMIT_MIB = 256

# About 0.5 s a request on 2 cores; the long run needs more than the suite's 900 s.
pytestmark = [pytest.mark.soak, pytest.mark.timeout(max(900, 2 * NUM_REQUESTS))]

TOPICS = ["the sea", "a forest", "prime numbers", "coffee", "the moon", "bicycles", "volcanoes", "chess",
          "rain", "bread", "the Roman empire", "honey bees", "a lighthouse", "jazz", "glaciers"]
MALFORMED = [  # (path, raw body): each must be a 400 in the OpenAI error shape
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", b"[]"),
    ("/v1/chat/completions", b'{"messages": "hello"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": 100}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}'),
    ("/v1/completions", b'{"prompt": {"text": 1}}'),
    ("/v1/completions", b'{"prompt": "hi", "top_p": 7}'),
    ("/v1/completions", b"\xff\xfe\x00garbage"),
]


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    rejected_429: int = 0
    rejected_503: int = 0
    server_errors: int = 0
    malformed: int = 0
    malformed_400: int = 0
    disconnects: int = 0
    pairs_compared: int = 0
    pairs_equal: int = 0
    streamed: int = 0
    completion_tokens: int = 0
    problems: list = field(default_factory=list)


def _prompt(rng: random.Random) -> str:
    topic = rng.choice(TOPICS)
    size = rng.random()
    if size < 0.6:
        return f"Tell me about {topic}."
    if size < 0.9:
        return f"Write a short paragraph about {topic}, then list three facts about it."
    # a long prompt (a few hundred tokens)
    return "Summarise the following notes.\n" + " ".join(f"Note {i}: {topic} is interesting." for i in range(40))


def _body(rng: random.Random) -> tuple[str, dict]:
    chat = rng.random() < 0.8
    body: dict = {"max_tokens": rng.choice([1, 2, 4, 8, 16, 24, 32, 48])}
    if rng.random() < 0.4:
        body["temperature"] = 0
    else:
        body["temperature"] = round(rng.uniform(0.3, 1.2), 2)
        if rng.random() < 0.7:
            body["seed"] = rng.randrange(1 << 30)
        if rng.random() < 0.3:
            body["top_p"] = round(rng.uniform(0.5, 1.0), 2)
    if rng.random() < 0.1:
        body["n"] = 2
    if rng.random() < 0.15:
        body["stop"] = rng.choice([["."], ["\n"], [" the", "!"]])
    if rng.random() < 0.1:
        body["logprobs"] = True if chat else 2
        if chat:
            body["top_logprobs"] = 2
    if chat:
        body["messages"] = [{"role": "user", "content": _prompt(rng)}]
        return "/v1/chat/completions", body
    body["prompt"] = _prompt(rng)
    return "/v1/completions", body


def _is_openai_error(payload) -> bool:
    err = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)


def _texts(path: str, payload: dict) -> list[str]:
    key = "message" if path.endswith("chat/completions") else None
    return [c["message"]["content"] if key else c["text"] for c in sorted(payload["choices"], key=lambda c: c["index"])]


class Soak:
    def __init__(self, url: str, n: int, seed: int):
        self.url = url
        self.n = n
        self.rng = random.Random(seed)
        self.t = Tally()
        self.statuses: dict[int, int] = {}

    def _status(self, code: int, what: str, detail: str = "") -> bool:
        """Count an answer; True when it is a 200."""
        self.statuses[code] = self.statuses.get(code, 0) + 1
        if code == 200:
            return True
        if code == 429:
            self.t.rejected_429 += 1
        elif code == 503:
            self.t.rejected_503 += 1
        elif code >= 500:
            self.t.server_errors += 1
            self.t.problems.append(f"{what}: {code} {detail[:200]}")
        else:
            self.t.problems.append(f"{what}: unexpected {code} {detail[:200]}")
        return False

    async def plain(self, client: httpx.AsyncClient, path: str, body: dict) -> list[str] | None:
        self.t.sent += 1
        r = await client.post(path, json=body)
        if not self._status(r.status_code, f"POST {path}", r.text):
            if not _is_openai_error(r.json()):
                self.t.problems.append(f"not an OpenAI error: {r.text[:200]}")
            return None
        payload = r.json()
        if any(c["finish_reason"] not in ("stop", "length") for c in payload["choices"]):
            self.t.problems.append(f"bad finish: {payload['choices']}")
        self.t.ok += 1
        self.t.completion_tokens += payload["usage"]["completion_tokens"]
        return _texts(path, payload)

    async def stream(self, client: httpx.AsyncClient, path: str, body: dict, cut_after: int | None = None):
        """Stream; with cut_after, leave after that many events (a client disconnect)."""
        self.t.sent += 1
        n = body.get("n", 1)
        texts = [""] * n
        finishes: list = [None] * n
        events = 0
        req = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", path, json=req) as r:
            if r.status_code != 200:
                raw = await r.aread()
                self._status(r.status_code, f"stream {path}", raw.decode(errors="replace"))
                if not _is_openai_error(json.loads(raw)):
                    self.t.problems.append(f"not an OpenAI error: {raw[:200]!r}")
                return None
            self._status(200, "")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if cut_after is not None and events >= cut_after:
                    self.t.disconnects += 1
                    return None  # leaving the context manager drops the connection
                events += 1
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    self._status(500, f"stream error event {path}", data)
                    return None
                for c in obj["choices"]:
                    i = c["index"]
                    texts[i] += c["delta"].get("content") or "" if "delta" in c else c.get("text") or ""
                    finishes[i] = c.get("finish_reason") or finishes[i]
                if obj.get("usage"):
                    self.t.completion_tokens += obj["usage"]["completion_tokens"]
        if any(f not in ("stop", "length") for f in finishes):
            self.t.problems.append(f"stream without finish_reason: {finishes}")
        self.t.ok += 1
        self.t.streamed += 1
        return texts

    async def one(self, client: httpx.AsyncClient, kind: str, rng: random.Random) -> None:
        await asyncio.sleep(rng.uniform(0, 0.2))
        if kind == "malformed":
            path, raw = rng.choice(MALFORMED)
            self.t.sent += 1
            self.t.malformed += 1
            r = await client.post(path, content=raw, headers={"Content-Type": "application/json"})
            if r.status_code == 400 and _is_openai_error(r.json()):
                self.t.malformed_400 += 1
            else:
                self._status(r.status_code, f"malformed {raw[:40]!r}", r.text)
            return
        path, body = _body(rng)
        if kind == "disconnect":
            if rng.random() < 0.6:
                await self.stream(client, path, {**body, "max_tokens": 48, "ignore_eos": True},
                                  cut_after=rng.randrange(0, 4))
            else:
                self.t.sent += 1
                try:
                    r = await asyncio.wait_for(client.post(path, json={**body, "max_tokens": 48, "ignore_eos": True}),
                                               timeout=rng.uniform(0.05, 1.0))
                    self._status(r.status_code, f"POST {path}", r.text)  # answered before the client left
                except asyncio.TimeoutError:
                    self.t.disconnects += 1
            return
        if kind == "pair":  # the same seeded (or greedy) request, non-streamed then streamed
            body.pop("logprobs", None), body.pop("top_logprobs", None)
            if body.get("temperature", 0) > 0:
                body["seed"] = rng.randrange(1 << 30)
            a = await self.plain(client, path, body)
            b = await self.stream(client, path, body)
            if a is not None and b is not None:
                self.t.pairs_compared += 1
                if a == b:
                    self.t.pairs_equal += 1
                else:
                    self.t.problems.append(f"stream != non-stream for {body}: {a!r} vs {b!r}")
            return
        if rng.random() < 0.5:
            await self.stream(client, path, body)
        else:
            await self.plain(client, path, body)

    async def run(self) -> None:
        kinds = []
        while len(kinds) < self.n:
            x = self.rng.random()
            kind = "malformed" if x < 0.05 else "disconnect" if x < 0.15 else "pair" if x < 0.25 else "normal"
            kinds.append(kind)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        async with httpx.AsyncClient(base_url=self.url, timeout=300, limits=limits) as client:
            i = 0
            while i < len(kinds):
                # Bursts: mostly within the server's capacity, sometimes well above it.
                size = self.rng.choice([1, 2, 4, 6, 8, 12, 16])
                wave = kinds[i:i + size]
                i += size
                await asyncio.gather(*(self.one(client, k, random.Random(self.rng.random())) for k in wave))


def _metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in fam.samples:
            key = s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else "")
            out[key] = s.value
    return out


def _idle(url: str) -> bool:
    m = _metrics(url)
    return all(m.get(k, 0) == 0 for k in ("dspark_num_requests_running", "dspark_num_requests_waiting",
                                           "dspark_kv_cache_used_blocks", "dspark_server_requests_in_flight"))


def _server_5xx(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("dspark_request_errors_total") and '"code": "5' in k)


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory):
    with serving(["--max-model-len", "1024", "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting", str(MAX_WAITING),
                  "--kv-cache-memory", "24MiB", "--request-timeout", "600", "--num-threads", "2"],
                 tmp_path_factory.mktemp("soak") / "server.log") as srv:
        yield srv


def test_soak(soak_server):
    url = soak_server.url
    proc = psutil.Process(soak_server.proc.pid)
    # Warm-up (allocator pools, first-use caches), then the baselines.
    warm = Soak(url, 24, SEED + 1)
    asyncio.run(warm.run())
    wait_until(lambda: _idle(url), 60, what="idle after warm-up")
    rss0 = proc.memory_info().rss
    tasks0 = _metrics(url)["dspark_server_asyncio_tasks"]
    before = _metrics(url)

    soak = Soak(url, NUM_REQUESTS, SEED)
    t0 = time.monotonic()
    asyncio.run(soak.run())
    elapsed = time.monotonic() - t0
    wait_until(lambda: _idle(url), 60, what="KV blocks, running, waiting and in-flight requests back to 0")
    after = _metrics(url)
    rss1 = proc.memory_info().rss
    tasks1 = after["dspark_server_asyncio_tasks"]
    t = soak.t
    growth_mib = (rss1 - rss0) / 2**20
    server_5xx = _server_5xx(after) - _server_5xx(before)
    figures = {
        "requests": t.sent, "completed_200": t.ok, "streamed": t.streamed, "disconnects": t.disconnects,
        "malformed": t.malformed, "malformed_answered_400": t.malformed_400,
        "rejected_429": t.rejected_429, "rejected_503": t.rejected_503,
        "client_5xx": t.server_errors, "server_5xx": server_5xx,
        "stream_vs_plain_pairs": t.pairs_compared, "pairs_identical": t.pairs_equal,
        "completion_tokens": t.completion_tokens,
        "kv_used_blocks_after": after["dspark_kv_cache_used_blocks"],
        "requests_running_after": after["dspark_num_requests_running"],
        "in_flight_after": after["dspark_server_requests_in_flight"],
        "asyncio_tasks_idle_before": tasks0, "asyncio_tasks_idle_after": tasks1,
        "rss_mib_before": round(rss0 / 2**20, 1), "rss_mib_after": round(rss1 / 2**20, 1),
        "rss_growth_mib": round(growth_mib, 1),
        "aborted_in_engine": after.get('dspark_request_success_total{"finish_reason": "abort"}', 0)
        - before.get('dspark_request_success_total{"finish_reason": "abort"}', 0),
        "preemptions": after.get("dspark_engine_preemptions_total", 0) - before.get("dspark_engine_preemptions_total", 0),
        "wall_s": round(elapsed, 1), "seed": SEED, "planned": NUM_REQUESTS, "statuses": dict(sorted(soak.statuses.items())),
    }
    print(json.dumps(figures))
    if REPORT:
        write_report(Path(REPORT), figures)
    assert not t.problems, t.problems[:10]
    assert t.server_errors == 0 and server_5xx == 0
    assert t.malformed_400 == t.malformed
    assert t.pairs_compared > 0 and t.pairs_equal == t.pairs_compared
    assert t.ok > NUM_REQUESTS // 2
    assert tasks1 <= tasks0 + 2, f"asyncio tasks {tasks0} -> {tasks1}: leaked tasks"
    assert growth_mib < RSS_GROWTH_LIMIT_MIB, f"resident memory grew {growth_mib:.0f} MiB"


def write_report(path: Path, f: dict) -> None:
    """Rewrite the section between the soak markers of `path` with these figures."""
    rows = [
        ("Requests sent (incl. malformed, disconnects)", f["requests"]),
        ("Completed with 200", f["completed_200"]),
        ("... of which streamed", f["streamed"]),
        ("Client disconnects mid-request", f["disconnects"]),
        ("Malformed bodies / answered 400 in the OpenAI shape", f"{f['malformed']} / {f['malformed_answered_400']}"),
        ("Refused 429 (queue full, bursts above capacity) / 503", f"{f['rejected_429']} / {f['rejected_503']}"),
        ("5xx seen by clients / counted by the server", f"{f['client_5xx']} / {f['server_5xx']}"),
        ("Stream vs non-stream pairs identical", f"{f['pairs_identical']} / {f['stream_vs_plain_pairs']}"),
        ("Engine requests aborted (disconnects)", int(f["aborted_in_engine"])),
        ("Preemptions (KV pressure)", int(f["preemptions"])),
        ("KV blocks used / running / in flight after", f"{int(f['kv_used_blocks_after'])} / "
                                                        f"{int(f['requests_running_after'])} / {int(f['in_flight_after'])}"),
        ("asyncio tasks when idle, before / after", f"{int(f['asyncio_tasks_idle_before'])} / "
                                                    f"{int(f['asyncio_tasks_idle_after'])}"),
        ("Server RSS before / after (MiB)", f"{f['rss_mib_before']} / {f['rss_mib_after']} "
                                            f"(growth {f['rss_growth_mib']})"),
        ("Completion tokens generated", f["completion_tokens"]),
        ("Wall time (s)", f["wall_s"]),
    ]
    table = "\n".join(["| Figure | Value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = (f"<!-- soak:begin -->\nLast soak: {stamp}, `make soak` (DSPARK_SOAK_REQUESTS={f['planned']}, "
               f"seed {f['seed']}), written by tests/reliability/test_soak.py.\n\n{table}\n\n"
               f"HTTP statuses: `{json.dumps(f['statuses'])}`\n<!-- soak:end -->")
    text = path.read_text() if path.exists() else ""
    if "<!-- soak:begin -->" in text:
        text = re.sub(r"<!-- soak:begin -->.*?<!-- soak:end -->", lambda _m: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
