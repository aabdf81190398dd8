"""Which generation jobs are in flight, and the drain that graceful shutdown runs.

On SIGTERM the server keeps listening but refuses new work with 503 (a load
balancer sees /health fail and moves traffic away), lets running jobs finish
within the grace period, aborts what is left, and only then lets uvicorn exit.

When the engine thread dies, every job gets its error from the engine at once;
`settle` gives the handlers time to send them before the server exits (status 1).
"""

from __future__ import annotations

import asyncio
import logging
import math

from .errors import APIError
from .generation import GenerationJob

log = logging.getLogger(__name__)

# Seconds the handlers of ended jobs get to send their answers (a 503, a final error event).
ANSWER_TIMEOUT = 5.0


class Lifecycle:
    def __init__(self, grace_period: float = 30.0):
        self.grace_period = grace_period
        self.draining = False
        self.jobs: set[GenerationJob] = set()

    def unavailable(self) -> APIError:
        return APIError(
            503, "the server is shutting down; retry on another replica", code="shutting_down",
            headers={"Retry-After": str(max(1, math.ceil(self.grace_period)))},
        )

    def check_admitting(self) -> None:
        if self.draining:
            raise self.unavailable()

    def register(self, job: GenerationJob) -> None:
        """Track a job until it closes; refused once draining started (checked here, after any await)."""
        self.check_admitting()
        self.jobs.add(job)
        job.on_close.append(self.jobs.discard)

    async def drain(self, grace_period: float | None = None) -> None:
        grace = self.grace_period if grace_period is None else grace_period
        self.draining = True
        loop = asyncio.get_running_loop()
        log.info("draining: %d request(s) in flight, grace period %.1fs", len(self.jobs), grace)
        await self._wait_idle(loop.time() + grace)
        if self.jobs:
            log.warning("grace period over: aborting %d request(s)", len(self.jobs))
            for job in list(self.jobs):
                job.abort("the server is shutting down", 503, "shutting_down")
            await self.settle()
        log.info("drained")

    async def settle(self) -> None:
        """Let the handlers of ended jobs answer before uvicorn stops."""
        await self._wait_idle(asyncio.get_running_loop().time() + ANSWER_TIMEOUT)

    async def _wait_idle(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while self.jobs and loop.time() < deadline:
            await asyncio.sleep(0.05)
