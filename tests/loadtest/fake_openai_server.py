"""A tiny OpenAI-compatible streaming server on 127.0.0.1 whose timing the test controls.

Plain asyncio (no web framework), HTTP/1.1 with keep-alive and chunked SSE.
Each request's behaviour comes from `key=value` words in its prompt, falling
back to the server's defaults:

    ttft=0.2    seconds before the first text chunk
    itl=0.05    seconds between text chunks
    n=5         text chunks
    tpc=1       tokens per chunk (usage.completion_tokens = n * tpc)
    usage=1     send the usage chunk when stream_options.include_usage asks for it
    status=200  any other status answers an OpenAI-style error at once
    streamerr=1 send an error event inside the stream after the first chunk

It counts requests, their arrival times and the most in flight at once, and
serves /health, /version, /v1/models and a /metrics whose speculative
counters grow by fixed amounts per finished request (see SPEC_PER_REQUEST).

Run standalone (for the sweep test): python fake_openai_server.py --port N
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

MODEL = "fake-model"
# Per finished request: 2 verification rounds verifying 2 tokens each, 3 accepted (2 at position 1, 1 at 2).
SPEC_PER_REQUEST = {"drafts": 2, "draft_tokens": 4, "accepted": 3, "pos": {1: 2, 2: 1}, "verify_len": {2: 2}}


class FakeOpenAI:
    def __init__(self, ttft: float = 0.01, itl: float = 0.005, n: int = 4, port: int = 0):
        self.defaults = {"ttft": ttft, "itl": itl, "n": n, "tpc": 1, "usage": 1, "status": 200, "streamerr": 0}
        self.port = port
        self.in_flight = 0
        self.max_in_flight = 0
        self.arrivals: list[float] = []
        self.bodies: list[dict] = []
        self.sends: list[list[float]] = []  # per request (arrival order): perf_counter() at each text chunk sent
        self.finished = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeOpenAI":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, v = h.decode().split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                await self._route(method, path, body, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _send(writer, status: int, body: bytes, content_type: str = "application/json") -> None:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode() + body)
        await writer.drain()

    async def _route(self, method: str, path: str, body: bytes, writer) -> None:
        if method == "GET":
            if path == "/health":
                return await self._send(writer, 200, b'{"status":"ok"}')
            if path == "/version":
                return await self._send(writer, 200, b'{"version":"fake-1.0","model":"fake-model"}')
            if path == "/v1/models":
                return await self._send(writer, 200, json.dumps({"object": "list", "data": [{"id": MODEL}]}).encode())
            if path == "/metrics":
                return await self._send(writer, 200, self.metrics_text().encode(), "text/plain")
            return await self._send(writer, 404, b'{"error":{"message":"not found"}}')
        req = json.loads(body)
        self.arrivals.append(time.perf_counter())
        self.bodies.append(req)
        prompt = req["messages"][0]["content"] if "messages" in req else req["prompt"]
        p = dict(self.defaults)
        for word in prompt.split():
            if "=" in word:
                k, v = word.split("=", 1)
                if k in p:
                    p[k] = float(v)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if p["status"] != 200:
                err = {"error": {"message": "fake error", "type": "fake", "code": int(p["status"])}}
                return await self._send(writer, int(p["status"]), json.dumps(err).encode())
            await self._stream(req, p, writer, chat="messages" in req)
        finally:
            self.in_flight -= 1

    async def _stream(self, req: dict, p: dict, writer, chat: bool) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")

        async def event(obj) -> None:
            data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()

        def choice(text: str) -> dict:
            c = {"delta": {"content": text}} if chat else {"text": text}
            return {"choices": [{"index": 0, **c}]}

        n, tpc = int(p["n"]), int(p["tpc"])
        sends: list[float] = []
        self.sends.append(sends)
        if chat:  # OpenAI's first chunk: the role, no text
            await event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for k in range(n):
            await asyncio.sleep(p["ttft"] if k == 0 else p["itl"])
            await event(choice(" tok" * tpc))
            sends.append(time.perf_counter())
            if p["streamerr"] and k == 0:
                await event({"error": {"message": "engine failed", "type": "server_error", "code": 500}})
                break
        else:
            if p["usage"] and (req.get("stream_options") or {}).get("include_usage"):
                await event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n * tpc,
                                                      "total_tokens": 7 + n * tpc}})
            self.finished += 1
        await event("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    def metrics_text(self) -> str:
        f, s = self.finished, SPEC_PER_REQUEST
        lines = []

        def counter(name: str, value: float, labels: str = "") -> None:
            lines.append(f"# TYPE {name} counter")
            lines.append(f"{name}_total{labels} {value}")

        counter("dspark_spec_decode_num_drafts", f * s["drafts"])
        counter("dspark_spec_decode_num_draft_tokens", f * s["draft_tokens"])
        counter("dspark_spec_decode_num_accepted_tokens", f * s["accepted"])
        lines.append("# TYPE dspark_spec_decode_num_accepted_tokens_per_pos counter")
        for pos, v in s["pos"].items():
            lines.append(f'dspark_spec_decode_num_accepted_tokens_per_pos_total{{position="{pos}"}} {f * v}')
        lines.append("# TYPE dspark_spec_decode_verify_length histogram")
        total = sum(s["verify_len"].values()) * f
        for le in range(0, 17):
            c = sum(v for length, v in s["verify_len"].items() if length <= le) * f
            lines.append(f'dspark_spec_decode_verify_length_bucket{{le="{float(le)}"}} {c}')
        lines.append(f'dspark_spec_decode_verify_length_bucket{{le="+Inf"}} {total}')
        lines.append(f"dspark_spec_decode_verify_length_count {total}")
        lines.append(f"dspark_spec_decode_verify_length_sum {sum(k * v for k, v in s['verify_len'].items()) * f}")
        counter("dspark_generation_tokens", f * 4)
        return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args()
    srv = FakeOpenAI(port=args.port, n=args.n).start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
