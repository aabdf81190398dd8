"""Owns the KV pool tensors and turns a scheduled batch into one model forward."""

from __future__ import annotations

import logging

import torch

from models.attention import AttentionMetadata
from models.loader import LoadedModel

from .sequence import Sequence

log = logging.getLogger(__name__)

GiB = 1 << 30


class ModelRunner:
    def __init__(self, loaded: LoadedModel, block_size: int, kv_cache_memory: int | None, device: torch.device):
        self.model = loaded.model
        self.config = loaded.config
        self.device = device
        self.block_size = block_size
        self.dtype = next(self.model.parameters()).dtype
        cfg = self.config
        bytes_per_block = cfg.kv_bytes_per_token(self.dtype.itemsize) * block_size
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
        log.info(
            "KV cache: %d blocks x %d tokens (%.2f GiB, %s)",
            self.num_blocks, block_size, self.num_blocks * bytes_per_block / GiB, self.dtype,
        )

    def _default_kv_memory(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * 0.85)
        return 1 * GiB

    def execute(self, entries: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one forward over the batch; returns logits of the sequences that sample next."""
        ids: list[int] = []
        qlens, clens, tables = [], [], []
        logits_rows: list[int] = []
        sampling: list[Sequence] = []
        for seq, n in entries:
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            qlens.append(n)
            clens.append(start + n)
            tables.append(seq.block_table.blocks)
            if start + n == len(seq.token_ids):
                logits_rows.append(len(ids) - 1)
                sampling.append(seq)
        meta = AttentionMetadata(qlens, clens, tables, self.block_size, device=self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        rows = torch.tensor(logits_rows, dtype=torch.long, device=self.device)
        logits, _ = self.model(input_ids, meta.positions(), meta, self.kv_caches, logits_indices=rows)
        return logits, sampling
