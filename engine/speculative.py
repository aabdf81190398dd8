"""DSpark speculative decoding inside the engine step: drafting and lossless verification.

Per step (DESIGN.md steps 2-6): the batcher has reserved up to 1 + cap slots
for each decoding request; `DraftProposer.propose` runs ONE drafter pass for
all of them (backbone over [anchor, mask...], then the sequential head
sampling x1..xg for all requests at once, with confidences); the policy picks
l per request; the target verifies [anchor, x1..xl] in the step's single
forward; `verify` accepts/rejects (greedy or rejection sampling with residual
resampling and the bonus token). The drafter's context pool is written from
the target's hidden states of every fed token, and rolled back together with
the target KV because both are indexed by the same block table.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from dspark_serve.models.dspark import DSparkDrafter, check_context_window
from dspark_serve.scheduler.prefix import step_rate

from .lookup import LookupStats, TokenArrays, find_match, prefer_copy
from .acceptance_log import AcceptanceLogWriter
from .sampler import sample_from_probs, sampling_tensors, warp_probs
from .structured import apply_mask


log = logging.getLogger(__name__)

VERIFICATION_POLICIES = ("scheduled", "async", "threshold", "fixed", "off")


@dataclass
class SpecConfig:
    method: str = "none"  # "dspark" | "none"
    model: str | None = None  # drafter directory
    num_speculative_tokens: int | None = None  # gamma; default: the drafter's block_size
    verification: str = "scheduled"  # scheduled | async | threshold | fixed | off
    threshold: float = 0.5  # for "threshold"
    draft_skipping: bool = True  # stop drafting for requests whose drafts do not pay (probed again later)
    online_calibration: bool = True  # refit the confidence temperatures from live verification outcomes
    calibration: str | None = None  # calibration.json (default: the one beside the drafter, if any)
    # seeded sampled requests decode without drafts, so their output does not depend on load
    reproducible_seeds: bool = True
    # the drafter's context window: None keeps its config.json's, 0 lets it see the whole context
    draft_context_window: int | None = None
    # context lookup (engine/lookup.py): drafts copied from the request's own context where its last
    # n tokens (prompt_lookup_min <= n <= prompt_lookup_max) occurred before; 0 turns it off
    prompt_lookup_max: int = 8
    prompt_lookup_min: int = 1

    KEYS = ("method", "model", "num_speculative_tokens", "verification", "threshold", "draft_skipping",
            "online_calibration", "calibration", "reproducible_seeds", "draft_context_window",
            "prompt_lookup_max", "prompt_lookup_min")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SpecConfig":
        if not d:
            return cls()
        unknown = set(d) - set(cls.KEYS)
        if unknown:
            raise ValueError(f"unknown speculative_config keys {sorted(unknown)}; known: {list(cls.KEYS)}")
        method = d.get("method", "dspark" if d.get("model") else "none")
        if method not in ("dspark", "none"):
            raise ValueError(f"speculative_config method must be 'dspark' or 'none', got {method!r}")
        if method == "dspark" and not d.get("model"):
            raise ValueError("speculative_config method 'dspark' needs a drafter 'model' path")
        n = d.get("num_speculative_tokens")
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError("num_speculative_tokens must be a positive integer")
        verification = d.get("verification", "scheduled")
        if verification not in VERIFICATION_POLICIES:
            raise ValueError(f"verification must be one of {VERIFICATION_POLICIES}, got {verification!r}")
        window = d.get("draft_context_window")
        check_context_window(window, override=True)
        lookup_max = d.get("prompt_lookup_max", cls.prompt_lookup_max)
        lookup_min = d.get("prompt_lookup_min", cls.prompt_lookup_min)
        for key, v in (("prompt_lookup_max", lookup_max), ("prompt_lookup_min", lookup_min)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {v!r}")
        if lookup_max and not 1 <= lookup_min <= lookup_max:
            raise ValueError(f"prompt_lookup_min must be between 1 and prompt_lookup_max ({lookup_max}), got {lookup_min}")
        return cls(method, d.get("model"), n, verification, float(d.get("threshold", 0.5)),
                   bool(d.get("draft_skipping", True)), bool(d.get("online_calibration", True)),
                   d.get("calibration"), bool(d.get("reproducible_seeds", True)), window, lookup_max, lookup_min)

    @property
    def enabled(self) -> bool:
        return self.method == "dspark"


@dataclass
class Drafts:
    tokens: torch.Tensor  # [R, g] long
    confidence_logits: torch.Tensor | None  # [R, g] confidence-head logits; None without a confidence head
    probs: torch.Tensor | None  # [R, g, V] warped draft distributions (None rows for greedy requests)
    # [R, g] confidence logits along the drafter's ARGMAX path: fixed before any draft token is
    # sampled, so the choice between this draft and a copied one may read them (for greedy rows the
    # drafted path is the argmax path; rows not asked for in `propose` hold the drafted path's)
    choice_logits: torch.Tensor | None = None
    # per row, how many leading drafts its grammar allows (None: every row unconstrained); a
    # constrained row whose grammar left the draft vocabulary nothing stops there
    valid: list[int] | None = None
    # [R, g] bool: positions where the row's grammar allowed exactly one token, drafted as that
    # token (a point mass), which verification accepts with certainty (None: no constrained row)
    forced: torch.Tensor | None = None


def _draw(probs: torch.Tensor, generators: list) -> torch.Tensor:
    """The drafter's draws: one per row with each row's own generator (None: global RNG), by the
    sampler's one draw rule (`sample_from_probs`). A seam the distribution tests replace."""
    return sample_from_probs(probs, generators)


def _draw_one(p: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from the distribution `p` [V] (verification's residual and bonus tokens)."""
    return int(sample_from_probs(p.unsqueeze(0), [generator])[0])


class DraftProposer:
    def __init__(self, drafter: DSparkDrafter, num_slots: int, dtype: torch.dtype, device: torch.device, gamma: int):
        self.drafter = drafter
        cfg = drafter.config
        self.gamma = gamma
        # Draft constrained rows under their grammar. False (a measurement of what masking is
        # worth: bench_structured) drafts greedy constrained rows freely and lets verification cut
        # at the first disallowed draft; sampled rows are always masked (a cut of a sampled
        # distribution draft would bias the residual).
        self.mask_drafts = True
        self.layer_ids = list(cfg.target_layer_ids)
        self.pool = torch.zeros(cfg.num_hidden_layers, 2, num_slots, cfg.num_key_value_heads, cfg.head_dim,
                                dtype=dtype, device=device)
        # `draft_pass` compiled per shape class (engine/compiled_step.py: CompiledDraft), set by the
        # model runner where the target's decode step compiles; None: eager
        self.compiled = None

    @staticmethod
    def bytes_per_token(drafter: DSparkDrafter, dtype: torch.dtype) -> int:
        c = drafter.config
        return c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * dtype.itemsize

    def context_entries(self, aux_hidden: list[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        """The drafter context K/V of fed target positions, [draft layers, 2, N, Hkv, D] in the
        pool's dtype (a pure function: the compiled decode step computes it in its graph)."""
        h_ctx = self.drafter.context_features(aux_hidden)
        return torch.stack([torch.stack((k, v)) for k, v in self.drafter.context_kv(h_ctx, positions)]).to(self.pool.dtype)

    def write_entries(self, slots: torch.Tensor, entries: torch.Tensor) -> None:
        """Cache `context_entries` at the fed tokens' slots (the target KV's own slots)."""
        self.pool.index_copy_(2, slots, entries)

    @torch.inference_mode()
    def write_context(self, aux_hidden: list[torch.Tensor], positions: torch.Tensor, slots: torch.Tensor) -> None:
        """Cache the drafter's context K/V of every fed target position."""
        self.write_entries(slots, self.context_entries(aux_hidden, positions))

    def pass_inputs(self, seqs: list, block_size: int):
        """The drafter pass's index tensors for `seqs` (all in pure decode: one pending token, the
        anchor): (anchors [R], their positions [R], the pool slot of every context entry a block sees
        [R * C] (padding: slot 0, masked), the mask [R, C]), C the longest context seen."""
        r = len(seqs)
        ctx_lens = [s.num_computed_tokens for s in seqs]
        window = self.drafter.config.draft_context_window
        # with a window, a block sees (and this gathers) only the last `window` context positions
        starts = [max(0, n - window) if window else 0 for n in ctx_lens]
        used = [n - s0 for n, s0 in zip(ctx_lens, starts)]
        max_ctx = max(used)
        j = torch.arange(max_ctx)
        gather = torch.zeros(r, max_ctx, dtype=torch.long)
        for i, s in enumerate(seqs):
            blocks = torch.tensor(s.block_table.blocks, dtype=torch.long)
            q = j[:used[i]] + starts[i]
            gather[i, :used[i]] = blocks[q // block_size] * block_size + q % block_size
        dev = self.pool.device
        mask = (j[None, :] < torch.tensor(used)[:, None]).to(dev)
        anchors = torch.tensor([s.token_ids[-1] for s in seqs], dtype=torch.long, device=dev)
        anchor_pos = torch.tensor(ctx_lens, dtype=torch.long, device=dev)
        return anchors, anchor_pos, gather.reshape(-1).to(dev), mask

    def draft_pass(self, pool: torch.Tensor, anchors: torch.Tensor, anchor_pos: torch.Tensor, flat: torch.Tensor,
                   mask: torch.Tensor, gamma: int, chain: bool):
        """The drafter's pass, a pure function of tensors (engine/compiled_step.py compiles it): the
        block's hidden states over the gathered context, the base logits U of its `gamma` positions,
        and with `chain` the sequential stage along the argmax path (every row greedy and
        unconstrained). -> (h [R, g, d], U [R, g, V'] float32, None, None) without `chain`, (None,
        None, tokens [R, g] target ids, confidence logits [R, g] or None) with it."""
        d = self.drafter
        shape = (*mask.shape, *pool.shape[3:])
        ctx = [(pool[i, 0].index_select(0, flat).view(shape), pool[i, 1].index_select(0, flat).view(shape))
               for i in range(pool.shape[0])]
        h = d.backbone(anchors, anchor_pos, ctx, mask, gamma)  # [R, g, d]
        base = d.base_logits(h).float()  # [R, g, V'] (V' = the draft vocabulary, V when unrestricted)
        if not chain:
            return h, base, None, None
        prev, state, tokens, conf = anchors, None, [], []  # (h and U stay inside the pass)
        for k in range(gamma):
            bias, c, state = d.sequential_step(prev, h[:, k], state)
            prev = d.to_target_ids((base[:, k] if bias is None else base[:, k] + bias.float()).argmax(dim=-1))
            tokens.append(prev)
            if c is not None:
                conf.append(c.float())
        return None, None, torch.stack(tokens, dim=1), torch.stack(conf, dim=1) if conf else None

    @torch.inference_mode()
    def propose(self, seqs: list, block_size: int, gamma: int, choice_rows=()) -> Drafts:
        """Draft `gamma` tokens for each sequence (all in pure decode: one pending token, the anchor).
        For the rows in `choice_rows` the drafter's argmax path is followed too, for `choice_logits`."""
        dev = self.pool.device
        r = len(seqs)
        d = self.drafter
        anchors, anchor_pos, flat, ctx_mask = self.pass_inputs(seqs, block_size)
        # structured outputs: constrained rows draft under their grammar (masked draft logits, the
        # grammar advanced along the drafted tokens, rolled back after the loop)
        constrained = [i for i, s in enumerate(seqs) if getattr(s, "grammar", None) is not None
                       and (self.mask_drafts or not s.params.greedy)]
        # every row greedy and unconstrained (the common case): the pass drafts them whole
        chain = not constrained and all(s.params.greedy for s in seqs)
        run = self.compiled if self.compiled is not None else self.draft_pass
        h, base, tokens, conf = run(self.pool, anchors, anchor_pos, flat, ctx_mask, gamma, chain)
        if chain:
            return Drafts(tokens, conf, None, conf)
        greedy = [s.params.greedy for s in seqs]
        stochastic = [i for i, g in enumerate(greedy) if not g]
        warp_args = sampling_tensors([seqs[i].params for i in stochastic], dev, base.shape[-1]) if stochastic else None
        gens = [seqs[i].generator for i in stochastic]
        tokens = torch.empty(r, gamma, dtype=torch.long, device=dev)
        conf = torch.zeros(r, gamma, device=dev) if d.confidence_head is not None else None
        vocab = d.target_vocab_size
        probs = torch.zeros(r, gamma, vocab, device=dev) if stochastic else None
        # A sampled row's confidences c_2.. depend on its sampled tokens (through the Markov feature);
        # its argmax path's do not. Only those rows need the second path (docs/scheduler.md).
        follow = [i for i in choice_rows if not greedy[i]] if conf is not None and d.confidence_head.with_markov else []
        follow_conf = torch.zeros(len(follow), gamma, device=dev) if follow else None
        prev, state = anchors, None
        follow_prev, follow_state = anchors[follow], None
        valid = [gamma] * r if constrained else None
        advanced = {i: 0 for i in constrained}
        mask = torch.empty(vocab, dtype=torch.bool) if constrained else None
        forced = torch.zeros(r, gamma, dtype=torch.bool) if constrained else None
        for k in range(gamma):
            bias, c, state = d.sequential_step(prev, h[:, k], state)
            logits = base[:, k] if bias is None else base[:, k] + bias.float()
            if c is not None:
                conf[:, k] = c.float()
            only = {}  # row -> the one token its grammar allows here
            if constrained:
                if bias is None:
                    logits = logits.clone()  # base[:, k] is a view of the block's logits
                for i in constrained:
                    if valid[i] == gamma:
                        seqs[i].grammar.fill_mask(mask)
                        if int(mask.sum()) == 1:  # forced (a JSON key, a bracket): drafted as it is,
                            only[i] = int(mask.to(torch.uint8).argmax())  # in the draft vocabulary or not
                            continue
                        allowed = mask if d.d2t is None else mask[d.d2t]
                        if not bool(allowed.any()):
                            valid[i] = k  # nothing the grammar allows is in the draft vocabulary
                            continue
                        apply_mask(logits[i], allowed.to(logits.device))
            x = logits.argmax(dim=-1)
            if stochastic:
                p = warp_probs(logits[stochastic], *warp_args)
                x[stochastic] = _draw(p, gens)
                if d.d2t is not None:  # zero draft mass outside V': rejection sampling stays exact
                    full = p.new_zeros(p.shape[0], vocab)
                    full[:, d.d2t] = p
                    p = full
                probs[stochastic, k] = p
            x = d.to_target_ids(x)
            for i, t in only.items():  # a point mass at the forced token, for greedy and sampled rows
                x[i] = t
                forced[i, k] = True
                if probs is not None and not greedy[i]:
                    probs[i, k].zero_()
                    probs[i, k, t] = 1.0
            tokens[:, k] = x
            prev = x
            for i in constrained:
                if valid[i] == gamma:
                    if seqs[i].grammar.accept(int(x[i])):
                        advanced[i] += 1
                    else:
                        # unreachable when masking works: x_k was drawn from a distribution with no
                        # mass outside the grammar (a guard, not a choice that reads x_k)
                        valid[i] = k
            if follow:
                fbias, fc, follow_state = d.sequential_step(follow_prev, h[follow, k], follow_state)
                follow_conf[:, k] = fc.float()
                follow_prev = d.to_target_ids((base[follow, k] + fbias.float()).argmax(dim=-1))
        for i, n in advanced.items():
            seqs[i].grammar.rollback(n)
        choice = conf
        if follow:
            choice = conf.clone()
            choice[follow] = follow_conf
        return Drafts(tokens, conf, probs, choice, valid, forced)


def acceptance_probability(p_x: float, q_x: float) -> float:
    """A drafted token x is accepted with probability min(1, p(x) / q(x)) (p: target, q: draft)."""
    return min(1.0, p_x / q_x) if q_x > 0 else 0.0


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a rejection samples from: norm(max(0, p - q)) (p itself where q covers p everywhere)."""
    residual = (p - q).clamp_min(0)
    total = float(residual.sum())
    return p if total <= 0 else residual / total


def verify(
    params,
    target_logits: torch.Tensor,  # [l+1, V] raw target logits for [anchor, x1..xl]
    draft_tokens: list[int],  # x1..xl
    draft_probs: torch.Tensor | None,  # [>=l, V] warped draft distributions (stochastic requests)
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Returns (number of accepted drafts a, the next token): output = x1..xa + [next]."""
    l = len(draft_tokens)
    logits = target_logits.float()
    if params.greedy:
        best = logits.argmax(dim=-1).tolist()
        a = 0
        while a < l and draft_tokens[a] == best[a]:
            a += 1
        return a, best[a]
    dev = logits.device
    p = warp_probs(logits, *sampling_tensors([params] * logits.shape[0], dev, logits.shape[-1]))
    for k in range(l):
        x = draft_tokens[k]
        u = float(torch.rand(1, generator=generator, device=dev))
        if u < acceptance_probability(float(p[k, x]), float(draft_probs[k, x])):
            continue
        return k, _draw_one(residual_distribution(p[k], draft_probs[k]), generator)
    return l, _draw_one(p[l], generator)


CALIBRATION_MODES = ("greedy", "sampled")


def calibration_mode(params) -> str:
    """Which acceptance rule a request's rounds follow, hence which online calibrator is theirs."""
    return "greedy" if params.greedy else "sampled"


class SpeculativeDecoder:
    """Everything speculation needs around the step: per-request caps, draft skipping,
    calibrated confidences, the verification-length policy with its cost table, and
    the bookkeeping after verification (statistics, online calibration, the
    acceptance log that `dspark calibrate` reads)."""

    def __init__(self, spec: SpecConfig, proposer: DraftProposer, gamma: int, stats, max_model_len: int,
                 cost_table=None, drafter_dir: str | None = None, record_path: str | None = None, floors=None):
        from pathlib import Path

        from dspark_serve.scheduler import (DraftBudget, DraftedSteps, DraftForecast, DraftSkipper, OnlineCalibrator,
                                            PlainSteps, STSCalibrator, make_policy)

        self.spec = spec
        self.proposer = proposer
        self.gamma = gamma
        self.stats = stats
        self.max_model_len = max_model_len
        self.cost_table = cost_table
        options = {"threshold": spec.threshold} if spec.verification == "threshold" else {}
        self.policy = make_policy(spec.verification, gamma, cost_table=cost_table, **options)
        cal_path = spec.calibration or (Path(drafter_dir) / "calibration.json" if drafter_dir else None)
        self.calibrator = STSCalibrator.from_json(cal_path) if cal_path and Path(cal_path).exists() else None
        # The online fit starts from the file's temperatures (or T = 1) and refits in the background, one
        # per acceptance rule: a greedy round accepts a draft when it is the argmax, a sampled one with
        # probability min(1, p/q), so the same confidence logit means different odds in the two.
        self.online = {mode: OnlineCalibrator(gamma, initial=self.calibrator, background=True)
                       for mode in CALIBRATION_MODES} if spec.online_calibration else None
        self.skipper = DraftSkipper() if spec.draft_skipping else None
        # load-aware drafting (scheduler/draft_budget.py) for the policies that weigh costs
        load_aware = cost_table is not None and hasattr(self.policy, "plan_with_stats")
        # ... and its forecast: the best case of the acceptance so far, priced from the profile
        self.forecast = DraftForecast(gamma, cost_table) if load_aware else None
        self.budget = DraftBudget(gamma, forecast=self.forecast.may_pay) if load_aware else None
        self._plain_steps = PlainSteps()  # what a drafted step is judged against
        self._drafted_steps = DraftedSteps()  # the realised side of the verdict
        self.lookup = LookupStats(spec.prompt_lookup_max, gamma) if spec.prompt_lookup_max else None
        self._token_arrays = TokenArrays()
        self._draft_seconds = 0.0  # drafter pass of the current step
        self._draft_share = None  # EMA of the drafter's share of a step
        self._record = AcceptanceLogWriter(record_path) if record_path else None
        self.draft_failures = 0  # steps whose drafting raised and fell back to plain decoding
        self._verdict = None  # this step's plan, for DraftBudget: judged once the step ends (end_step)
        self._drafted = False  # whether the drafter ran this step
        self._expected = 0.0  # this step's rounds: tokens their verified lengths yield on average (the verdict's)
        self._decoding = 0  # decoding requests of this step (caps)
        self._window_level = None  # the load level of the drafted steps in _drafted_steps
        # speed floors (scheduler/sla.py): requests below theirs weigh more in the plan (Algorithm 1's
        # policy only)
        self.floors = floors
        self._floor_plans = floors is not None and getattr(self.policy, "name", None) == "scheduled"

    # ---------------------------------------------------------------- before the forward

    def caps(self, running, waiting=(), token_budget: int | None = None, max_num_seqs: int | None = None) -> dict:
        """Most drafts each decoding request may verify this step (absent: none). Decided before
        drafting, from the queues' state and the history of earlier steps only. With the step's
        `token_budget`, verification slots only take what prefill (running prompts not yet
        prefilled, and the waiting ones that a free seat of `max_num_seqs` could admit) leaves over:
        drafts never delay a first token."""
        decoding = [s for s in running if s.num_pending_tokens == 1]
        if not decoding:
            return {}
        self.stats.spec_num_decode_steps += len(decoding)
        # load-aware drafting: how many positions this step drafts (0: the recent plans say it does not pay)
        positions = self.gamma
        self._decoding = len(decoding)  # the load the step's verdict is of
        if self.budget is not None:
            refused = self.budget.forecast_steps
            positions = self.budget.positions(len(decoding))
            level = self.budget.level(len(decoding))
            if not positions:
                self.stats.spec_budget_plain_steps += 1
            # counted here, not copied: a counter on /metrics, and step_changed starts a new budget
            self.stats.spec_budget_forecast_steps += self.budget.forecast_steps - refused
            if positions and level != self._window_level:  # the window's verdicts were of another load
                self._drafted_steps.clear()
                self._window_level = level
        if token_budget is not None and positions:
            prefill = sum(s.num_pending_tokens for s in running if s.num_pending_tokens > 1)
            seats = len(waiting) if max_num_seqs is None else max(0, max_num_seqs - len(running))
            prefill += sum(s.num_pending_tokens for s in itertools.islice(waiting, seats))
            spare = token_budget - len(decoding) - prefill
            positions = min(positions, max(0, spare) // len(decoding))
        if positions == 0:
            return {}
        if self.skipper is not None:
            keep = self.skipper.select([s.request_id for s in decoding])
            decoding = [s for s, k in zip(decoding, keep) if k]
        caps = {}
        for seq in decoding:
            p = seq.params
            cap = positions if p.max_draft_tokens is None else min(positions, p.max_draft_tokens)
            if p.has_penalties:
                cap = 0  # penalties depend on every previous token, drafts included
            if p.seed is not None and not p.greedy and self.spec.reproducible_seeds:
                # a seeded sample must be reproducible: with drafts, the random draws it consumes
                # depend on the verification lengths, which depend on load and timing
                cap = 0
            if p.max_tokens is not None:
                cap = min(cap, p.max_tokens - seq.num_output_tokens - 1)
            cap = min(cap, self.max_model_len - len(seq.token_ids) - 1)
            if cap > 0:
                caps[seq] = cap
        return caps

    def confidences(self, logits: torch.Tensor | None, seqs: list) -> torch.Tensor:
        """Calibrated conditional confidences c_k of `seqs`' rows (ones without a confidence head)."""
        if logits is None:
            return torch.ones(len(seqs), self.gamma)
        if self.online is not None:
            logits = logits.cpu()
            out = torch.empty(logits.shape, dtype=torch.float32)
            for mode in CALIBRATION_MODES:
                rows = [i for i, s in enumerate(seqs) if calibration_mode(s.params) == mode]
                if rows:
                    out[rows] = torch.as_tensor(self.online[mode].apply(logits[rows]), dtype=torch.float32)
            return out
        if self.calibrator is not None:
            return torch.as_tensor(self.calibrator.apply(logits.cpu()), dtype=torch.float32)
        return torch.sigmoid(logits.float().cpu())

    def draft(self, rows, block_size: int) -> None:
        """Draft and plan: one drafter pass for every decoding row with room for drafts (context
        lookup offering its copies), then the policy's verification lengths. Sets `draft` and
        `draft_info` of the rows that verify drafts this step; the others decode plainly."""
        dec = [r for r in rows if r.seq.num_pending_tokens == 1 and r.scheduled > 1]
        if not dec:
            return
        try:
            self._draft(rows, dec, block_size)
        except Exception as e:
            # Drafting is an optimisation: if it fails, this step decodes plainly (lossless) and
            # no request pays for it. Logged, sparingly if it keeps failing.
            for r in dec:
                r.draft, r.draft_info = [], None
            self.draft_failures += 1
            if self.draft_failures == 1 or self.draft_failures % 1000 == 0:
                log.error("drafting failed (%d times so far); this step decodes without drafts",
                          self.draft_failures, exc_info=e)
            self._draft_seconds = 0.0

    def _draft(self, rows, dec, block_size: int) -> None:
        # Algorithm 1's B starts from every token of the forward that is not a drafting request's:
        # prefill chunks and the decoding requests that do not draft this step (skipped, penalties...)
        base_tokens = sum(r.pending for r in rows) - len(dec)
        # ... and the tokens those other rows emit this step: one per row that samples (a decoding
        # request that does not draft, a prompt whose last chunk this is). The plan weighs a draft
        # against slowing them as well as the drafting requests.
        drafting = set(map(id, dec))
        other_tokens = sum(1 for r in rows if id(r) not in drafting
                           and r.seq.num_computed_tokens + r.pending == len(r.seq.token_ids))
        seqs = [r.seq for r in dec]
        caps = [r.scheduled - 1 for r in dec]
        gamma = max(caps)
        copies = self._copies(seqs, gamma) if self.lookup is not None else {}
        self._expected = 0.0
        t0 = time.perf_counter()
        d = self.proposer.propose(seqs, block_size, gamma, choice_rows=list(copies))
        self._draft_seconds = time.perf_counter() - t0
        self._drafted = True
        self.stats.spec_drafted_steps += 1
        conf = self.confidences(d.confidence_logits, seqs)
        if d.forced is not None:
            # a forced draft is the only token the masked target can give: accepted for certain
            # (a function of the draft, fixed before verification samples anything)
            conf[:, :d.forced.shape[1]][d.forced] = 1.0
        matched = self._offer_lookup(seqs, caps, d, conf, copies) if copies else {}
        if d.valid is not None:  # constrained rows verify only drafts their grammar allows
            caps = [c if i in matched else min(c, v) for i, (c, v) in enumerate(zip(caps, d.valid))]
        if hasattr(self.policy, "plan_with_stats"):
            # The drafting pass is done: its seconds are a constant of this step, which the cost table
            # (the verification forward alone) does not hold; the plan adds them to every B it weighs.
            floors = {}
            if self._floor_plans:  # speed floors: weights from each request's speed so far (history only)
                now = time.monotonic()
                floors = {"weights": [self.floors.weight(s.floor_view(now)) if s.floor > 0.0 else 1.0 for s in seqs]}
            plan = self.policy.plan_with_stats(conf, caps, base_tokens, fixed_seconds=self._draft_seconds,
                                               other_tokens=other_tokens, **floors)
            lengths = list(plan.lengths)
            if self.floors is not None:
                self.floors.floor_draft_tokens += plan.weighted_drafts
            self.stats.spec_last_expected_tokens = float(plan.expected_tokens)
            self.stats.spec_last_planned_tokens = int(plan.num_tokens)
            if self.cost_table is not None:
                self.stats.spec_last_sps = float(step_rate(self.cost_table, plan.num_tokens, self._draft_seconds))
            self.stats.spec_capacity = int(getattr(self.policy, "capacity", 0) or 0)
            if self.budget is not None:  # judged once the step has ended (end_step)
                self._verdict = {"r": len(seqs), "batch": self._decoding, "base": base_tokens,
                                 "prefill": sum(r.pending for r in rows if r.seq.num_pending_tokens > 1), "other": other_tokens, "tokens": plan.num_tokens,
                                 "longest": max(lengths),
                                 "undrafted": sum(1 for l in lengths if l <= 0)}
        else:
            lengths = self.policy.plan(conf, caps, base_tokens)
            surv = torch.cumprod(conf[:, :gamma], dim=1)
            self.stats.spec_last_expected_tokens = float(
                sum(1 + float(surv[i, :l].sum()) for i, l in enumerate(lengths)))
        st = self.stats
        for i, (row, l) in enumerate(zip(dec, lengths)):
            st.spec_num_proposed_tokens += gamma
            st.spec_verify_length_counts[l] = st.spec_verify_length_counts.get(l, 0) + 1
            if l <= 0:
                if self.skipper is not None:
                    self.skipper.record(row.seq.request_id, 0)
                continue
            row.draft = d.tokens[i, :l].tolist()
            n = matched.get(i, 0)
            row.draft_info = {
                "probs": d.probs[i, :l] if d.probs is not None and not row.seq.params.greedy else None,
                # online calibration learns unconstrained acceptance: constrained rounds (forced
                # positions, masked targets) would bias it
                "logits": None if d.confidence_logits is None or n or getattr(row.seq, "grammar", None) is not None
                else d.confidence_logits[i, :gamma].tolist(),
                "lookup": n,  # the match length of a draft copied from the context; 0: the drafter's
            }

    def _copies(self, seqs, gamma: int) -> dict[int, tuple[int, list[int]]]:
        """{row: (match length n, the gamma tokens after the match)} of the requests whose context has
        a match: a function of the context alone, known before anything is drafted."""
        spec = self.spec
        out = {}
        for i, seq in enumerate(seqs):
            if getattr(seq, "grammar", None) is not None and not seq.params.greedy:
                continue  # the choice would read the argmax path, which a grammar changes: drafter only
            m = find_match(self._token_arrays.get(seq.request_id, seq.token_ids),
                           spec.prompt_lookup_max, spec.prompt_lookup_min, gamma)
            if m is not None:
                out[i] = m
        return out

    @torch.inference_mode()
    def _offer_lookup(self, seqs, caps, d: Drafts, conf: torch.Tensor, copies: dict) -> dict[int, int]:
        """Where a request's context promises more accepted tokens than the drafter does, its draft
        becomes the copied one (tokens, confidences and, for sampled requests, a point-mass draft
        distribution replaced in place). Returns {row: match length} of the rows replaced.

        The drafter's promise is read along its ARGMAX path (`Drafts.choice_logits`), never from the
        tokens it sampled: keeping a sampled draft only when its own tokens look good would bias
        which tokens get verified, and sampled output would no longer follow the target."""
        rows = list(copies)  # only the rows with a copy compete
        logits = d.choice_logits[rows] if d.choice_logits is not None else None
        choice = dict(zip(rows, self.confidences(logits, [seqs[i] for i in rows])))
        gamma = d.tokens.shape[1]
        matched = {}
        for i, (n, tokens) in copies.items():
            seq = seqs[i]
            c = self.lookup.confidences(seq.params.greedy, n)[:gamma]
            if not prefer_copy(c, choice[i].numpy(), caps[i]):
                continue
            matched[i] = n
            tok = torch.tensor(tokens, dtype=torch.long, device=d.tokens.device)
            d.tokens[i] = tok
            conf[i] = torch.as_tensor(c, dtype=conf.dtype)
            if d.probs is not None and not seq.params.greedy:
                d.probs[i].zero_()
                d.probs[i, torch.arange(gamma, device=tok.device), tok] = 1.0
        return matched

    # ---------------------------------------------------------------- after verification

    def record_round(self, seq, num_verified: int, num_accepted: int, info: dict) -> None:
        """After verification: statistics, draft skipping, lookup acceptance, online calibration and
        the acceptance log of one request's round."""
        st = self.stats
        st.spec_num_drafts += 1
        st.spec_num_draft_tokens += num_verified
        st.spec_num_accepted_tokens += num_accepted
        st.spec_last_realised_tokens += num_accepted + 1
        if self.forecast is not None:
            # the verdict's tokens: this round's verified length at the acceptance seen before it
            self._expected += self.forecast.expected_tokens(num_verified)
            self.forecast.record(num_verified, num_accepted)
        if len(st.spec_accepted_per_pos) < num_verified:
            st.spec_accepted_per_pos.extend([0] * (num_verified - len(st.spec_accepted_per_pos)))
        for k in range(num_accepted):
            st.spec_accepted_per_pos[k] += 1
        if self.skipper is not None:
            # realised acceptance, not the confidences' promise: an uncalibrated (or untrained)
            # confidence head must not keep a useless drafter running
            self.skipper.record(seq.request_id, num_accepted)
        n = info.get("lookup", 0)
        if n:
            st.spec_lookup_num_drafts += 1
            st.spec_lookup_num_draft_tokens += num_verified
            st.spec_lookup_num_accepted_tokens += num_accepted
            self.lookup.record(seq.params.greedy, n, num_verified, num_accepted)
            if self._record is not None:
                self._record.lookup_round(n, num_verified, num_accepted)
            return
        logits = info["logits"]
        if logits is not None:
            if self.online is not None:
                self.online[calibration_mode(seq.params)].record(logits, num_verified, num_accepted)
            if self._record is not None:
                self._record.drafter_round(logits, num_verified, num_accepted)

    def finished(self, seq) -> None:
        self._token_arrays.forget(seq.request_id)
        if self.skipper is not None:
            self.skipper.forget(seq.request_id)

    def step_changed(self) -> None:
        """The step got faster or slower for good (its graphs compiled): what the draft budget
        learnt from the former step's times (plain prices, verdicts, backoffs) no longer holds."""
        from dspark_serve.scheduler import DraftBudget, DraftedSteps, PlainSteps

        if self.budget is not None:  # the forecast's acceptance history still holds; its table is re-profiled
            self.budget = DraftBudget(self.gamma, max_backoff=self.budget.max_backoff, forecast=self.budget.forecast,
                                      explore=self.budget.explore)
        self._plain_steps, self._drafted_steps = PlainSteps(), DraftedSteps()
        self._window_level = None

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """After the forward (and the plain rows' sampling): the cost table and the skipper learn
        the step's cost."""
        if self._verdict is not None:
            self._verdict["draft_seconds"] = self._draft_seconds
            self._verdict["forward_seconds"] = seconds - self._draft_seconds
        if self.cost_table is not None and num_tokens > 0:
            # the table holds the verification forward only: this step's drafting pass comes off
            # (steps without drafts and steps with them then land on one scale)
            verify_seconds = seconds - self._draft_seconds
            if verify_seconds > 0:
                self.cost_table.observe(num_tokens, verify_seconds)
            if self._draft_seconds > 0 and self._verdict is not None:
                self.cost_table.observe_draft(self._verdict["r"], self._draft_seconds)
        if self.skipper is not None and self._draft_seconds and seconds > 0:
            # Drafting pays for a request when its accepted drafts per round exceed r / (1 - r),
            # r = the drafter's share of the step time: the bar the skipper holds requests to.
            r = min(self._draft_seconds / seconds, 0.9)
            self._draft_share = r if self._draft_share is None else 0.9 * self._draft_share + 0.1 * r
            self.skipper.min_gain = max(0.1, self._draft_share / (1.0 - self._draft_share))
        self._draft_seconds = 0.0

    def end_step(self, num_tokens: int, seconds: float) -> None:
        """After verification and commit, with the whole step's seconds: a drafted step is judged
        for the draft budget; a step that drafted nothing prices the plain alternative."""
        drafted, self._drafted = self._drafted, False
        if self.budget is None:
            return
        if self._verdict is not None:
            self._judge_drafting(seconds)
        elif drafted:
            self._plain_steps.tick()
        elif num_tokens > 0:
            self._plain_steps.observe(num_tokens, seconds)

    def _judge_drafting(self, seconds: float) -> None:
        """Did drafting pay? The last few drafted steps' realised tokens (the drafting requests'
        accepted drafts + 1 each, one per other row that samples) over their whole seconds, against
        the same rows decoded plainly (`DraftedSteps`): a recently measured plain step of about as
        many tokens (`PlainSteps`), else this step's forward moved along the profiled shape of
        SPS(B) plus the step's other work."""
        v, self._verdict = self._verdict, None
        self._plain_steps.tick()
        if "forward_seconds" not in v or v["forward_seconds"] <= 0 or seconds <= 0:
            return
        r, base, other = v["r"], v["base"], v["other"]
        # what the drafting rows yield: at the acceptance measured over many rounds once there are
        # enough of them, not this step's own luck (DraftedSteps); the step's seconds stay measured
        drafted = self._expected if self.forecast is not None and self.forecast.ready else self.stats.spec_last_realised_tokens
        realised = drafted + v["undrafted"]
        t = self.cost_table
        shape = lambda a, b: t.profiled_sps(a) / t.profiled_sps(b)  # noqa: E731 (seconds(b) / seconds(a))
        plain = self._plain_steps.seconds(r + base, shape)
        measured = plain is not None
        if not measured:
            overhead = max(0.0, seconds - v["draft_seconds"] - v["forward_seconds"])
            plain = v["forward_seconds"] * t.profiled_sps(v["tokens"]) / t.profiled_sps(r + base) + overhead
        unit = None  # a decode step's seconds per token: the plain step's own, unless a prompt chunk rode along
        if v["prefill"] > 0:
            batch = max(1, v["batch"])
            decode = self._plain_steps.seconds(batch, shape)
            unit = (decode if decode is not None else plain * shape(r + base, batch)) / batch
        # the whole step's output, the rows that did not draft included, both ways; priced from
        # the profile, the next step decodes plainly to measure the alternative
        paid = self._drafted_steps.record(realised + other, seconds, r + other, plain, unit=unit)
        self.budget.record(v["longest"], paid, measure_plain=not measured, batch=v["batch"])
        verdicts = self.stats.spec_budget_verdicts
        verdicts["paid" if paid else "lost"] = verdicts.get("paid" if paid else "lost", 0) + 1
        log.debug("draft verdict %s: batch %d, drafting %d, prefill %d, %.1f tokens in %.1f ms against %d in "
                  "%.1f ms plainly (%s)", "paid" if paid else "lost", v["batch"], r, v["prefill"],
                  realised + other, 1e3 * seconds, r + other, 1e3 * plain, "measured" if measured else "profiled")

    def calibration_report(self) -> dict:
        """Live calibration quality, for metrics and /v1/dspark/calibration."""
        out = {"gamma": self.gamma, "file": self.calibrator.to_dict() if self.calibrator is not None else None}
        if self.online is not None:
            out["online"] = {mode: cal.stats() for mode, cal in self.online.items()}
            out["reliability"] = {mode: {k: cal.reliability(k) for k in range(1, self.gamma + 1)}
                                  for mode, cal in self.online.items()}
        if self.lookup is not None:
            out["lookup_acceptance"] = self.lookup.acceptance()
        return out
