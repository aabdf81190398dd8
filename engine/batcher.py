"""Continuous batching: which sequences run in the next step, and how many tokens each feeds.

Every step, running sequences go first (a decode feeds 1 token, a prefill in
progress its next chunk), then waiting ones are admitted while the token
budget, `max_num_seqs` and free KV blocks allow. A prompt longer than the
remaining budget is split into chunks over several steps (chunked prefill).
When blocks run out, the most recently admitted running sequence is
preempted by recompute: its blocks are freed and it goes back to the front
of the queue, to be prefilled again from its prompt and outputs so far.

With prefix caching, a sequence admitted with no blocks first shares the cached blocks of
its longest cached prefix and computes only the rest; every scheduled sequence then
registers the full prompt blocks this step completes (engine/block_manager.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import KVCacheManager
from .sequence import Sequence, SequenceStatus


@dataclass(eq=False)
class StepRow:
    """One sequence's part in one engine step, from scheduling to commit (`LLMEngine.step` reads
    the stages in order; each fills its fields)."""

    seq: Sequence
    scheduled: int  # token slots it holds this step: `pending` + room for drafts
    pending: int  # tokens of seq.token_ids it feeds: a prefill chunk, or the last sampled token (the anchor)
    # drafting (SpeculativeDecoder.draft): tokens fed after the anchor, and what verification needs
    draft: list[int] = field(default_factory=list)
    draft_info: dict | None = None  # draft probabilities (sampled requests), confidence logits, lookup match
    # the forward (ModelRunner.execute): its logits rows; None: it does not sample this step (a prefill chunk)
    logits_row: int | None = None
    num_logits: int = 0
    fed: int = 0  # tokens whose KV and drafter context the forward wrote: pending + len(draft)
    accepted: int = 0  # drafts verification accepted
    emitted: list = field(default_factory=list)  # (token, logprob) to append at commit
    failure: str | None = None  # why this request fails (alone), in words for its client


@dataclass
class ScheduledBatch:
    rows: list[StepRow] = field(default_factory=list)  # in flat-batch order
    preempted: list[Sequence] = field(default_factory=list)
    # Prompt tokens of requests admitted for the first time that the prefix cache supplied.
    cached_prompt_tokens: int = 0

    @property
    def entries(self) -> list[tuple[Sequence, int]]:
        """(sequence, token slots) pairs."""
        return [(r.seq, r.scheduled) for r in self.rows]

    @property
    def num_tokens(self) -> int:
        return sum(r.scheduled for r in self.rows)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def add(self, seq: Sequence, n: int) -> None:
        self.rows.append(StepRow(seq, n, min(n, seq.num_pending_tokens)))


class ContinuousBatcher:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a request: behind every waiting one of the same or a lower `priority` value (FCFS
        within a priority; lower values first, as vLLM's priority scheduling)."""
        seq.status = SequenceStatus.WAITING
        prio = seq.params.priority
        if not self.waiting or self.waiting[-1].params.priority <= prio:
            self.waiting.append(seq)
            return
        i = next(i for i, s in enumerate(self.waiting) if s.params.priority > prio)
        self.waiting.insert(i, seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of both queues and free its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.kv.free(seq.block_table)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.kv.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def _cache_prompt_blocks(self, seq: Sequence, n: int) -> None:
        """Register the prompt blocks that this step's `n` fed tokens complete (only tokens already
        fixed: the pending ones, never speculative slots)."""
        upto = seq.num_computed_tokens + min(n, seq.num_pending_tokens)
        self.kv.cache_prompt_blocks(seq.block_table, seq.token_ids, seq.num_prompt_tokens, upto)

    def schedule(self, extra_tokens: dict[Sequence, int] | None = None, max_admit: int | None = None) -> ScheduledBatch:
        """Plan one step. `extra_tokens[seq]` asks for speculative slots beyond the next token;
        `max_admit`: most waiting requests to admit this step (None: as many as fit; speed floors)."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_pending_tokens, budget)
            if not seq.is_prefill and extra_tokens:
                n = min(n + extra_tokens.get(seq, 0), budget)
            total = seq.num_computed_tokens + n
            while not self.kv.can_grow(seq.block_table, total):
                # the latest admitted of the highest priority value (the least urgent) goes first
                victim = max(
                    (s for s in reversed(self.running) if id(s) not in scheduled and s is not seq),
                    key=lambda s: s.params.priority, default=None,
                )
                if victim is None:
                    break
                self._preempt(victim, batch)
            if not self.kv.can_grow(seq.block_table, total):
                self._preempt(seq, batch)
                continue  # running[i] is now the next sequence
            self.kv.grow(seq.block_table, total)
            self._cache_prompt_blocks(seq, n)
            batch.add(seq, n)
            scheduled.add(id(seq))
            budget -= n
            i += 1
        if batch.preempted:
            return batch  # no admissions while memory is short
        admitted = 0
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and (
                max_admit is None or admitted < max_admit):
            seq = self.waiting[0]
            hit = 0
            if seq.num_computed_tokens == 0:
                hit = self.kv.match_prefix(seq.block_table, seq.token_ids, seq.num_prompt_tokens)
                seq.num_computed_tokens = hit
            n = min(seq.num_pending_tokens, budget)
            total = seq.num_computed_tokens + n
            # Keep a block in reserve while others run, so their decodes can grow.
            if not self.kv.can_grow(seq.block_table, total, reserve=1 if self.running else 0):
                if hit:  # give the shared blocks back until it is admitted
                    self.kv.free(seq.block_table)
                    seq.num_computed_tokens = 0
                break
            if self.kv.prefix_caching:
                self.kv.count_lookup(len(seq.token_ids), hit)
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = hit
                    batch.cached_prompt_tokens += hit
            self.waiting.popleft()
            self.kv.grow(seq.block_table, total)
            self._cache_prompt_blocks(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
            admitted += 1
        return batch
