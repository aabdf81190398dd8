"""Open-loop (Poisson arrivals) and closed-loop (fixed concurrency) load over a list of requests.

A run always ends by itself: after `num_requests` requests, or at
`max_duration` seconds, whichever comes first. At the deadline no new request
starts and those still running are cancelled (counted as incomplete, not as
errors, and left out of the latency statistics).
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass, field

import httpx

from .client import RequestResult, build_payload, send_request
from .workloads import RequestSpec


@dataclass
class LoadConfig:
    base_url: str
    model: str
    endpoint: str = "chat"  # or "completions"
    stream: bool = True
    include_usage: bool = True
    temperature: float = 0.0
    ignore_eos: bool = False
    extra_body: dict | None = None
    concurrency: int | None = None  # closed loop
    request_rate: float | None = None  # open loop, requests/s (inf: all at once)
    max_concurrency: int | None = None  # open loop: cap on requests in flight
    max_duration: float = 600.0
    request_timeout: float = 600.0
    seed: int = 0
    progress: bool = True
    headers: dict = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "open" if self.request_rate is not None else "closed"


@dataclass
class LoadOutcome:
    results: list[RequestResult]
    duration: float  # first request sent -> last one done (or the deadline)
    incomplete: int
    max_in_flight: int
    stopped_by: str  # "num_requests" or "max_duration"


def poisson_arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each of `n` requests is sent: exponential gaps of mean 1/rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _progress_bar(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="req", disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False)


async def run_load(specs: list[RequestSpec], cfg: LoadConfig) -> LoadOutcome:
    if cfg.mode == "closed" and not (cfg.concurrency and cfg.concurrency > 0):
        raise ValueError("closed loop needs a concurrency >= 1")
    if cfg.mode == "open" and not (cfg.request_rate and cfg.request_rate > 0):
        raise ValueError("open loop needs a request rate > 0")
    cap = cfg.concurrency if cfg.mode == "closed" else cfg.max_concurrency
    limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap)
    timeout = httpx.Timeout(cfg.request_timeout, connect=30.0, pool=None)
    payloads = [build_payload(s, cfg.endpoint, cfg.model, cfg.stream, cfg.temperature, cfg.include_usage,
                              cfg.ignore_eos, cfg.extra_body) for s in specs]
    results: list[RequestResult] = []
    in_flight: set[int] = set()
    max_in_flight = 0
    launched = cancelled = 0
    bar = _progress_bar(len(specs), cfg.progress)

    async with httpx.AsyncClient(base_url=cfg.base_url, timeout=timeout, limits=limits,
                                 headers=cfg.headers) as client:
        t0 = time.perf_counter()
        deadline = t0 + cfg.max_duration

        async def one(i: int) -> None:
            nonlocal max_in_flight, launched, cancelled
            launched += 1
            in_flight.add(i)
            max_in_flight = max(max_in_flight, len(in_flight))
            try:
                res = await send_request(client, i, specs[i], payloads[i], cfg.endpoint, t0)
            except asyncio.CancelledError:
                cancelled += 1  # still running at the deadline
                raise
            finally:
                in_flight.discard(i)
            results.append(res)
            if bar is not None:
                bar.update(1)

        if cfg.mode == "closed":
            next_index = iter(range(len(specs)))

            async def worker() -> None:
                for i in next_index:  # shared iterator: each index goes to exactly one worker
                    if time.perf_counter() >= deadline:
                        return
                    await one(i)

            tasks = [asyncio.create_task(worker()) for _ in range(min(cfg.concurrency, len(specs)))]
        else:
            arrivals = poisson_arrival_times(len(specs), cfg.request_rate, cfg.seed)
            sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
            tasks = []

            async def gated(i: int) -> None:
                if sem is None:
                    return await one(i)
                async with sem:
                    if time.perf_counter() < deadline:
                        await one(i)

            async def launcher() -> None:
                for i, at in enumerate(arrivals):
                    if t0 + at >= deadline:
                        return
                    delay = t0 + at - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(gated(i)))

            await _until(deadline, [asyncio.create_task(launcher())])

        finished_in_time = await _until(deadline, tasks)
        end = min(time.perf_counter(), deadline)
        stopped_by = "num_requests" if finished_in_time and launched == len(specs) else "max_duration"
    if bar is not None:
        bar.close()
    results.sort(key=lambda r: r.index)
    return LoadOutcome(results, end - t0, cancelled, max_in_flight, stopped_by)


async def _until(deadline: float, tasks: list[asyncio.Task]) -> bool:
    """Wait for `tasks` until the deadline; cancel what is left then. True if all finished in time."""
    if not tasks:
        return True
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    for t in done:
        if t.exception() is not None:
            raise t.exception()
    return not pending
