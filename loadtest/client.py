"""One OpenAI-compatible request, timed from the client's side (httpx async, SSE streaming).

Timing: `start` is taken just before the request is sent; every SSE `data:`
line is stamped when httpx hands it over. The first chunk carrying text
(content for chat, text for completions) gives TTFT; the gaps between
text-carrying chunks are the inter-token latencies (with speculative decoding
one chunk may carry several tokens, so these are per-chunk gaps); the last
line of the stream ends the request (e2e).
"""

from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import httpx

from .workloads import RequestSpec


@dataclass
class RequestResult:
    index: int
    ok: bool
    status: int | None  # HTTP status; an error sent inside a 200 stream keeps its own code when it has one
    error: str | None = None
    start: float = 0.0  # seconds since the run started
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    usage_reported: bool = False  # output_tokens from the `usage` chunk (else: counted text chunks)
    chunks: int = 0  # text-carrying chunks
    max_tokens: int | None = None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (n - 1)."""
        if not self.ok or self.output_tokens < 2 or self.ttft is None or self.e2e is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def tokens_per_s_per_user(self) -> float | None:
        """Decode speed this user saw after the first token: 1 / TPOT (None for fewer than 2 tokens)."""
        t = self.tpot
        return 1.0 / t if t else None

    def to_dict(self, with_itl: bool = False) -> dict:
        d = asdict(self)
        if not with_itl:
            d.pop("itl")
        d["tpot"] = self.tpot
        d["tokens_per_s_per_user"] = self.tokens_per_s_per_user
        return d


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(url: str, allow_remote: bool) -> None:
    """Load goes to this machine only, unless the user says otherwise with --allow-remote."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise SystemExit(f"base URL {url!r}: expected http://host:port")
    if not allow_remote and not is_loopback_url(url):
        raise SystemExit(f"refusing to send load to {url}: not a loopback address (127.0.0.0/8, ::1, localhost). "
                         "Pass --allow-remote to load a remote server you are allowed to load.")


def build_payload(spec: RequestSpec, endpoint: str, model: str, stream: bool, temperature: float,
                  include_usage: bool, ignore_eos: bool, extra: dict | None) -> dict:
    if endpoint == "chat":
        payload: dict = {"model": model, "messages": spec.messages or [{"role": "user", "content": spec.prompt}]}
    else:
        text = "\n\n".join(m["content"] for m in spec.messages) if spec.messages else spec.prompt
        payload = {"model": model, "prompt": text}
    payload.update(max_tokens=spec.max_tokens, temperature=temperature, stream=stream)
    if stream and include_usage:
        payload["stream_options"] = {"include_usage": True}
    if ignore_eos:
        payload["ignore_eos"] = True  # vLLM's extension; servers that validate strictly reject it
    payload.update(extra or {})
    return payload


ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def _text_of(choice: dict, endpoint: str) -> str:
    if endpoint == "chat":
        delta = choice.get("delta") or choice.get("message") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


def _error_message(body: bytes | str) -> str:
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        err = json.loads(text)
        if isinstance(err, dict):
            e = err.get("error", err)
            return str(e.get("message", e) if isinstance(e, dict) else e)[:300]
    except ValueError:
        pass
    return text[:300]


def _stream_error_status(err) -> int | None:
    code = err.get("code") if isinstance(err, dict) else None
    try:
        return int(code)
    except (TypeError, ValueError):
        return None


async def send_request(client: httpx.AsyncClient, index: int, spec: RequestSpec, payload: dict, endpoint: str,
                       t0: float) -> RequestResult:
    """Send one request; never raises (except cancellation): failures come back as ok=False results."""
    path = ENDPOINT_PATHS[endpoint]
    start = time.perf_counter()
    res = RequestResult(index=index, ok=False, status=None, start=start - t0, max_tokens=spec.max_tokens)
    try:
        if not payload.get("stream"):
            r = await client.post(path, json=payload)
            end = time.perf_counter()
            res.status = r.status_code
            if r.status_code != 200:
                res.error = _error_message(r.content)
                return res
            body = r.json()
            usage = body.get("usage") or {}
            text = "".join(_text_of(c, endpoint) for c in body.get("choices") or [])
            res.output_tokens = int(usage.get("completion_tokens") or 0)
            res.usage_reported = bool(usage)
            res.prompt_tokens = usage.get("prompt_tokens")
            res.chunks = 1 if text else 0
            res.ttft = res.e2e = end - start  # without streaming the first token arrives with the last
            res.ok = True
            return res

        async with client.stream("POST", path, json=payload) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = _error_message(await r.aread())
                return res
            last_text_at = None
            end = None
            async for line in r.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, `: ping` comments, `event:` lines
                data = line[5:].strip()
                end = now
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    res.error = f"malformed SSE data: {data[:100]!r}"
                    return res
                if event.get("error"):
                    res.error = _error_message(json.dumps(event))
                    res.status = _stream_error_status(event["error"]) or res.status
                    return res
                if any(_text_of(c, endpoint) for c in event.get("choices") or []):
                    if last_text_at is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last_text_at)
                    last_text_at = now
                    res.chunks += 1
                usage = event.get("usage")
                if usage:
                    res.usage_reported = True
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    res.prompt_tokens = usage.get("prompt_tokens")
            if end is None:
                res.error = "empty stream"
                return res
            res.e2e = end - start
            if not res.usage_reported:
                res.output_tokens = res.chunks  # exact for servers that send one token per chunk
            if res.ttft is None:  # no text at all (e.g. an immediate stop): first token = the end
                res.ttft = res.e2e
            res.ok = True
            return res
    except Exception as e:  # transport errors (httpx.ConnectError, ReadTimeout...) or a malformed answer
        res.error = f"{type(e).__name__}: {e}"[:300]
        return res


async def get_json(client: httpx.AsyncClient, path: str) -> dict | None:
    try:
        r = await client.get(path, timeout=10)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


async def get_text(client: httpx.AsyncClient, path: str) -> str | None:
    try:
        r = await client.get(path, timeout=10)
        return r.text if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


async def discover_model(client: httpx.AsyncClient) -> str | None:
    models = await get_json(client, "/v1/models")
    try:
        return models["data"][0]["id"]
    except (TypeError, KeyError, IndexError):
        return None
