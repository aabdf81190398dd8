"""Owns the KV pool tensors and turns a scheduled batch into one model forward."""

from __future__ import annotations

import logging

import torch

from dspark_serve.models.attention import AttentionMetadata, TorchAttentionBackend, kernel_serves
from dspark_serve.models.loader import LoadedModel

from .batcher import StepRow
from .compiled_step import CompiledDraft, CompiledStep, packed_weights, supported
from .speculative import DraftProposer

log = logging.getLogger(__name__)

GiB = 1 << 30


# The most (query, key) pairs that the long queries (prompt chunks) of a step may attend for the
# step to take the compiled forward. The paged-attention kernel runs each query row on its own:
# for a long chunk it is slower than SDPA's tiles, and past about this many pairs the difference
# outweighs the eager dispatch it saves. A step of 15 decodes and one prompt chunk on two cores
# (default model, float32 packed): 16 tokens 99 against 121 ms eager, 128 tokens 336 against 389,
# 256 tokens (32,896 pairs) 811 against 731, 512 tokens 1,830 against 1,238.
PROMPT_PAIRS_IN_STEP = 1 << 14


def long_query_pairs(query_lens: list[int], context_lens: list[int]) -> int:
    """(query, key) pairs that the step's queries longer than a verification block attend (causal)."""
    small = TorchAttentionBackend.SMALL_QUERY
    return sum(q * (c - q) + q * (q + 1) // 2 for q, c in zip(query_lens, context_lens) if q > small)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, block_size: int, kv_cache_memory: int | None, device: torch.device,
                 drafter=None, gamma: int = 0, enforce_eager: bool = False):
        self.model = loaded.model
        self.config = loaded.config
        self.device = device
        self.block_size = block_size
        self.dtype = next(self.model.parameters()).dtype
        cfg = self.config
        per_token = cfg.kv_bytes_per_token(self.dtype.itemsize)
        if drafter is not None:  # the drafter's context pool shares the block tables
            per_token += DraftProposer.bytes_per_token(drafter, self.dtype)
        bytes_per_block = per_token * block_size
        if kv_cache_memory is None:
            kv_cache_memory = self._default_kv_memory()
        self.num_blocks = int(kv_cache_memory // bytes_per_block)
        if self.num_blocks < 1:
            raise ValueError(
                f"--kv-cache-memory {kv_cache_memory} bytes holds no block of {bytes_per_block} bytes"
            )
        # zeros, not empty: masked slots are still multiplied by 0, and 0 * NaN garbage is NaN.
        self.kv = torch.zeros(
            cfg.num_layers, 2, self.num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim,
            dtype=self.dtype, device=device,
        )
        self.kv_caches = [(self.kv[i, 0], self.kv[i, 1]) for i in range(cfg.num_layers)]
        self.proposer = (
            DraftProposer(drafter, self.num_blocks * block_size, self.dtype, device, gamma) if drafter is not None else None
        )
        # Steps of decodes and verification blocks take the model's pure forward, compiled in the
        # background unless enforce_eager (LLMEngine starts it); None: the model has no such forward.
        self.decode_step = None
        # Prompt chunks take that forward too (prefill and mixed steps, compiled like the others)
        # where nothing in it depends on a row's role: every linear takes prompt rows through the
        # packed kernel (float32 activations on our kernel: quant.PackedWeight.all_rows) and the
        # paged-attention kernel attends (its causal loop takes a query of any length; the torch
        # path's mask would be [sequences, 1, longest query, longest context]). Eagerly, a step
        # that carries a prompt chunk paid the dispatch of every op of its decode rows as well:
        # 30-60 ms beyond its tokens at 16 requests on two cores (docs/benchmarks/mixed-step-avx2.md).
        self.prompts_in_step = False
        if supported(self.model, device):
            aux_ids = tuple(self.proposer.layer_ids) if self.proposer is not None else ()
            kernel = kernel_serves(self.dtype, cfg.head_dim, device)
            self.prompts_in_step = kernel and all(p is not None and p.all_rows for p in packed_weights(self.model))
            draft = None
            if self.proposer is not None:  # the drafter's pass compiles with the target's step
                draft = CompiledDraft(self.proposer, gamma, block_size)
            self.decode_step = CompiledStep(self.model, self.kv, aux_ids, block_size, enforce_eager=enforce_eager,
                                            context=self.proposer.context_entries if self.proposer is not None else None,
                                            attention_mask=not kernel, draft=draft)
            if draft is not None and self.decode_step.why_eager is None:
                self.proposer.compiled = draft
        log.info(
            "KV cache: %d blocks x %d tokens (%.2f GiB, %s)",
            self.num_blocks, block_size, self.num_blocks * bytes_per_block / GiB, self.dtype,
        )

    def _default_kv_memory(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * 0.85)
        return 1 * GiB

    def execute(self, rows: list[StepRow]) -> torch.Tensor:
        """Run ONE forward over the step's rows; returns the logits of the rows that sample.

        A row feeds its `pending` tokens, then its `draft`. A row with drafts gets a logits row per
        fed token (verification), a row whose pending tokens reach the end of its sequence one (its
        next token), a prefill chunk that ends before it none; each row's `logits_row` and
        `num_logits` say which. The forward writes the target KV and, with a drafter, its context
        features for every fed token, into the slots of the row's block table.
        """
        # Rows are laid out prompt tokens first: packed linears run those through their dense
        # weight (bf16; float32 on our kernel packs them too) and the generated tokens through the
        # packed kernel (up to quant.max_rows of them; models/quant.py). A row
        # that crosses the prompt's end (a recompute after preemption) is split into two
        # segments of the same sequence; the second attends to the first's KV, written first.
        prompt_segs, other_segs = [], []
        for row in rows:
            seq = row.seq
            start = seq.num_computed_tokens
            toks = seq.token_ids[start:start + row.pending]
            cut = min(len(toks), max(0, seq.num_prompt_tokens - start))
            if cut and not row.draft and not self.prompts_in_step:
                prompt_segs.append((row, start, toks[:cut], cut == len(toks)))
            else:
                cut = 0
            if cut < len(toks) or row.draft:
                other_segs.append((row, start + cut, toks[cut:], True))
            row.logits_row, row.num_logits = None, 0
        ids: list[int] = []
        qlens, clens, tables = [], [], []
        logits_rows: list[int] = []
        for row, start, toks, last in prompt_segs + other_segs:
            seq = row.seq
            if row.draft:
                toks = toks + row.draft
                row.logits_row, row.num_logits = len(logits_rows), len(toks)
                logits_rows.extend(range(len(ids), len(ids) + len(toks)))
            elif last and start + len(toks) == len(seq.token_ids):
                row.logits_row, row.num_logits = len(logits_rows), 1
                logits_rows.append(len(ids) + len(toks) - 1)
            ids.extend(toks)
            qlens.append(len(toks))
            clens.append(start + len(toks))
            tables.append(seq.block_table.blocks)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        sel = torch.tensor(logits_rows, dtype=torch.long, device=self.device)
        aux_ids = self.proposer.layer_ids if self.proposer is not None else ()
        if self.decode_step is not None and (
                (not prompt_segs and len(logits_rows) == len(ids) and max(qlens) <= TorchAttentionBackend.SMALL_QUERY)
                or (self.prompts_in_step and long_query_pairs(qlens, clens) <= PROMPT_PAIRS_IN_STEP)):
            # Decodes and verification blocks (and prompt chunks where `prompts_in_step`): the pure
            # forward and the drafter context entries (compiled once its shape class is;
            # engine/compiled_step.py), then one write to each pool.
            inputs = self.decode_step.inputs(qlens, clens, tables)
            logits, ctx, new_kv = self.decode_step(input_ids, inputs, sel)
            self.kv.index_copy_(2, inputs.slots, new_kv.to(self.kv.dtype))
            if ctx is not None:
                self.proposer.write_entries(inputs.slots, ctx)
            return logits
        dense_rows = sum(len(seg[2]) for seg in prompt_segs)
        meta = AttentionMetadata(qlens, clens, tables, self.block_size, device=self.device, dense_rows=dense_rows)
        positions = meta.positions()
        logits, aux = self.model(input_ids, positions, meta, self.kv_caches, logits_indices=sel, aux_layer_ids=aux_ids)
        if self.proposer is not None:
            self.proposer.write_context(aux, positions, meta.slot_mapping())
        return logits
