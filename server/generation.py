"""One HTTP request's engine requests (n choices, maybe several prompts), merged into one stream.

Each engine request is consumed by its own "pump" task that forwards outputs
into a shared queue, so the handler reads choices as they interleave. The
pumps are also the abort mechanism: cancelling a pump raises CancelledError
inside `AsyncEngine.generate`, whose `finally` aborts the request and frees
its KV blocks. `close()` is idempotent and runs on every exit path (normal
end, client gone, server draining).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator

from dspark_serve.engine import RequestOutput, SamplingParams

from .metrics import ServerMetrics


@dataclass
class SubRequest:
    index: int  # choice index in the response
    request_id: str  # engine request id
    prompt_token_ids: list[int]
    params: SamplingParams


class JobAborted(Exception):
    """The job was stopped from outside: the client went away or the server is shutting down."""

    def __init__(self, reason: str, status: int, code: str):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.code = code


_ABORTED = object()  # queue sentinel: stop reading


class GenerationJob:
    def __init__(self, engine, subs: list[SubRequest], metrics: ServerMetrics | None = None):
        self.engine = engine
        self.subs = subs
        self.metrics = metrics
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._admission_errors: list[BaseException] = []
        self._done: set[int] = set()  # indexes whose engine request finished
        self._aborted: JobAborted | None = None
        self._closed = False
        self.on_close: list = []  # callbacks run once by close()

    async def start(self) -> None:
        """Submit every engine request; raise the first admission error (queue full, prompt too long).

        `AsyncEngine.generate` validates and enqueues synchronously, before its
        first await. A pump task runs that part on its first step, and tasks
        created here take their first step before this coroutine resumes from
        `sleep(0)`, so when it returns every request is either queued or
        refused. On refusal the others are withdrawn: the request fails whole.
        """
        for sub in self.subs:
            self._pumps.append(asyncio.create_task(self._pump(sub), name=f"pump-{sub.request_id}"))
        await asyncio.sleep(0)
        if self._admission_errors:
            self.close()
            raise self._admission_errors[0]

    async def _pump(self, sub: SubRequest) -> None:
        timer = self.metrics.request_timer() if self.metrics else None
        got_output = False
        try:
            async for out in self.engine.generate(
                params=sub.params, request_id=sub.request_id, prompt_token_ids=sub.prompt_token_ids,
            ):
                got_output = True
                if timer is not None:
                    timer.on_output(out, time.monotonic())
                self._queue.put_nowait((sub.index, out))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # refused at admission or failed in the engine: this job fails
            if not got_output:
                self._admission_errors.append(e)
            self._queue.put_nowait((sub.index, e))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as they arrive, until every engine request has finished.

        Raises the engine's exception if one fails, or JobAborted if `abort()` was called.
        """
        while len(self._done) < len(self.subs):
            item = await self._queue.get()
            if item is _ABORTED:
                raise self._aborted
            index, out = item
            if isinstance(out, BaseException):
                raise out
            if out.finished:
                self._done.add(index)
            yield index, out

    async def final_outputs(self) -> dict[int, RequestOutput]:
        """Wait for every engine request to finish; the last output of each, by choice index."""
        finals: dict[int, RequestOutput] = {}
        async for index, out in self.outputs():
            if out.finished:
                finals[index] = out
        return finals

    def abort(self, reason: str, status: int, code: str) -> None:
        """Stop the job from outside; the reader gets JobAborted(reason, status, code)."""
        if self._aborted is None and not self._closed:
            self._aborted = JobAborted(reason, status, code)
            self._cancel_pumps()
            self._queue.put_nowait(_ABORTED)

    @property
    def aborted(self) -> JobAborted | None:
        return self._aborted

    def close(self) -> None:
        """Withdraw whatever is still running. Synchronous, so it is safe in any `finally`."""
        if self._closed:
            return
        self._closed = True
        self._cancel_pumps()
        for cb in self.on_close:
            cb(self)

    def _cancel_pumps(self) -> None:
        for sub, task in zip(self.subs, self._pumps):
            if not task.done():
                task.cancel()
                # Abort at once too, not only when the cancelled pump next runs (idempotent in the engine).
                self.engine.abort(sub.request_id)
