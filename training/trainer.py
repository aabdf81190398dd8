"""`dspark train-drafter`: the DeepSpec recipe (REFERENCE.md section 3) on cached target data.

One step takes a few sequences of a `dspark gen-data` dataset. Every response
position of a sequence can be an anchor (`anchors_per_seq` caps them, drawn
at random). For a sequence of length L with anchors p_1..p_A, the context
K/V of all L positions is computed ONCE, and the A blocks [x_p, mask, ...]
(positions p..p+gamma-1) attend to context positions j < p (their own
anchor's context, never their future) and bidirectionally to their own
block: that is the block attention mask, applied as one masked score matrix
per sequence (context part) plus a per-block gamma x gamma part
(`models.dspark.shared_context_attention`: the serving drafter's own forward,
given one context for all blocks).

Block position k (1-based) predicts the token at p+k; its target distribution
is the target's (cached top-k) distribution at position p+k-1. Loss per
position, weighted by w_k = exp(-(k-1)/decay) and masked to positions inside
the sequence:

    0.1 * CE(label) + 0.9 * TV(p_d, p_t) + 1.0 * BCE(confidence, 1 - TV)

with TV = 0.5 * ||p_d - p_t||_1 in [0, 1] (so 1 - TV = sum_v min(p_d, p_t),
the probability that a draft sampled from p_d is accepted) and p_d including
the Markov bias teacher-forced with the true previous tokens.

Levers measured in the issue and built in: cached top-k target probabilities;
a restricted draft vocabulary (the most frequent response tokens, stored as
`d2t`); per-dimension scaling of the target features by their RMS (folded
into `fc` at export, so the checkpoint stays in the DeepSpec format);
initialisation of the draft layer and norms from the target's last layer
with `fc` passing the last feature layer through.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dspark_serve.models.dspark import DSparkConfig, DSparkDrafter, save_drafter

from .data import dataset_shards

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str | None = None  # the target (embedding, lm_head, RoPE, last layer for the init)
    num_layers: int = 1
    block_size: int = 7
    markov_rank: int = 128
    markov_head_type: str = "vanilla"  # vanilla | gated | rnn | none
    confidence_head: bool = True
    draft_vocab_size: int | None = 8192  # None: the full vocabulary
    mask_token_id: int | None = None  # default: an unused special token of the target
    steps: int = 2000
    seqs_per_step: int = 4
    anchors_per_seq: int = 192
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05
    warmup_frac: float = 0.04
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ce_weight: float = 0.1
    # the CE label: "data" = the sequence's next token (the recipe: regenerated responses are the
    # target's own samples); "target" = the target's top-1 there (for teacher-forced dataset
    # responses, whose tokens the target would often not have chosen)
    ce_label: str = "data"
    tv_weight: float = 0.9
    conf_weight: float = 1.0
    decay: float = 4.0
    init_from_target: bool = True
    # warm start: a saved drafter directory whose weights (and draft vocabulary) training continues
    # from; its architecture replaces num_layers/block_size/markov_*/draft_vocab_size
    init_drafter: str | None = None
    # ... and grown on the way (function-preserving): more draft layers (new ones start as an
    # identity) and a wider draft vocabulary (new tokens start with no Markov bias)
    grow_layers: int | None = None
    grow_vocab: int | None = None
    gate_head: bool = False  # with init_drafter: vanilla Markov head -> gated, same function at step 0
    autocast_bf16: bool = False
    eval_every: int = 250
    eval_seqs: int = 64
    save_every: int = 250
    time_budget_s: float | None = None  # stop (with the decay finished) after this much training time
    seed: int = 0
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (CUDA when available)
    max_train_seqs: int | None = None  # data-size ablations: use only the first N training sequences
    # the drafter's context window (DSparkConfig.draft_context_window), trained and served alike:
    # None keeps a warm-started drafter's (a new one sees the whole context), 0 removes it
    context_window: int | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- data


def map_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, memory-mapped (copy-on-write) instead of read: the
    page cache holds it, shared, and under memory pressure the kernel drops pages it can read
    again rather than killing the process."""
    import numpy as np

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))[name]
    dtypes = {"BF16": (np.uint16, torch.bfloat16), "F16": (np.float16, torch.float16),
              "F32": (np.float32, torch.float32), "I32": (np.int32, torch.int32), "I64": (np.int64, torch.int64)}
    if meta["dtype"] not in dtypes:
        raise ValueError(f"{path}: cannot map {name} of dtype {meta['dtype']}")
    np_dtype, dtype = dtypes[meta["dtype"]]
    begin, end = meta["data_offsets"]
    shape = tuple(meta["shape"])
    if end == begin:  # numpy cannot map zero bytes
        return torch.zeros(shape, dtype=dtype)
    arr = np.memmap(path, dtype=np_dtype, mode="c", offset=8 + n + begin, shape=shape)
    return torch.from_numpy(arr).view(dtype)


class CachedDataset:
    """All shards of gen-data directories: ids and target top-k in memory, the features (bf16,
    4.6 KB per token for SmolLM2: nearly all of the bytes) memory-mapped from the shard files."""

    def __init__(self, paths: str | Path | list, max_train_seqs: int | None = None):
        """`paths`: one gen-data directory, several, or a comma-separated string of them
        (generated with the same target layers and top-k)."""
        from safetensors import safe_open

        shards = []
        self.config = None
        for file, sh, cfg in dataset_shards(paths):
            if self.config is not None and (cfg["target_layer_ids"], cfg.get("top_k")) != (
                    self.config["target_layer_ids"], self.config.get("top_k")):
                raise SystemExit(f"{file.parent} was generated with other target layers or top-k than the first dataset")
            self.config = self.config or cfg
            shards.append((file, sh["num_tokens"], sh["num_response_tokens"]))
        if not shards:
            raise SystemExit(f"{paths} hold no sequences: run dspark gen-data first")
        self.layer_ids = list(self.config["target_layer_ids"])
        # ids and top-k preallocated and filled shard by shard; the features stay in their files
        n_tok, n_rows = sum(s[1] for s in shards), sum(s[2] for s in shards)
        with safe_open(str(shards[0][0]), "pt") as f:
            first = f.get_tensor("topk_probs")
            top_k, probs_dtype = first.shape[1], first.dtype
        self.input_ids = torch.empty(n_tok, dtype=torch.long)
        self.topk_ids = torch.empty(n_rows, top_k, dtype=torch.int32)
        self.topk_probs = torch.empty(n_rows, top_k, dtype=probs_dtype)
        self.hidden: list[torch.Tensor] = []  # per shard [tokens, m*d], mapped
        # per sequence: (token offset, length, prompt length, response-row offset, is_val,
        # shard, token offset in the shard)
        self.seqs = []
        tok_off = row_off = 0
        for shard, _, _ in shards:
            with safe_open(str(shard), "pt") as f:
                t = {k: f.get_tensor(k) for k in ("seq_lens", "prompt_lens", "is_val", "input_ids", "topk_ids",
                                                  "topk_probs")}
            hidden = map_tensor(shard, "hidden")
            a, b, local = tok_off, row_off, 0
            for n, p, v in zip(t["seq_lens"].tolist(), t["prompt_lens"].tolist(), t["is_val"].tolist()):
                self.seqs.append((tok_off, n, p, row_off, bool(v), len(self.hidden), local))
                tok_off += n
                row_off += n - p
                local += n
            if tok_off > n_tok or row_off > n_rows or local != hidden.shape[0]:
                raise SystemExit(f"{shard} holds other token counts than its manifest says")
            self.hidden.append(hidden)
            self.input_ids[a:tok_off] = t["input_ids"]
            self.topk_ids[b:row_off] = t["topk_ids"]
            self.topk_probs[b:row_off] = t["topk_probs"]
            del t
        if (tok_off, row_off) != (n_tok, n_rows):
            raise SystemExit(f"{paths}: the shards hold other token counts than their manifests")
        if not self.seqs:
            raise SystemExit(f"{paths} hold no sequences: run dspark gen-data first")
        self.train = [i for i, s in enumerate(self.seqs) if not s[4]]
        self.val = [i for i, s in enumerate(self.seqs) if s[4]]
        if max_train_seqs is not None:
            self.train = self.train[:max_train_seqs]

    def response_tokens(self, which: list[int]) -> int:
        return sum(self.seqs[i][1] - self.seqs[i][2] for i in which)

    def sequence(self, i: int):
        off, n, p, row, _, shard, local = self.seqs[i]
        return (self.input_ids[off:off + n], self.hidden[shard][local:local + n], p,
                self.topk_ids[row:row + n - p].long(), self.topk_probs[row:row + n - p])

    def token_counts(self, vocab: int) -> torch.Tensor:
        counts = torch.zeros(vocab, dtype=torch.long)
        for i in self.train:
            ids, _, p, _, _ = self.sequence(i)
            counts += torch.bincount(ids[p:], minlength=vocab)
        return counts

    def feature_rms(self, sample: int = 200_000) -> torch.Tensor:
        """Per-dimension RMS of the target features (over a strided token sample)."""
        step = max(1, sum(h.shape[0] for h in self.hidden) // sample)
        rows, start = [], 0  # every step-th token of the whole dataset, shard by shard
        for h in self.hidden:
            rows.append(h[(-start) % step::step].float())
            start += h.shape[0]
        x = torch.cat(rows)
        return x.pow(2).mean(0).sqrt().clamp_min(1e-3)


def choose_draft_vocab(counts: torch.Tensor, size: int, always: list[int]) -> torch.Tensor:
    """The `size` most frequent response tokens (plus `always`, e.g. EOS), sorted by id."""
    keep = set(always)
    order = torch.argsort(counts, descending=True, stable=True).tolist()
    for t in order:
        if len(keep) >= size:
            break
        keep.add(t)
    return torch.tensor(sorted(keep)[:size], dtype=torch.long)


# ---------------------------------------------------------------- blocks and the mask


def make_blocks(seq_len: int, prompt_len: int, gamma: int, anchors: torch.Tensor):
    """Per block a and block position k (0-based): the label position anchors[a] + k + 1, the
    row of the cached target distribution for it, and whether it lies inside the sequence.

    The target distribution of the token at position q is the target's output at q - 1, which
    gen-data stores in response row (q - 1) - (prompt_len - 1) = q - prompt_len."""
    pos = anchors[:, None] + torch.arange(1, gamma + 1, device=anchors.device)[None, :]  # [A, g] label positions
    valid = pos < seq_len
    pos = pos.clamp_max(seq_len - 1)
    return pos, pos - prompt_len, valid


def context_mask(anchors: torch.Tensor, ctx_len: int, window: int | None = None) -> torch.Tensor:
    """[A, ctx_len] bool: block a sees context position j iff j < anchors[a] (and, with a
    context window, j >= anchors[a] - window: what serving gathers)."""
    j = torch.arange(ctx_len, device=anchors.device)[None, :]
    seen = j < anchors[:, None]
    if window:
        seen &= j >= anchors[:, None] - window
    return seen


# ---------------------------------------------------------------- model pieces for training


class TrainableDrafter(torch.nn.Module):
    """A DSparkDrafter plus the per-dimension feature scale used during training."""

    def __init__(self, drafter: DSparkDrafter, feat_scale: torch.Tensor):
        super().__init__()
        self.drafter = drafter
        self.register_buffer("feat_scale", feat_scale)  # fc sees x / scale; folded at export

    def forward_sequence(self, ids, hidden, anchors, gamma):
        """Hidden states h_1..h_g of the blocks at `anchors` of one sequence: [A, g, d]. The
        serving drafter's backbone, with the sequence's context K/V computed once and shared by
        its blocks (each masked to the positions before its anchor)."""
        d = self.drafter
        n = ids.shape[0]
        h_ctx = d.hidden_norm(d.fc(hidden.float() / self.feat_scale))
        ctx = d.context_kv(h_ctx, torch.arange(n, device=ids.device))
        cmask = context_mask(anchors, n, d.config.draft_context_window)
        return d.backbone(ids[anchors], anchors, ctx, cmask, gamma)

    def export(self) -> DSparkDrafter:
        """The drafter with the feature scale folded into fc (fc(x / s) == (fc.W / s) x)."""
        with torch.no_grad():
            self.drafter.fc.weight.div_(self.feat_scale[None, :])
            self.feat_scale.fill_(1.0)
        return self.drafter


def copy_target_layer(layer, src, cfg: DSparkConfig) -> None:
    """A draft layer <- one of the target's decoder layers (same shapes: the drafter copies the
    target's config)."""
    with torch.no_grad():
        q, k, v = src.self_attn.qkv_proj.weight.split(
            [cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim,
             cfg.num_key_value_heads * cfg.head_dim], dim=0)
        layer.self_attn.q_proj.weight.copy_(q)
        layer.self_attn.k_proj.weight.copy_(k)
        layer.self_attn.v_proj.weight.copy_(v)
        layer.self_attn.o_proj.weight.copy_(src.self_attn.o_proj.weight)
        gate, up = src.mlp.gate_up_proj.weight.split(cfg.intermediate_size, dim=0)
        layer.mlp.gate_proj.weight.copy_(gate)
        layer.mlp.up_proj.weight.copy_(up)
        layer.mlp.down_proj.weight.copy_(src.mlp.down_proj.weight)
        layer.input_layernorm.weight.copy_(src.input_layernorm.weight)
        layer.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight)


def init_from_target(drafter: DSparkDrafter, target, feat_scale: torch.Tensor) -> None:
    """Draft layers <- the target's last layer(s); final norm <- the target's; fc passes the
    last feature layer through (undoing its scaling); hidden_norm <- the last layer's input norm,
    so the context K/V start as the target's own last-layer projections of that feature."""
    cfg = drafter.config
    tl = target.layers
    d = cfg.hidden_size
    m = len(cfg.target_layer_ids)
    for i, layer in enumerate(drafter.layers):
        copy_target_layer(layer, tl[len(tl) - len(drafter.layers) + i], cfg)
    with torch.no_grad():
        drafter.norm.weight.copy_(target.norm.weight)
        w = torch.zeros(d, m * d)
        w[:, (m - 1) * d:] = torch.diag(feat_scale[(m - 1) * d:])
        drafter.fc.weight.copy_(w)
        drafter.hidden_norm.weight.copy_(tl[len(tl) - len(drafter.layers)].input_layernorm.weight)


def grow_layers(drafter: DSparkDrafter, target, num_layers: int) -> None:
    """Append draft layers up to `num_layers`: copies of the target's last layer whose output
    projections (o_proj, down_proj) start at zero, so each new layer is an identity on the
    residual stream and the grown drafter computes exactly what the saved one did."""
    from dspark_serve.models.dspark import DraftLayer

    cfg = drafter.config
    if num_layers < len(drafter.layers):
        raise ValueError(f"--grow-layers {num_layers}: the drafter already has {len(drafter.layers)} layers")
    dev = drafter.fc.weight.device
    while len(drafter.layers) < num_layers:
        layer = DraftLayer(cfg).to(device=dev, dtype=drafter.fc.weight.dtype)
        copy_target_layer(layer, target.layers[-1], cfg)
        with torch.no_grad():
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        drafter.layers.append(layer)
    cfg.num_hidden_layers = len(drafter.layers)


def grow_vocab(drafter: DSparkDrafter, counts: torch.Tensor, size: int, always: list[int]) -> None:
    """Widen the restricted draft vocabulary to `size` with the most frequent tokens of `counts`
    it lacks. The saved tokens keep their Markov rows; the new ones start with a zero Markov
    bias (their base logits come from the target's lm_head rows at once)."""
    if drafter.d2t is None:
        raise ValueError("--grow-vocab: the drafter already scores the full vocabulary")
    old = drafter.d2t.cpu()
    if size < old.numel():
        raise ValueError(f"--grow-vocab {size}: the drafter's vocabulary already holds {old.numel()} tokens")
    keep = old.tolist() + list(always)
    new = choose_draft_vocab(counts, max(size, len(set(keep))), keep)
    where = torch.searchsorted(new, old)  # both sorted by id; every old id is in new
    dev = drafter.d2t.device
    mh = drafter.markov_head
    if mh is not None:
        w2 = mh.markov_w2.weight
        grown = torch.nn.Linear(w2.shape[1], new.numel(), bias=False).to(device=w2.device, dtype=w2.dtype)
        with torch.no_grad():
            grown.weight.zero_()
            grown.weight[where.to(w2.device)] = w2
        mh.markov_w2 = grown
    drafter.d2t = new.to(dev)  # a registered buffer: replaced in place of the old one
    drafter.config.draft_vocab_size = int(new.numel())
    drafter.refresh_draft_head()


GATE_BIAS = 2.0  # sigmoid(2) = 0.88: the gate starts open, with sigmoid'(2) = 0.10 of gradient (not saturated)


def gate_markov_head(drafter: DSparkDrafter, bias: float = GATE_BIAS) -> None:
    """Turn a vanilla Markov head into the gated one, W2 (sigmoid(gate_proj([h; W1 x])) * W1 x), without
    changing its function: the gate starts as the constant sigmoid(bias) (zero weights) and W2 is
    divided by it. A mild bias keeps the gate trainable where a saturated one would not be."""
    mh = drafter.markov_head
    if mh is None or mh.kind != "vanilla":
        raise ValueError("--gate-head converts a vanilla Markov head; the drafter has "
                         f"{'none' if mh is None else mh.kind!r}")
    w2 = mh.markov_w2.weight
    gate = torch.nn.Linear(drafter.config.hidden_size + mh.rank, mh.rank, bias=True).to(device=w2.device, dtype=w2.dtype)
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.fill_(bias)
        w2.div_(torch.sigmoid(torch.tensor(bias)).item())
    mh.gate_proj = gate
    mh.kind = "gated"
    drafter.config.markov_head_type = "gated"


# ---------------------------------------------------------------- loss


def position_weights(gamma: int, decay: float) -> torch.Tensor:
    return torch.exp(-torch.arange(gamma, dtype=torch.float32) / decay)


def sparse_tv(log_pd: torch.Tensor, tk_draft_idx: torch.Tensor, tk_probs: torch.Tensor) -> torch.Tensor:
    """0.5 * ||p_d - p_t||_1 with p_t given sparsely by its top-k (draft indices, -1 = not in V').

    p_d: [N, V'] (as log-probs); the target's mass outside its top-k is unknown and left out
    (a constant for the gradient). Returns [N]."""
    inside = tk_draft_idx >= 0
    pd_k = torch.gather(log_pd, 1, tk_draft_idx.clamp_min(0)).exp() * inside  # exp of k entries, not of V'
    pt = tk_probs.float()
    overlap = torch.minimum(pd_k, pt).sum(-1)  # sum_v min(p_d, p_t) over the target's top-k
    return 1.0 - overlap


def drafter_loss(tr: TrainableDrafter, batch, cfg: TrainConfig, t2d: torch.Tensor | None):
    """Loss and per-position statistics for a list of (ids, hidden, prompt_len, tk_ids, tk_probs, anchors)."""
    d = tr.drafter
    g = cfg.block_size
    dev = tr.feat_scale.device
    hs, labels, prevs, valids, tk_rows = [], [], [], [], []
    tk_all_ids, tk_all_probs = [], []
    for ids, hidden, p, tk_ids, tk_probs, anchors in batch:
        # the dataset stays in host memory; one sequence at a time goes to the drafter's device
        ids, hidden, tk_ids, tk_probs, anchors = (t.to(dev, non_blocking=True)
                                                  for t in (ids, hidden, tk_ids, tk_probs, anchors))
        n = ids.shape[0]
        h = tr.forward_sequence(ids, hidden, anchors, g)
        lab_pos, row, valid = make_blocks(n, p, g, anchors)
        hs.append(h)
        labels.append(ids[lab_pos])
        prev = torch.cat([ids[anchors][:, None], ids[lab_pos[:, :-1]]], dim=1)
        prevs.append(prev)
        valids.append(valid)
        tk_all_ids.append(tk_ids[row])
        tk_all_probs.append(tk_probs[row].float())  # float16 rows: CPU autocast cannot cat them
    h = torch.cat(hs)  # [A, g, d]
    label = torch.cat(labels)
    if cfg.ce_label not in ("data", "target"):
        raise ValueError(f"ce_label must be 'data' or 'target', not {cfg.ce_label!r}")
    prev = torch.cat(prevs)
    valid = torch.cat(valids)
    tk_ids = torch.cat(tk_all_ids)  # [A, g, K]
    tk_probs = torch.cat(tk_all_probs)
    if cfg.ce_label == "target":
        label = tk_ids[..., 0]  # the target's most likely token (top-k is sorted)
    logits, conf_logit = d.teacher_forced(h, prev)
    logp = torch.log_softmax(logits.float(), dim=-1)
    vdim = logp.shape[-1]
    if t2d is not None:
        lab_d = t2d[label]
        tk_d = t2d[tk_ids]
    else:
        lab_d, tk_d = label, tk_ids
    flat = logp.reshape(-1, vdim)
    tv = sparse_tv(flat, tk_d.reshape(-1, tk_d.shape[-1]), tk_probs.reshape(-1, tk_probs.shape[-1])).view(valid.shape)
    in_vocab = lab_d >= 0
    ce = -torch.gather(logp, 2, lab_d.clamp_min(0)[..., None]).squeeze(-1)
    w = position_weights(g, cfg.decay).to(dev)[None, :] * valid
    wsum = w.sum().clamp_min(1e-6)
    ce_loss = (ce * w * in_vocab).sum() / (w * in_vocab).sum().clamp_min(1e-6)
    tv_loss = (tv * w).sum() / wsum
    loss = cfg.ce_weight * ce_loss + cfg.tv_weight * tv_loss
    conf_loss = torch.zeros((), device=dev)
    if conf_logit is not None:
        target_c = (1.0 - tv).detach().clamp(0, 1)
        bce = F.binary_cross_entropy_with_logits(conf_logit.float(), target_c, reduction="none")
        conf_loss = (bce * w).sum() / wsum
        loss = loss + cfg.conf_weight * conf_loss
    with torch.no_grad():
        greedy_ok = (logp.argmax(-1) == (tk_d[..., 0])) & valid  # draft argmax == target argmax
        stats = {
            "loss": float(loss), "ce": float(ce_loss), "tv": float(tv_loss), "conf": float(conf_loss),
            "tv_pos": ((tv * valid).sum(0) / valid.sum(0).clamp_min(1)).tolist(),
            "greedy_pos": (greedy_ok.float().sum(0) / valid.sum(0).clamp_min(1)).tolist(),
            "tau_greedy": float(1 + torch.cumprod(greedy_ok.float(), dim=1).sum(1).mean()),
            "tau_tv": float(1 + torch.cumprod((1 - tv) * valid, dim=1).sum(1).mean()),
            "positions": int(valid.sum()),
        }
    return loss, stats


def expected_tau_from_tv(tv_pos: list[float]) -> float:
    """1 + sum_k prod_{i<=k} (1 - TV_i): the expected tokens per round from mean TV per position."""
    tau, run = 1.0, 1.0
    for t in tv_pos:
        run *= max(0.0, 1.0 - t)
        tau += run
    return tau


# ---------------------------------------------------------------- the loop


def pick_mask_token(tokenizer, vocab: int) -> int:
    """A special token that never appears in text: the block's mask embedding (frozen)."""
    for name in ("<|mask|>", "<mask>", "<file_sep>", "<filename>", "<gh_stars>", "<issue_start>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and 0 <= tid < vocab and tid != tokenizer.unk_token_id:
            return tid
    return vocab - 1


def _sample_batch(ds: CachedDataset, seq_ids: list[int], anchors_per_seq: int, gamma: int, gen: torch.Generator):
    batch = []
    for i in seq_ids:
        ids, hidden, p, tk_ids, tk_probs = ds.sequence(i)
        n = ids.shape[0]
        cand = torch.arange(p, n - 1)  # anchors: response tokens with at least one label after them
        if cand.numel() == 0:
            continue
        if cand.numel() > anchors_per_seq:
            cand = cand[torch.randperm(cand.numel(), generator=gen)[:anchors_per_seq]].sort().values
        batch.append((ids, hidden, p, tk_ids, tk_probs, cand))
    return batch


@torch.no_grad()
def evaluate(tr: TrainableDrafter, ds: CachedDataset, cfg: TrainConfig, t2d, seqs: list[int]) -> dict:
    """Held-out statistics over every anchor of `seqs` (deterministic)."""
    tr.eval()
    agg = {"tv": 0.0, "ce": 0.0, "tau_greedy": 0.0, "tau_tv": 0.0, "n": 0}
    tv_pos = [0.0] * cfg.block_size
    greedy_pos = [0.0] * cfg.block_size
    gen = torch.Generator().manual_seed(1234)
    for i in seqs:
        batch = _sample_batch(ds, [i], 256, cfg.block_size, gen)
        if not batch:
            continue
        _, st = drafter_loss(tr, batch, cfg, t2d)
        w = len(batch[0][5])
        agg["n"] += w
        for k in ("tv", "ce", "tau_greedy", "tau_tv"):
            agg[k] += st[k] * w
        tv_pos = [a + b * w for a, b in zip(tv_pos, st["tv_pos"])]
        greedy_pos = [a + b * w for a, b in zip(greedy_pos, st["greedy_pos"])]
    tr.train()
    n = max(agg.pop("n"), 1)
    out = {k: v / n for k, v in agg.items()}
    out["tv_pos"] = [round(x / n, 4) for x in tv_pos]
    out["greedy_pos"] = [round(x / n, 4) for x in greedy_pos]
    return out


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warm-up over the first `warmup_frac`, then cosine decay to min_lr_ratio * lr.

    `progress` in [0, 1] (default step / steps): with a time budget it is the larger of the
    step and the time fractions, so a run cut by its budget still ends its decay."""
    t = (step + 1) / cfg.steps if progress is None else progress
    if t < cfg.warmup_frac:
        return cfg.lr * max(t, 1.0 / cfg.steps) / cfg.warmup_frac
    t = (t - cfg.warmup_frac) / max(1e-9, 1 - cfg.warmup_frac)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def t2d_index(d2t: torch.Tensor | None, vocab: int) -> torch.Tensor | None:
    """Target token id -> draft index (-1 outside the draft vocabulary), on d2t's device."""
    if d2t is None:
        return None
    t2d = torch.full((vocab,), -1, dtype=torch.long, device=d2t.device)
    t2d[d2t] = torch.arange(d2t.numel(), device=d2t.device)
    return t2d


def _device_of(loaded) -> torch.device:
    return next(loaded.model.parameters()).device


def warm_start(cfg: TrainConfig, ds: CachedDataset, loaded) -> tuple[TrainableDrafter, torch.Tensor | None]:
    """A saved drafter to continue training: its fc (folded at export) is unfolded for the
    feature scale of this data, so training starts from exactly the saved function."""
    from dspark_serve.models.dspark import load_drafter

    drafter = load_drafter(cfg.init_drafter, target=loaded.model, dtype=torch.float32, device=_device_of(loaded)).train()
    if list(drafter.config.target_layer_ids) != list(ds.layer_ids):
        raise ValueError(f"{cfg.init_drafter} reads target layers {list(drafter.config.target_layer_ids)}, "
                         f"the data holds {list(ds.layer_ids)}")
    if cfg.grow_layers:
        grow_layers(drafter, loaded.model, cfg.grow_layers)
    if cfg.grow_vocab:
        grow_vocab(drafter, ds.token_counts(loaded.config.vocab_size), cfg.grow_vocab, list(loaded.eos_token_ids))
    if cfg.gate_head:
        gate_markov_head(drafter)
    scale = ds.feature_rms().to(_device_of(loaded))
    with torch.no_grad():
        drafter.fc.weight.mul_(scale[None, :])
    return TrainableDrafter(drafter, scale), t2d_index(drafter.d2t, loaded.config.vocab_size)


def build_drafter(cfg: TrainConfig, ds: CachedDataset, loaded) -> tuple[TrainableDrafter, torch.Tensor | None]:
    tr, t2d = _build_drafter(cfg, ds, loaded)
    tr.drafter.config.override_context_window(cfg.context_window)
    return tr, t2d


def _build_drafter(cfg: TrainConfig, ds: CachedDataset, loaded) -> tuple[TrainableDrafter, torch.Tensor | None]:
    from dspark_serve.models.dspark import random_drafter_config

    if cfg.init_drafter:
        return warm_start(cfg, ds, loaded)
    if cfg.grow_layers or cfg.grow_vocab or cfg.gate_head:
        raise ValueError("--grow-layers / --grow-vocab / --gate-head change a warm-started drafter: give --init-drafter")
    tc = loaded.config
    vocab = tc.vocab_size
    mask_id = cfg.mask_token_id if cfg.mask_token_id is not None else pick_mask_token(loaded.tokenizer, vocab)
    overrides = {}
    d2t = t2d = None
    if cfg.draft_vocab_size is not None and cfg.draft_vocab_size < vocab:
        d2t = choose_draft_vocab(ds.token_counts(vocab), cfg.draft_vocab_size, list(loaded.eos_token_ids))
        overrides["draft_vocab_size"] = int(d2t.numel())
        t2d = t2d_index(d2t, vocab)
    dc = random_drafter_config(
        tc, num_layers=cfg.num_layers, block_size=cfg.block_size, target_layer_ids=ds.layer_ids,
        markov_rank=cfg.markov_rank if cfg.markov_head_type != "none" else 0,
        markov_head_type=cfg.markov_head_type if cfg.markov_head_type != "none" else "vanilla",
        mask_token_id=mask_id, enable_confidence_head=cfg.confidence_head, **overrides,
    )
    if cfg.markov_head_type == "none":
        dc.enable_markov_head = False
    torch.manual_seed(cfg.seed)
    drafter = DSparkDrafter(dc)
    for mod in drafter.modules():  # small init for the new parts (DeepSpec: normal(0, 0.02))
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.normal_(mod.weight, std=0.02)
            if mod.bias is not None:
                torch.nn.init.zeros_(mod.bias)
        elif isinstance(mod, torch.nn.Embedding):
            torch.nn.init.normal_(mod.weight, std=0.02)
    if drafter.markov_head is not None:
        torch.nn.init.zeros_(drafter.markov_head.markov_w2.weight)  # starts as the plain backbone
    if d2t is not None:
        drafter.d2t.copy_(d2t)
    drafter.attach_target(loaded.model)
    scale = ds.feature_rms()
    if cfg.init_from_target:
        init_from_target(drafter, loaded.model, scale)
    # built on the host, then moved: the shared embedding / lm_head rows already live on the
    # target's device (plain attributes, not moved by .to)
    dev = _device_of(loaded)
    return TrainableDrafter(drafter, scale).to(dev), None if t2d is None else t2d.to(dev)


def _rounded(stats: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()}


def resolve_device(name: str) -> torch.device:
    """"auto": the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"train-drafter --device {name}: torch sees no CUDA device here")
    return dev


def train_drafter(cfg: TrainConfig) -> dict:
    from tqdm import tqdm

    from dspark_serve.models.loader import load_model

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.model, dtype="float32", device=device)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    ds = CachedDataset(cfg.data, cfg.max_train_seqs)
    tr, t2d = build_drafter(cfg, ds, loaded)
    params = [p for p in tr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=True)
    ckpt = out / "checkpoint.pt"
    start = 0
    state: dict = {}
    if ckpt.exists():  # resume
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["config"] != asdict(cfg):
            log.warning("resuming %s with changed settings", ckpt)
        tr.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        tr.drafter.refresh_draft_head()
        log.info("resumed from step %d", start)
    gen = torch.Generator().manual_seed(cfg.seed + start)
    log_f = open(out / "train_log.jsonl", "a")
    n_params = sum(p.numel() for p in params)
    info = {"train_seqs": len(ds.train), "val_seqs": len(ds.val), "train_response_tokens": ds.response_tokens(ds.train),
            "trainable_params": n_params, "draft_vocab": tr.drafter.config.draft_vocab_size}
    if t2d is not None:
        val_ids = torch.cat([ds.sequence(i)[0][ds.seqs[i][2]:] for i in ds.val]) if ds.val else torch.zeros(0, dtype=torch.long)
        info["val_vocab_coverage"] = float((t2d.cpu()[val_ids] >= 0).float().mean()) if val_ids.numel() else None
    log.info("training: %s", info)
    log_f.write(json.dumps({"info": info}) + "\n")
    eval_seqs = ds.val[: cfg.eval_seqs]
    if start == 0 and eval_seqs:
        # the starting point on the same held-out sequences: what a warm start begins from (or the
        # initialisation's score), so every run's log shows its own gain
        before = evaluate(tr, ds, cfg, t2d, eval_seqs)
        log.info("step 0 val %s", before)
        log_f.write(json.dumps({"step": 0, "val": _rounded(before)}) + "\n")
        log_f.flush()
    order: list[int] = []
    t0 = time.monotonic()
    positions = 0
    bar = tqdm(total=cfg.steps, initial=start, unit="step", desc="train-drafter")
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16)
    last_eval = None
    elapsed0 = state["elapsed_s"] if start and "elapsed_s" in state else 0.0
    step = start
    for step in range(start, cfg.steps):
        elapsed = elapsed0 + time.monotonic() - t0
        progress = (step + 1) / cfg.steps
        if cfg.time_budget_s:
            progress = max(progress, elapsed / cfg.time_budget_s)
        if len(order) < cfg.seqs_per_step:
            order += torch.randperm(len(ds.train), generator=gen).tolist()
        pick = [ds.train[j] for j in order[: cfg.seqs_per_step]]
        del order[: cfg.seqs_per_step]
        batch = _sample_batch(ds, pick, cfg.anchors_per_seq, cfg.block_size, gen)
        if not batch:
            continue
        lr = lr_at(step, cfg, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        with ctx:
            loss, st = drafter_loss(tr, batch, cfg, t2d)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        positions += st["positions"]
        rec = {"step": step + 1, "lr": round(lr, 6), "grad_norm": round(gnorm, 4), "progress": round(progress, 4),
               **{k: round(v, 4) for k, v in st.items() if isinstance(v, float)},
               "tau_tv_pos": round(expected_tau_from_tv(st["tv_pos"]), 4),
               "positions_per_s": round(positions / max(time.monotonic() - t0, 1e-9), 1),
               "elapsed_s": round(time.monotonic() - t0, 1)}
        final = step + 1 == cfg.steps or (cfg.time_budget_s and progress >= 1.0)
        if (step + 1) % cfg.eval_every == 0 or final:
            last_eval = evaluate(tr, ds, cfg, t2d, eval_seqs)
            rec["val"] = _rounded(last_eval)
            log.info("step %d val %s", step + 1, rec["val"])
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()
        bar.update(1)
        bar.set_postfix(tv=f"{st['tv']:.3f}", tau_g=f"{st['tau_greedy']:.2f}",
                        val_tau=f"{last_eval['tau_greedy']:.2f}" if last_eval else "-")
        if (step + 1) % cfg.save_every == 0 or final:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": tr.state_dict(), "opt": opt.state_dict(), "step": step + 1, "config": asdict(cfg),
                        "elapsed_s": elapsed0 + time.monotonic() - t0}, tmp)
            os.replace(tmp, ckpt)
        if final:
            if step + 1 < cfg.steps:
                log.info("time budget reached after %d steps", step + 1)
            break
    bar.close()
    log_f.close()
    drafter = tr.export()
    drafter.config.extra["dspark_training"] = {
        "data": [os.path.basename(os.path.normpath(p)) for p in cfg.data.split(",") if p], "steps": cfg.steps, **info,
    }
    save_drafter(drafter, out / "drafter", dtype=torch.bfloat16)
    if last_eval is None:
        last_eval = evaluate(tr, ds, cfg, t2d, eval_seqs)
    info["steps_done"] = step + 1
    info["train_s"] = round(elapsed0 + time.monotonic() - t0, 1)
    summary = {"info": info, "val": last_eval, "drafter": str(out / "drafter")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
