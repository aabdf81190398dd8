"""The synchronous engine: requests in, one `step()` at a time, outputs out."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from dspark_serve.models import quant
from dspark_serve.models.dspark import load_drafter
from dspark_serve.models.loader import load_model
from dspark_serve.scheduler.sla import SpeedFloors

from .batcher import ContinuousBatcher, StepRow
from .block_manager import KVCacheManager
from .cpu_alloc import keep_freed_memory
from .cpu_threads import default_num_threads
from .faults import FaultInjector
from .model_runner import ModelRunner
from .outputs import CompletionOutput, RequestOutput
from .sampler import Sampler, top_logprobs
from .speculative import SpecConfig, SpeculativeDecoder, verify
from .sampling_params import SamplingParams
from .sequence import Sequence, SequenceStatus
from .structured import GrammarCompiler, GrammarDeadEnd, GrammarError, GrammarSpec, apply_mask

log = logging.getLogger(__name__)
# Redraws of a constrained row whose drawn token the grammar refuses although its mask allowed it.
_MAX_REDRAWS = 16
# How far a live step timing also corrects the neighbouring cost-table buckets (ln B units):
# 1.0 moves B/2 and 2B by half as much as B itself (scheduler/cost_table.py, CostTable.observe).
LIVE_SPREAD = 1.0


@dataclass
class EngineConfig:
    model: str | None = None  # HF directory or .gguf file; None: the embedded default
    dtype: str = "auto"  # auto: bf16 on GPUs; CPUs: whichever a matmul probe measures faster (models.loader)
    quantization: str = "auto"  # auto | none | int4 | int8: packed weight-only linears on CPU (models/quant.py)
    device: str = "auto"  # auto: cuda when available, else cpu
    seed: int = 0
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: 1 GiB on CPU, 85% of free on GPU
    num_threads: int | None = None  # torch CPU threads; None: physical cores within affinity and cgroup quota (cpu_threads.py)
    speculative_config: dict[str, Any] | None = None
    cost_table: str | None = None  # SPS(B) JSON to load (or save after profiling); default: in the cache dir
    record_acceptance: str | None = None  # JSONL of verification rounds, for `dspark calibrate`
    enable_prefix_caching: bool = True  # reuse the KV (and drafter context) of cached prompt blocks
    # Speed floor of every request without its own (tokens/s after the first token; 0: none):
    # the load-aware scheduler weighs requests below it more and holds admissions (scheduler/sla.py).
    sla_min_tokens_per_s: float = 0.0
    # Structured outputs: compute the token masks on a worker thread while the forward runs.
    grammar_overlap: bool = True
    # Never torch.compile the decode step (engine/compiled_step.py); default from DSPARK_ENFORCE_EAGER,
    # the variable `dspark serve` reads for --enforce-eager too.
    enforce_eager: bool = field(default_factory=lambda: os.environ.get("DSPARK_ENFORCE_EAGER", "").strip().lower()
                                in ("1", "true", "yes", "on"))

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


class RequestError(ValueError):
    """A request the engine cannot take (prompt too long, empty...); `param` names the culprit."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs: Any):
        self.config = config or EngineConfig(**kwargs)
        cfg = self.config
        self.device = cfg.resolved_device()
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.num_threads or default_num_threads())
            keep_freed_memory()
        torch.manual_seed(cfg.seed)
        t0 = time.monotonic()
        max_len = cfg.max_model_len
        loaded = load_model(cfg.model, cfg.dtype, self.device, max_positions=(max_len + 64) if max_len else None,
                            quantization=cfg.quantization)
        self.loaded = loaded
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.eos_token_ids = set(loaded.eos_token_ids)
        self.max_model_len = min(max_len or loaded.config.max_position_embeddings, loaded.config.max_position_embeddings)
        self.spec = SpecConfig.from_dict(cfg.speculative_config)
        drafter = None
        self.gamma = 0
        if self.spec.enabled:
            drafter = load_drafter(self.spec.model, target=loaded.model, dtype=next(loaded.model.parameters()).dtype,
                                   device=self.device)
            self.gamma = self.spec.num_speculative_tokens or drafter.config.block_size
            drafter.config.override_context_window(self.spec.draft_context_window)  # the serving config's, if any
            if loaded.model.quantization != "none":  # a packed target: the drafter's linears too
                drafter.pack_linears(next(loaded.model.parameters()).dtype)
            if self.gamma > drafter.config.block_size:
                raise ValueError(f"num_speculative_tokens {self.gamma} exceeds the drafter's block_size {drafter.config.block_size}")
        self.runner = ModelRunner(loaded, cfg.block_size, cfg.kv_cache_memory, self.device, drafter, self.gamma,
                                  enforce_eager=cfg.enforce_eager)
        self.proposer = self.runner.proposer
        # Anything that changes a block's KV for the same tokens belongs in the salt of its hash.
        salt = f"{loaded.path}|{self.runner.dtype}|{loaded.model.quantization}|{quant.kernel_of(loaded.model)}|{self.spec.model if drafter else ''}"
        self.kv = KVCacheManager(self.runner.num_blocks, cfg.block_size, prefix_caching=cfg.enable_prefix_caching,
                                 cache_salt=salt)
        self.batcher = ContinuousBatcher(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.floors = SpeedFloors(cfg.sla_min_tokens_per_s)
        self.sampler = Sampler()
        self.seqs: dict[str, Sequence] = {}
        self.stats = EngineStats()
        self.faults = FaultInjector.from_env()  # None unless DSPARK_FAULT_INJECTION=1 (tests)
        self._grammars: GrammarCompiler | None = None  # made at the first structured request
        self._grammars_lock = threading.Lock()
        self.grammar_overlap = cfg.grammar_overlap
        self._mask_pool: ThreadPoolExecutor | None = None  # made at the first constrained step
        self.speculative = None
        self._table_compiled = False
        if drafter is not None:
            table = self._cost_table() if self.spec.verification in ("scheduled", "async") or self.spec.draft_skipping else None
            self.speculative = SpeculativeDecoder(
                self.spec, self.proposer, self.gamma, self.stats, self.max_model_len, cost_table=table,
                drafter_dir=self.spec.model, record_path=cfg.record_acceptance, floors=self.floors,
            )
        if self.runner.decode_step is not None:
            self.runner.decode_step.start()  # compiles in the background; serving starts now, eager
        log.info(
            "engine ready: %s (%s, %s) in %.1fs, max_model_len=%d",
            self.model_name, self.runner.dtype, self.device, time.monotonic() - t0, self.max_model_len,
        )

    # ------------------------------------------------------------ requests

    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        arrival_time: float | None = None,
    ) -> Sequence:
        params = params or SamplingParams()
        if request_id in self.seqs:
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        if prompt_token_ids is None:
            if prompt is None:
                raise RequestError("a prompt or prompt_token_ids is required", "prompt")
            prompt_token_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        self.validate_prompt(prompt_token_ids)
        matcher = self.compile_grammar(params.structured).matcher() if params.structured is not None else None
        seq = Sequence(request_id, prompt_token_ids, params, self.tokenizer, prompt, arrival_time, self.device)
        seq.floor = self.floors.floor_of(params.min_tokens_per_s)
        if matcher is not None:
            seq.grammar = matcher
            self.stats.structured_requests += 1
        self.seqs[request_id] = seq
        self.batcher.add(seq)
        return seq

    def compile_grammar(self, spec: GrammarSpec):
        """The compiled grammar of a structured-output spec (cached; thread-safe, so the server
        compiles off its event loop before admission). Raises RequestError naming the field."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, eos_token_ids=sorted(self.eos_token_ids))
        misses = self._grammars.misses
        try:
            compiled = self._grammars.compile(spec)
        except GrammarError as e:
            raise RequestError(e.message, e.param or "response_format", "invalid_value") from None
        if self._grammars.misses != misses:
            self.stats.grammar_compiles += 1
            self.stats.grammar_compile_seconds += compiled.compile_seconds
        return compiled

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise RequestError for a prompt this engine cannot take."""
        if not prompt_token_ids:
            raise RequestError("the prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise RequestError(
                f"the prompt has {n} tokens; this model's maximum context length is {self.max_model_len}",
                "messages", "context_length_exceeded",
            )
        if self.kv.blocks_for(n + 1) > self.kv.num_blocks:
            raise RequestError(
                f"the prompt has {n} tokens, more than the KV cache can hold", "messages", "context_length_exceeded"
            )

    def abort_request(self, request_id: str) -> Sequence | None:
        """Stop a request and free its blocks; returns it (finish_reason "abort"), or None if unknown."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.batcher.remove(seq)
        if self.speculative is not None:
            self.speculative.finished(seq)
        if self.faults is not None:
            self.faults.disarm(request_id)
        if not seq.finished:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"
            seq.finish_time = time.monotonic()
            self.stats.aborted += 1
        return seq

    def has_unfinished_requests(self) -> bool:
        return self.batcher.has_work()

    @property
    def num_running(self) -> int:
        return len(self.batcher.running)

    @property
    def num_waiting(self) -> int:
        return len(self.batcher.waiting)

    # ------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """One engine step, in the order it happens (one `StepRow` per scheduled sequence carries
        it through):

        1. schedule: the speculative caps (from the queues and earlier steps only, before anything
           is drafted), then the batch: running requests first, then admissions (sharing cached
           prefix blocks), each row with its token slots: pending tokens + room for drafts;
        2. draft and plan (`SpeculativeDecoder.draft`): one drafter pass for the decoding rows with
           room, context lookup, the policy's verification lengths -> row.draft;
        3. one forward (`ModelRunner.execute`): target KV and drafter context written for every fed
           token, logits for the rows that sample;
        4. count the fed tokens as computed; sample the plain rows (one batched sample);
        5. verify the drafted rows: an accepted prefix of the drafts and one token more;
        6. commit (`_commit`): rejected drafts and unused slots rolled back, tokens appended, stop
           rules, outputs, finished requests released;
        7. the whole step's seconds to the speculative decoder (`end_step`): a drafted step is
           judged for the draft budget, a plain one prices the plain alternative.
        """
        spec = self.speculative
        b = self.batcher
        caps = spec.caps(b.running, b.waiting, b.max_num_batched_tokens, b.max_num_seqs) if spec is not None else None
        batch = b.schedule(caps, self._admissions())
        self.stats.preemptions += len(batch.preempted)
        self.stats.prompt_tokens += batch.cached_prompt_tokens
        rows = batch.rows
        if not rows:
            return []
        t0 = time.monotonic()
        if caps:
            self.stats.spec_last_realised_tokens = 0
            spec.draft(rows, self.kv.block_size)
        masks = self._start_masks(rows)
        logits = self.runner.execute(rows)
        sampling = [r for r in rows if r.logits_row is not None]
        if self.faults is not None:
            self.faults.after_forward(logits, [(r.seq.request_id, r.logits_row, r.num_logits) for r in sampling])
        self._mark_nonfinite(sampling, logits)
        self._constrain(sampling, logits, masks)
        self._count_fed(rows)
        self._sample_plain([r for r in sampling if not r.draft and r.failure is None], logits)
        now = time.monotonic()
        num_fed = sum(r.fed for r in rows)
        self.stats.record_step(num_fed, len(rows), now - t0)
        if spec is not None:
            spec.observe_step(num_fed, now - t0)
        for r in sampling:
            if r.draft and r.failure is None:
                try:
                    self._verify_drafts(r, logits[r.logits_row:r.logits_row + r.num_logits])
                except Exception as e:
                    r.failure = self._internal_failure(r.seq, e)
        outputs = self._commit(rows, now)
        seconds = time.monotonic() - t0
        if spec is not None:
            spec.end_step(num_fed, seconds)
        self._observe_floors(rows, num_fed, seconds, now)
        return outputs

    # ------------------------------------------------------------ speed floors

    def _admissions(self) -> int | None:
        """Most waiting requests this step may admit under the speed floors (scheduler/sla.py):
        None (no limit) without a server floor or when no running or waiting request has a floor."""
        b = self.batcher
        if not b.waiting or self.floors.default_floor <= 0.0:
            return None  # only the server's floor holds the queue (a request's own, up to it)
        seats = max(0, b.max_num_seqs - len(b.running))
        waiting = [s.floor for s in itertools.islice(b.waiting, seats)]
        if not any(f > 0.0 for f in waiting) and not any(s.floor > 0.0 for s in b.running):
            return None
        now = time.monotonic()
        table = self.cost_table
        n = self.floors.admissions([s.floor_view(now) for s in b.running], waiting,
                                   table.seconds if table is not None else None)
        if n < len(waiting):
            self.floors.admission_holds += 1
        return n

    def _observe_floors(self, rows: list[StepRow], num_fed: int, seconds: float, now: float) -> None:
        """The step's decoding rows teach the floors' step model; the running requests below their
        floor are counted (a metric)."""
        f = self.floors
        decoding = [r for r in rows if r.logits_row is not None and r.pending == 1]
        if decoding:
            table = self.cost_table
            f.observe_step(seconds, len(decoding), sum(r.fed for r in decoding), sum(len(r.emitted) for r in decoding),
                           table.seconds(num_fed) if table is not None and num_fed > 0 else None)
        f.below_floor = sum(1 for s in self.batcher.running if s.floor > 0.0 and f.below(s.floor_view(now)))

    def _mark_nonfinite(self, rows: list[StepRow], logits: torch.Tensor) -> None:
        """A request with a NaN or inf among its logits fails alone (one reduction over the batch)."""
        if not rows:
            return
        finite = torch.isfinite(logits.sum(dim=-1)).tolist()
        for r in rows:
            if not all(finite[r.logits_row:r.logits_row + r.num_logits]):
                log.error("request %s: non-finite logits; failing it alone", r.seq.request_id)
                r.failure = "the model produced non-finite logits (NaN or inf) for this request"

    def _start_masks(self, rows: list[StepRow]) -> Future | None:
        """Structured outputs, before the forward: the token masks of the constrained rows that
        will sample, one per position along the row's draft (`GrammarMatcher.masks_along`). They
        depend only on tokens fixed before the forward (the accepted ones and the drafts), so a
        worker thread computes them while the forward runs (llguidance and torch's kernels both
        leave the GIL); `_constrain` waits for them."""
        todo = [r for r in rows if r.seq.grammar is not None
                and (r.draft or r.seq.num_computed_tokens + r.pending == len(r.seq.token_ids))]
        if not todo:
            return None
        job = functools.partial(_grammar_masks, todo, self.model_config.vocab_size)
        if not self.grammar_overlap:
            return _done(job)
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dspark-grammar")
        return self._mask_pool.submit(job)

    def _constrain(self, rows: list[StepRow], logits: torch.Tensor, masks: Future | None) -> None:
        """Structured outputs: the logits of a constrained row keep only the tokens its grammar
        allows (-inf elsewhere), so sampling, greedy argmax and rejection sampling all follow the
        masked target distribution. A verification row gets one mask per position, along its draft
        (computed during the forward: `_start_masks`); a draft copied from the context that leaves
        the grammar is cut at its first disallowed token (a function of the context alone, fixed
        before anything is sampled); the drafter's own drafts are drawn under the grammar and
        always pass."""
        if masks is None:
            return
        t0 = time.perf_counter()
        done = masks.result()  # row -> (masks, k) or the exception its grammar raised
        for r in rows:
            if r not in done or r.failure is not None:
                continue
            got = done[r]
            if isinstance(got, BaseException):
                r.failure = self._internal_failure(r.seq, got)
                continue
            try:
                m, k = got
                if k < len(r.draft):
                    self.stats.grammar_draft_cuts += 1
                    r.draft, r.num_logits = r.draft[:k], k + 1
                    if not k:
                        r.draft_info = None
                apply_mask(logits[r.logits_row:r.logits_row + k + 1], m[:k + 1])
                self.stats.grammar_mask_rows += k + 1
            except Exception as e:
                r.failure = self._internal_failure(r.seq, e)
        blocked = time.perf_counter() - t0  # waiting for the job, then applying
        self.stats.grammar_mask_seconds += done[_SECONDS] + blocked
        self.stats.grammar_mask_blocking_seconds += blocked + (0.0 if self.grammar_overlap else done[_SECONDS])

    def _count_fed(self, rows: list[StepRow]) -> None:
        """The forward wrote the KV (and drafter context) of each row's pending tokens and drafts:
        they count as computed until verification rejects some."""
        for r in rows:
            seq = r.seq
            r.fed = r.pending + len(r.draft)
            if seq.num_preemptions == 0:
                self.stats.prompt_tokens += max(0, min(r.fed, seq.num_prompt_tokens - seq.num_computed_tokens))
            seq.num_computed_tokens += r.fed

    def _sample_plain(self, rows: list[StepRow], logits: torch.Tensor) -> None:
        """One batched sample for the rows without drafts; a row whose sampling cannot be prepared
        fails alone."""
        if not rows:
            return
        result = self.sampler(logits[[r.logits_row for r in rows]], [r.seq for r in rows], self.faults)
        for i, r in enumerate(rows):
            if i in result.errors:
                r.failure = self._internal_failure(r.seq, result.errors[i])
                continue
            token, logprob = result.token_ids[i], result.logprobs[i]
            g, row = r.seq.grammar, None
            for _ in range(_MAX_REDRAWS):
                if g is None or g.allows(token):
                    break
                # the mask allowed a token the grammar refuses (GrammarMatcher.allows): draw again
                # without it, which samples exactly the distribution masked by the true set
                if row is None:
                    row = logits[r.logits_row].clone()
                row[token] = float("-inf")
                if not bool(torch.isfinite(row).any()):
                    r.failure = self._dead_end(r.seq)
                    break
                again = self.sampler(row[None], [r.seq], None)
                if 0 in again.errors:
                    r.failure = self._internal_failure(r.seq, again.errors[0])
                    break
                token, logprob = again.token_ids[0], again.logprobs[0]
            else:
                r.failure = self._dead_end(r.seq)
            if r.failure is None:
                r.emitted = [(token, logprob)]

    def _verify_drafts(self, row: StepRow, logits: torch.Tensor) -> None:
        """Accept a prefix of the row's drafts (greedy: while they are the argmax; sampled: rejection
        sampling) plus the next token; `logits` holds one row per fed token, anchor first."""
        seq, draft = row.seq, row.draft
        row.accepted, nxt = verify(seq.params, logits, draft, row.draft_info["probs"], seq.generator)
        self.speculative.record_round(seq, len(draft), row.accepted, row.draft_info)
        tokens = draft[:row.accepted] + [nxt]
        lps: list = [None] * len(tokens)
        k = seq.params.logprobs
        if k is not None:
            logp = logits[: len(tokens)].float().log_softmax(dim=-1)
            lps = [(float(logp[j, t]), top_logprobs(logp[j], k)) for j, t in enumerate(tokens)]
        row.emitted = list(zip(tokens, lps))

    def _commit(self, rows: list[StepRow], now: float) -> list[RequestOutput]:
        """The end of the step, per row:

        - the computed count drops the rejected drafts (accepted ones and the anchor keep their KV);
        - the target KV is truncated to that count, which frees the blocks of rejected drafts and of
          speculative slots the plan did not use. The drafter's context needs no rollback of its
          own: it lives in the same slots of the same block table, so the truncation releases it
          too, and the next step's forward overwrites those slots before any draft reads them;
        - the emitted tokens are appended (stop rules may end the request inside an accepted run),
          an output is made for every row that sampled, and finished requests leave the engine.
        """
        outputs = []
        for r in rows:
            seq = r.seq
            seq.num_computed_tokens -= len(r.draft) - r.accepted
            if seq.block_table.num_tokens > seq.num_computed_tokens:
                self.kv.truncate(seq.block_table, seq.num_computed_tokens)
        for r in rows:
            if r.logits_row is None:
                continue  # a prefill chunk: nothing to say yet
            seq, out = r.seq, None
            if r.failure is None:
                try:
                    for token, lp in r.emitted:
                        if self._append_token(seq, token, lp, now):
                            break
                    out = self._make_output(seq)
                except GrammarDeadEnd:
                    r.failure = self._dead_end(seq)
                except Exception as e:
                    r.failure = self._internal_failure(seq, e)
            if out is None:
                out = self._fail(seq, r.failure, now)
            outputs.append(out)
            if seq.finished:
                self._release(seq)
        return outputs

    @staticmethod
    def _dead_end(seq: Sequence) -> str:
        """A request whose output constraint cannot be continued fails alone, as its own fault."""
        seq.error_code = GrammarDeadEnd.code
        return (f"the output constraint cannot be continued with this model's tokenizer after "
                f"{seq.num_output_tokens} output tokens (no token it allows there can be generated)")

    @staticmethod
    def _internal_failure(seq: Sequence, exc: Exception) -> str:
        """Log an exception raised while processing one request; the reason its client gets
        (no exception text: it may hold paths or internals)."""
        log.error("request %s failed: %s: %s", seq.request_id, type(exc).__name__, exc, exc_info=exc)
        return f"internal error while processing this request (request id {seq.request_id}; see the server log)"

    def _fail(self, seq: Sequence, reason: str, now: float) -> RequestOutput:
        """Finish one request with finish_reason "error"; the others go on."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "error"
        seq.error = reason
        seq.finish_time = now
        self.stats.finished["error"] = self.stats.finished.get("error", 0) + 1
        return self._make_output(seq)

    def _release(self, seq: Sequence) -> None:
        """A finished request leaves the engine: its blocks, its speculative state, its fault hook
        (and its speed floor, met or missed, is counted)."""
        if seq.finish_reason in ("stop", "length") and seq.last_token_time is not None:
            self.floors.finished(seq.floor_view(seq.last_token_time))
        self.batcher.remove(seq)
        self.seqs.pop(seq.request_id, None)
        if self.speculative is not None:
            self.speculative.finished(seq)
        if self.faults is not None:
            self.faults.disarm(seq.request_id)

    # ------------------------------------------------------------ speculation

    def _cost_table(self):
        """SPS(B) of this machine: loaded from --cost-table / the cache, else profiled now and saved."""
        from dspark_serve.scheduler import CostTable, profile_cost_table

        from dspark_serve.models.loader import cache_dir

        from .compiled_step import code_fingerprint

        step = self.runner.decode_step
        key = {"model": self.loaded.path, "dtype": str(self.runner.dtype), "quantization": self.loaded.model.quantization,
               "kernel": quant.kernel_of(self.loaded.model),
               "device": str(self.device), "step": "compiled" if step is not None and step.all_ready else "eager",
               "threads": torch.get_num_threads(), "gamma": self.gamma, "measures": "verify-forward+draft-pass"}
        if key["step"] == "compiled":  # graphs of another version of the code run at other speeds
            key["code"] = code_fingerprint()
        path = self.config.cost_table
        if path is None:
            slug = "".join(c if c.isalnum() else "-" for c in f"{self.model_name}-{key['dtype']}-{key['quantization']}-{key['kernel']}-{key['device']}-t{key['threads']}-{key['step']}")
            path = cache_dir() / "cost_tables" / f"{slug}-g{self.gamma}.json"
        table = CostTable.load(path, key)
        if table is not None:
            log.info("cost table loaded from %s", path)
            table.spread = LIVE_SPREAD
            return table
        t0 = time.monotonic()
        max_tokens = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * (self.gamma + 1))
        table = profile_cost_table(self._profile_forward, max_tokens=max_tokens, repeats=2, smooth=True)
        # the drafting pass by the sequences it drafts for (1, 2, 4, ... and the most a step holds,
        # up to 64; linear beyond): the draft budget's forecast charges it before a step drafts
        most = min(self.config.max_num_seqs, 64)
        table = CostTable(table.points, alpha=table.alpha,
                          draft={n: self._profile_draft(n) for n in sorted({1 << i for i in range(7) if 1 << i <= most} | {most})})
        log.info("cost table profiled in %.1fs over %d points", time.monotonic() - t0, len(table.points))
        try:
            table.save(path, key)
        except OSError as e:
            log.warning("cannot save the cost table to %s: %s", path, e)
        table.spread = LIVE_SPREAD
        return table

    @property
    def cost_table(self):
        """The SPS(B) cost table the verification policy plans with (`scheduler.CostTable`), or
        None when speculation is off or its policy uses none."""
        return self.speculative.cost_table if self.speculative is not None else None

    @property
    def warming_up(self) -> bool:
        """The decode graphs are compiling, or are ready while the cost table still holds the eager
        step's times (`idle` re-profiles it)."""
        step = self.runner.decode_step
        if step is None:
            return False
        return step.compiling or (step.all_ready and self._table_pending())

    def _table_pending(self) -> bool:
        return self.speculative is not None and self.speculative.cost_table is not None and not self._table_compiled

    def idle(self) -> None:
        """Work for a moment with no request (the server calls it between idle waits): once the decode
        graphs are compiled, the cost table is re-profiled on them (or loaded, from an earlier start),
        so that Algorithm 1 weighs the step this engine now runs. With no idle moment, live step
        timings correct the table instead (LIVE_SPREAD)."""
        step = self.runner.decode_step
        if step is not None and step.all_ready and self._table_pending() and not self.has_unfinished_requests():
            self._table_compiled = True
            self.speculative.cost_table.replace(self._cost_table())
            self.speculative.step_changed()  # the draft budget's measurements were of eager steps
            log.info("cost table refreshed for the compiled decode step")

    @contextlib.contextmanager
    def _profile_sequences(self, queries: list[int]):
        """Decoding requests at a realistic context, one per entry of `queries` (the tokens each
        feeds), with their KV blocks; freed on exit."""
        block = max(queries)
        room = self.kv.num_free_blocks * self.kv.block_size // len(queries) - 2 * self.kv.block_size
        ctx = max(2, min(256, self.max_model_len - block - 1, room - block))
        seqs = []
        try:
            for i, q in enumerate(queries):
                # a prompt of ctx - 1 tokens and one generated token, the anchor the step feeds: a
                # decode row (packed weights, the compiled step), not a prompt row (dense weights)
                seq = Sequence(f"__profile{i}", [0] * (ctx - 1), SamplingParams(temperature=0), None, device=self.device)
                seq.token_ids.append(0)
                self.kv.grow(seq.block_table, ctx + q)
                seq.num_computed_tokens = ctx - 1
                seqs.append((seq, q))
            yield seqs
        finally:
            for s, _ in seqs:
                self.kv.free(s.block_table)

    def _profile_forward(self, num_tokens: int) -> float:
        """Seconds of the verification forward of one speculative step with `num_tokens` tokens:
        decoding requests at a realistic context, each verifying up to gamma + 1. They draft first
        (the drafter's caches and allocations are then as in serving), but the table holds the
        forward alone: the engine adds each step's measured drafting seconds when it plans."""
        block = self.gamma + 1
        nreq = max(1, -(-num_tokens // block))
        queries = [block] * (nreq - 1) + [max(1, num_tokens - (nreq - 1) * block)]
        with self._profile_sequences(queries) as seqs:
            self.proposer.propose([s for s, _ in seqs], self.kv.block_size, self.gamma)
            self._sync()
            t0 = time.perf_counter()
            self.runner.execute([StepRow(s, q, 1, draft=[0] * (q - 1)) for s, q in seqs])
            self._sync()
            return time.perf_counter() - t0

    def _profile_draft(self, num_seqs: int, repeats: int = 2) -> float:
        """Seconds of one drafting pass (gamma positions) for `num_seqs` decoding requests: the
        median of `repeats` after one untimed pass."""
        with self._profile_sequences([1] * num_seqs) as seqs:
            times = []
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                self.proposer.propose([s for s, _ in seqs], self.kv.block_size, self.gamma)
                self._sync()
                times.append(time.perf_counter() - t0)
            return statistics.median(times[1:])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _append_token(self, seq: Sequence, token: int, logprob, now: float) -> bool:
        """Append one sampled token and apply every stop rule; True when it finished the request."""
        if seq.grammar is not None and not seq.grammar.accept(token):
            # every token comes from a mask, so the mask allowed what the matcher refuses
            # (GrammarMatcher.allows): a draft forced there, or verified along masks_along
            raise GrammarDeadEnd(f"token {token} is outside the request's grammar")
        seq.token_ids.append(token)
        self.stats.generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        if logprob is not None:
            chosen, top = logprob
            seq.output_logprobs.append({"token_id": token, "logprob": chosen, "top": top})
            seq.cumulative_logprob += chosen
        p = seq.params
        n_out = seq.num_output_tokens
        finish = None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                finish, reason = "stop", None
            elif token in p.stop_token_ids:
                finish, reason = "stop", token
        detok = seq.detokenizer
        # An EOS or stop token ends the text; it is not part of it.
        if detok is not None and (finish is None or p.include_stop_str_in_output):
            if self.faults is not None:
                self.faults.before_detokenize(seq.request_id)
            delta = detok.add([token])
            if delta:
                seq.output_text += delta
                if finish is None and p.stop and n_out >= p.min_tokens:
                    hit = _find_stop(seq.output_text, p.stop, len(delta))
                    if hit is not None:
                        pos, s = hit
                        seq.output_text = seq.output_text[: pos + (len(s) if p.include_stop_str_in_output else 0)]
                        finish, reason = "stop", s
        if finish is None and seq.grammar is not None and seq.grammar.is_terminated():
            finish, reason = "stop", None  # the grammar is complete: only an EOS could follow
        if finish is None:
            if p.max_tokens is not None and n_out >= p.max_tokens:
                finish, reason = "length", None
            elif len(seq.token_ids) >= self.max_model_len:
                finish, reason = "length", None
        if finish is None:
            return False
        if detok is not None and not isinstance(reason, str):
            seq.output_text += detok.flush()  # a trailing incomplete character, if any
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = finish
        seq.stop_reason = reason
        seq.finish_time = now
        self.stats.finished[finish] = self.stats.finished.get(finish, 0) + 1
        return True

    def _make_output(self, seq: Sequence) -> RequestOutput:
        p = seq.params
        text = seq.output_text
        if not seq.finished and p.stop:
            # Hold back a possible beginning of a stop string until it is decided.
            hold = max(len(s) for s in p.stop) - 1
            visible = max(seq._text_sent, len(text) - hold)
        else:
            visible = len(text)
        delta_text = text[seq._text_sent:visible]
        seq._text_sent = visible
        out_ids = seq.output_token_ids
        sent_tokens = seq._tokens_sent
        delta_ids = out_ids[sent_tokens:]
        seq._tokens_sent = len(out_ids)
        lps = seq.output_logprobs if p.logprobs is not None else None
        comp = CompletionOutput(
            index=0,
            text=text[:visible],
            token_ids=out_ids,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            cumulative_logprob=seq.cumulative_logprob if lps is not None else None,
            logprobs=lps,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            delta_logprobs=lps[sent_tokens:] if lps is not None else None,
        )
        metrics = {
            "arrival_time": seq.arrival_time,
            "first_token_time": seq.first_token_time,
            "finish_time": seq.finish_time,
            "num_preemptions": seq.num_preemptions,
            "num_cached_tokens": seq.num_cached_tokens,
        }
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [comp], seq.finished, seq.error, metrics,
                             seq.error_code)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """After an unexpected engine error: finish every request with an error (`message` goes to
        the clients: keep internals out of it)."""
        outs = []
        now = time.monotonic()
        self.kv.drop_prefix_cache()  # the failed step may have left registered blocks half written
        for seq in list(self.seqs.values()):
            outs.append(self._fail(seq, message, now))
            self._release(seq)
        self.seqs.clear()
        return outs


_SECONDS = "seconds"  # the key of a mask job's own compute time in its result


def _grammar_masks(rows: list[StepRow], width: int) -> dict:
    """The mask job of one step (`LLMEngine._start_masks`): per row, bool masks [len(draft) + 1,
    width] along its draft and k, the drafts the grammar allows (`GrammarMatcher.masks_along`);
    an exception stays with the row that raised it. Touches only these rows' matchers, which
    nothing else uses until the step reads the result."""
    t0 = time.perf_counter()
    out: dict = {}
    for r in rows:
        try:
            n = len(r.draft)
            masks = torch.empty(n + 1, width, dtype=torch.bool)
            if n:
                k = r.seq.grammar.masks_along(r.draft, masks)
            else:
                k = 0
                r.seq.grammar.fill_mask(masks[0])
            out[r] = (masks, k)
        except Exception as e:
            out[r] = e
    out[_SECONDS] = time.perf_counter() - t0
    return out


def _done(job) -> Future:
    """Run `job` now: a finished Future of its result."""
    f: Future = Future()
    f.set_result(job())
    return f


def _find_stop(text: str, stops: list[str], delta_len: int) -> tuple[int, str] | None:
    """Earliest stop string that ends within the newest `delta_len` characters."""
    best = None
    for s in stops:
        start = max(0, len(text) - delta_len - len(s) + 1)
        pos = text.find(s, start)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, s)
    return best


@dataclass
class EngineStats:
    """Cumulative counters of the engine; the server's /metrics reads them at scrape time."""

    steps: int = 0
    step_tokens: int = 0
    step_time: float = 0.0
    preemptions: int = 0
    aborted: int = 0
    finished: dict = field(default_factory=dict)  # finish_reason -> count
    prompt_tokens: int = 0  # prompt tokens of requests, each once: prefilled or from the prefix cache (recomputation after preemption excluded)
    generation_tokens: int = 0
    last_step_tokens: int = 0
    last_step_seqs: int = 0
    last_step_time: float = 0.0
    # Speculative decoding (all zero while speculation is off).
    spec_num_drafts: int = 0  # verification rounds, summed over requests
    spec_num_proposed_tokens: int = 0  # tokens drafted
    spec_num_decode_steps: int = 0  # decoding requests summed over steps: proposed / this = positions drafted per request per step
    spec_num_draft_tokens: int = 0  # drafted tokens sent to verification
    spec_drafted_steps: int = 0  # engine steps that ran the drafting pass
    spec_budget_plain_steps: int = 0  # steps with decoding requests that the draft budget kept from drafting
    spec_budget_forecast_steps: int = 0  # ... of which its forecast refused (no acceptance seen could pay)
    spec_budget_verdicts: dict = field(default_factory=dict)  # "paid"/"lost" -> drafted steps judged so
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list = field(default_factory=list)  # index k: accepted at draft position k+1
    spec_lookup_num_drafts: int = 0  # of the rounds above, those that verified a draft copied from the context
    spec_lookup_num_draft_tokens: int = 0
    spec_lookup_num_accepted_tokens: int = 0
    spec_verify_length_counts: dict = field(default_factory=dict)  # verify length -> rounds
    spec_last_expected_tokens: float = 0.0  # last step: tokens the plan expected (1 + sum of a_j per request)
    spec_last_realised_tokens: int = 0  # last step: tokens the drafted requests actually produced
    spec_last_planned_tokens: int = 0  # last step: B, tokens in the verify forward the plan chose
    spec_last_sps: float = 0.0  # cost-table SPS(B) at that B
    spec_capacity: int = 0  # async policy: the capacity K of this step
    # Structured outputs (engine/structured.py).
    structured_requests: int = 0  # requests admitted with a grammar
    grammar_compiles: int = 0  # grammars compiled (cache misses)
    grammar_compile_seconds: float = 0.0
    grammar_mask_rows: int = 0  # token masks applied to target logits (one per sampled position)
    grammar_mask_seconds: float = 0.0  # computing and applying them (drafting's masks excluded)
    grammar_mask_blocking_seconds: float = 0.0  # of which on the step's own thread (not hidden by the forward)
    grammar_draft_cuts: int = 0  # drafts (context copies) cut where they left the grammar

    def record_step(self, tokens: int, seqs: int, seconds: float) -> None:
        self.steps += 1
        self.step_tokens += tokens
        self.step_time += seconds
        self.last_step_tokens = tokens
        self.last_step_seqs = seqs
        self.last_step_time = seconds

    def snapshot(self) -> dict:
        d = dict(self.__dict__)
        d["finished"] = dict(self.finished)
        d["spec_accepted_per_pos"] = list(self.spec_accepted_per_pos)
        d["spec_verify_length_counts"] = dict(self.spec_verify_length_counts)
        d["spec_budget_verdicts"] = dict(self.spec_budget_verdicts)
        return d
