"""AsyncEngine: the step loop in a background thread, outputs streamed to asyncio.

The engine thread owns the `LLMEngine`; nothing else touches it. Requests and
aborts reach it through a command queue, and each step's outputs are handed
to the waiting coroutines with `loop.call_soon_threadsafe`. Heavy tensor work
releases the GIL, so the event loop stays responsive while a step runs.

If the thread dies (anything but an Exception escaping a step, or a bug in
the loop itself), `dead` says so, every request in flight or queued gets an
EngineDeadError and new ones are refused with it; the server then exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from .engine import EngineConfig, LLMEngine, RequestError
from .outputs import RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class QueueFullError(RuntimeError):
    """Too many requests waiting; the server answers 429/503 with Retry-After."""


@dataclass
class _Add:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams
    arrival_time: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, max_waiting: int | None = None, **kwargs: Any):
        config = config or EngineConfig(**kwargs)
        # Bound on requests waiting for admission (None: 4x max_num_seqs).
        self.max_waiting = max_waiting if max_waiting is not None else 4 * config.max_num_seqs
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending = 0  # requests submitted but not yet seen by the engine thread
        self._lock = threading.Lock()
        self._stop = False
        self.dead: str | None = None
        # The engine is built AND run in its own thread: every torch op of the process then
        # happens in that one thread. A second thread entering OpenMP parallel regions (as
        # building the engine in the caller's thread did) creates a second OpenMP team; with
        # more OpenMP threads than cores, libgomp stops spin-waiting and every small parallel
        # op pays a sleep/wake: measured 53 vs 33 ms per token at batch 1 on 2 cores.
        self._ready = threading.Event()
        self._init_error: BaseException | None = None
        self.engine: LLMEngine | None = None
        self._snapshot: dict[str, Any] = {}  # published by the engine thread (`_publish`)
        self._ece: dict = {}
        self._ece_time = float("-inf")
        self._thread = threading.Thread(target=self._main, args=(config,), name="dspark-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._init_error is not None:
            self._thread.join()
            raise self._init_error
        eng = self.engine
        self.tokenizer = eng.tokenizer
        self.model_name = eng.model_name
        self.max_model_len = eng.max_model_len
        self.vocab_size = eng.model_config.vocab_size
        self.dtype = str(eng.runner.dtype).replace("torch.", "")
        self.device = str(eng.device)
        self.speculative_method = eng.spec.method
        self.faults = eng.faults  # test-only hook, None unless DSPARK_FAULT_INJECTION=1

    # ------------------------------------------------------------ public API

    async def generate(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and iterate over its incremental outputs (the last has finished=True).

        Leaving the iteration early (client gone, task cancelled) aborts the
        request and frees its KV blocks.
        """
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        if prompt_token_ids is None:
            if prompt is None:
                raise RequestError("a prompt or prompt_token_ids is required", "prompt")
            prompt_token_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        self.validate_prompt(prompt_token_ids)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            # Checked and queued under the lock `_die` takes: a request is refused, or ends with the rest.
            if self.dead:
                raise EngineDeadError(self.dead)
            # Requests beyond the free running slots wait; bound those.
            free_slots = max(0, self.engine.config.max_num_seqs - self._snapshot["num_running"])
            if self.num_waiting + self._pending - free_slots >= self.max_waiting:
                raise QueueFullError(f"{self.max_waiting} requests are already waiting")
            self._pending += 1
            self._commands.put(_Add(request_id, prompt, prompt_token_ids, params, time.monotonic(), loop, q))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise RequestError for a prompt the engine would refuse, before it is queued."""
        self.engine.validate_prompt(prompt_token_ids)

    @property
    def model_path(self) -> str:
        return self.engine.loaded.path

    def compile_grammar(self, spec):
        """Compile (or find cached) a structured-output grammar; any thread (the compiler is
        thread-safe). Raises RequestError naming the field for a bad one."""
        return self.engine.compile_grammar(spec)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        """A snapshot for metrics: queue sizes, KV blocks and the engine's cumulative counters, as
        the engine thread published them after its last step (never read from the engine while a
        step runs), plus the requests submitted since and not yet seen by that thread."""
        snap = dict(self._snapshot)
        with self._lock:
            snap["num_waiting"] += self._pending
        return snap

    def _publish(self) -> None:
        """Engine thread: take the snapshot `stats()` serves (a few dozen counters, ~10 us). The
        online calibration's ECE costs more and changes slowly: refreshed at most once a second."""
        eng = self.engine
        snap = eng.stats.snapshot()
        kv = eng.kv
        snap.update(
            num_running=eng.num_running,
            num_waiting=eng.num_waiting,
            kv_used_blocks=kv.num_used_blocks,
            kv_total_blocks=kv.num_blocks,
            block_size=kv.block_size,
            prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits,
            kv_cached_blocks=kv.allocator.num_cached,
            compiled_graphs=len(eng.runner.decode_step.ready) if eng.runner.decode_step is not None else 0,
            compiling=int(eng.warming_up),
            **eng.floors.snapshot(),
        )
        spec = eng.speculative
        if spec is not None and spec.online is not None:
            now = time.monotonic()
            if now - self._ece_time >= 1.0:
                self._ece = {mode: cal.ece_by_position() for mode, cal in spec.online.items()}
                self._ece_time = now
            snap["spec_calibration_ece"] = self._ece
        self._snapshot = snap  # one reference assignment: readers see the old dict or the new one

    def calibration_report(self) -> dict | None:
        """Live calibration of the drafter's confidences (None without speculation), computed in the
        engine thread between two steps. Blocks the caller: call it through asyncio.to_thread."""
        return self.on_engine_thread(
            lambda eng: eng.speculative.calibration_report() if eng.speculative is not None else None)

    def on_engine_thread(self, fn, timeout: float = 60.0):
        """fn(engine), run by the engine thread between two steps (the only thread that touches
        the engine); returns its result or raises its exception. Blocks the calling thread."""
        if self.dead:
            raise EngineDeadError(self.dead)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, fut))
        self._wake.set()
        return fut.result(timeout)

    @property
    def num_waiting(self) -> int:
        return self._snapshot["num_waiting"]

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------ engine thread

    def _deliver(self, request_id: str, item: Any, final: bool) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, q = target
        if final:
            self._streams.pop(request_id, None)
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._streams.pop(request_id, None)

    def _drain_commands(self) -> None:
        eng = self.engine
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                with self._lock:
                    self._pending -= 1
                self._streams[cmd.request_id] = (cmd.loop, cmd.queue)
                try:
                    eng.add_request(cmd.request_id, cmd.prompt, cmd.params, cmd.prompt_token_ids, cmd.arrival_time)
                except Exception as e:  # a bad request fails alone
                    self._deliver(cmd.request_id, e, True)
            elif cmd[0] == "call":
                _, fn, fut = cmd
                try:
                    fut.set_result(fn(eng))
                except Exception as e:
                    fut.set_exception(e)
            else:
                _, rid = cmd
                seq = eng.abort_request(rid)
                if seq is not None:
                    log.debug("aborted %s", rid)
                    # whoever still listens gets a final output with finish_reason "abort"
                    self._deliver(rid, eng._make_output(seq), True)
                self._streams.pop(rid, None)

    def _main(self, config: EngineConfig) -> None:
        try:
            self.engine = LLMEngine(config)
            self._publish()
        except BaseException as e:  # reported by __init__, in the caller's thread
            self._init_error = e
            return
        finally:
            self._ready.set()
        try:
            self._run()
        except BaseException as e:  # not a failed step (that is handled in _run): the thread is ending
            log.critical("the engine thread died: %s: %s", type(e).__name__, e, exc_info=e)
            self._die()
        else:
            if not self._stop:
                log.critical("the engine loop returned without a shutdown")
                self._die()

    def _die(self) -> None:
        with self._lock:
            self.dead = "the engine stopped after an internal error (see the server log)"
        self._end_all(self.dead)

    def _end_all(self, message: str) -> None:
        """Every request still listening, or still queued, gets EngineDeadError(message)."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Add):
                with self._lock:
                    self._pending -= 1
                self._streams[cmd.request_id] = (cmd.loop, cmd.queue)
            elif cmd[0] == "call":
                cmd[2].set_exception(EngineDeadError(message))
        for rid in list(self._streams):
            self._deliver(rid, EngineDeadError(message), True)

    def _run(self) -> None:
        eng = self.engine
        while not self._stop:
            self._drain_commands()
            self._publish()
            if not eng.has_unfinished_requests():
                eng.idle()
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                outputs = eng.step()
            except Exception as e:
                log.error("engine step failed: %s: %s\n%s", type(e).__name__, e, traceback.format_exc())
                # Every request of the step fails (the error cannot be pinned on one); the engine goes on.
                outputs = eng.fail_all("internal error in the engine step (see the server log)")
            self._publish()  # before the outputs go out: a client that got its answer sees it counted
            for out in outputs:
                self._deliver(out.request_id, out, out.finished)
        # Shutting down: whoever still waits gets an abort.
        self._end_all("the engine is shutting down")
