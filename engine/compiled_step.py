"""The decode forward compiled with torch.compile: the CPU counterpart of CUDA graphs.

A step of decodes and verification blocks (no prompt rows) runs `LlamaForCausalLM.forward_decode`,
a pure function of tensors. On a CPU most of its eager time is the dispatch of about 40 small ops
per layer; inductor fuses them into one graph per shape class (docs/benchmarks/compile.md).

- With a drafter, the graph also computes the drafter context entries of the fed tokens
  (`DraftProposer.context_entries`: the feature projection, norm, K/V and RoPE of every draft
  layer), which every step pays whether or not it drafts: eagerly about 20 small ops, 0.3-0.9 ms
  of a 10-35 ms step on two cores.
- Shape classes. Sizes are dynamic, except that a compiler treats a dimension of 1 as a constant:
  one graph for (one sequence / several) x (one query per sequence / several), four in all.
- Arithmetic. `emulate_precision_casts` makes fused elementwise chains round as eager does; what
  still differs from eager is the order of the float32 sums inside RMSNorm (inductor's own
  vectorised reductions, not ATen's; attention is the paged-attention kernel, an extern call, where
  it builds). In bf16 those sums are rounded right after, so most steps give eager's bits exactly;
  in float32 (what `--dtype auto` serves packed on CPUs without fast bf16) compiled and eager
  differ in the last bits. What exactness needs holds within the graphs: a token has the same
  bits in all four (tests/engine/test_compiled_step.py), so speculation on and off give the same
  greedy output (`quant_divergence --compiled`). Compiled and eager steps mix freely. Prefill
  chunks run eager, except where no row has a role of its own (float32 on our packed kernel with
  the paged-attention kernel: `ModelRunner.prompts_in_step`): there a prompt chunk is a long
  query like a verification block's, and steps that carry chunks of bounded attention
  (`model_runner.PROMPT_PAIRS_IN_STEP`) take these graphs too, with no mask in their inputs and
  their sampled rows padded to the class's smallest count (a compiler treats sizes 0 and 1 as
  constants). Only models with packed weights compile: dense float32, the parity reference,
  never does.
- Start-up. Compiling takes 20-30 s per graph with a warm cache and 80-130 s cold on two cores.
  The engine does not wait: a background thread compiles the classes one by one (it runs each once
  on dummy inputs that read the pool and write nothing) while the engine serves eagerly, and a step
  uses a graph only once its class is ready. Inductor's caches live under the dspark cache
  directory (`TORCHINDUCTOR_CACHE_DIR` if set), so the next start finds them. The scheduler's cost
  table, profiled eagerly at start-up, is re-profiled on the graphs at the engine's first idle
  moment after they are ready (`LLMEngine.idle`).
- Only models whose every linear (and the head) is packed compile: inductor computes a dense bf16
  matmul of a few rows in another order than eager. Other models run the same pure forward eagerly.
- The drafter's pass (`CompiledDraft`: context gather, block, base logits and the greedy Markov
  chain) compiles in the same thread after the decode graphs, four graphs of a few seconds each.
- Calling. The graphs' wrapper is C++ (`cpp_wrapper`), and once every graph is compiled a decode
  step evaluates only the guards that tell its graphs apart (`_run`).
- `--enforce-eager` (vLLM's name) never compiles.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from dspark_serve.models import quant
from dspark_serve.models.attention import DecodeInputs, decode_inputs

log = logging.getLogger(__name__)

# Every class the compiled forward specialises on: (several sequences, several queries per sequence).
SHAPE_CLASSES = ((False, False), (True, False), (False, True), (True, True))
# ... and the drafter's pass: (several rows, the greedy chain: every row greedy and unconstrained)
DRAFT_CLASSES = ((False, True), (True, True), (False, False), (True, False))


def supported(model, device: torch.device) -> bool:
    """Whether the model's decode steps can take `forward_decode` (Llama-family, full attention)."""
    cfg = getattr(model, "config", None)
    return (device.type == "cpu" and hasattr(model, "forward_decode") and cfg is not None
            and not any(w is not None for w in cfg.sliding_windows))


class CompiledStep:
    """`forward_decode` of one model, compiled per shape class in the background.

    `__call__` runs the graph of the inputs' class when it is ready, the eager function otherwise.
    `ready` (thread-safe to read) lists the classes compiled so far."""

    def __init__(self, model, kv: torch.Tensor, aux_layer_ids: tuple[int, ...], block_size: int,
                 enforce_eager: bool = False, context=None, attention_mask: bool = True, draft=None):
        self.model = model
        # the drafter's pass (`CompiledDraft`), compiled after the decode graphs in the same thread
        self.draft = draft
        # whether the inputs carry the torch path's attention mask (not when the paged-attention
        # kernel attends: it masks by position itself); the dummy inputs are built the same way
        self.attention_mask = attention_mask
        self.kv = kv
        self.aux_layer_ids = tuple(aux_layer_ids)
        # With a drafter: context(aux hidden states, positions) -> the drafter context entries of the
        # fed tokens, computed inside the same graph (one fused pass instead of ~20 small eager ops
        # per step, paid by every step whether or not it drafts)
        self.context = context
        self.block_size = block_size
        self.enforce_eager = enforce_eager
        self.ready: set[tuple[bool, bool]] = set()
        # The packed kernels serve at most quant.max_rows rows (models/quant.py); a graph is
        # guarded on that, so larger steps run eager rather than compile another graph.
        packed = packed_weights(model)
        self.max_rows = min((quant.max_rows(p) for p in packed if p is not None), default=0)
        # Only models whose every linear is packed (the packed kernels stay extern calls, ATen's own
        # bits): inductor decomposes a dense matmul of a few rows into its own loops, another
        # summation order in every linear.
        self.why_eager = "--enforce-eager" if enforce_eager else (
            None if _all_packed(model) else "dense linears (compiled only with packed weights: --quantization int4/int8/auto on a GGUF)")
        self.compile_seconds: dict[tuple[bool, bool], float] = {}
        self.failed: str | None = None
        # every graph compiled and the compiling thread done: calls may skip guard evaluation (`_run`)
        self.settled = False
        self._compiled = None
        self._thread: threading.Thread | None = None

    what = "decode step"

    @staticmethod
    def name(cls: tuple[bool, bool]) -> str:
        return f"{'batch' if cls[0] else 'single'}-{'verify' if cls[1] else 'decode'}"

    # ------------------------------------------------------------ compiling

    def start(self) -> None:
        """Compile every shape class in a background thread (no-op with enforce_eager)."""
        if self.why_eager is not None or self._thread is not None:
            if self.why_eager is not None:
                log.info("decode step runs eager: %s", self.why_eager)
            return
        _use_dspark_inductor_cache()
        _configure()  # this thread's settings (a recompile here would read them)
        self._compiled = torch.compile(self._forward, dynamic=True, fullgraph=True)
        if self.draft is not None:
            self.draft.prepare()
        self._thread = threading.Thread(target=self._compile_all, name="dspark-compile", daemon=True)
        self._thread.start()

    @property
    def all_ready(self) -> bool:
        """Every decode graph (and the drafter pass's) is compiled."""
        return len(self.ready) == len(SHAPE_CLASSES) and (self.draft is None or self.draft.all_ready)

    @property
    def compiling(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every class is compiled (or compiling failed); True when all are ready."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.all_ready

    def _compile_all(self) -> None:
        _configure()  # compiler settings are per thread
        t_all = time.monotonic()
        programs = [(self, SHAPE_CLASSES)] + ([(self.draft, DRAFT_CLASSES)] if self.draft is not None else [])
        for program, classes in programs:
            for cls in classes:
                t0 = time.monotonic()
                try:
                    args = program._dummy(*cls)  # made as a real call makes them (a guard on inference mode)
                    with torch.inference_mode():
                        program._compiled(*args)
                except Exception as e:  # the eager path keeps serving; say why once
                    self.failed = f"{type(e).__name__}: {e}"
                    log.warning("torch.compile of the %s failed; serving eager: %s", program.what, self.failed)
                    return
                program.compile_seconds[cls] = time.monotonic() - t0
                program.ready.add(cls)
                log.info("compiled %s graph %s in %.1fs", program.what, program.name(cls), program.compile_seconds[cls])
        log.info("all %d graphs compiled in %.1fs", sum(len(c) for _, c in programs), time.monotonic() - t_all)
        self.settled = True

    def _dummy(self, several_seqs: bool, several_queries: bool):
        """Inputs of a class: contexts over the first pool blocks (read only), queries of 2 or 1."""
        nseq, q = (2 if several_seqs else 1), (3 if several_queries else 1)
        ctx = 3 * self.block_size // 2 + 7
        nblk = -(-ctx // self.block_size)
        tables = [list(range(nblk)) for _ in range(nseq)]
        inputs = self.inputs([q] * nseq, [ctx] * nseq, tables)
        ids = torch.zeros(nseq * q, dtype=torch.long, device=self.kv.device)
        return ids, inputs, self.kv, torch.arange(nseq * q, device=self.kv.device)

    # ------------------------------------------------------------ running

    def inputs(self, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]]) -> DecodeInputs:
        """The `DecodeInputs` of a step for these graphs (with the attention mask only where the
        torch path reads it: a graph is guarded on the mask's shape)."""
        return decode_inputs(query_lens, context_lens, block_tables, self.block_size, self.kv.device,
                             with_mask=self.attention_mask)

    def _forward(self, input_ids: torch.Tensor, inputs: DecodeInputs, kv: torch.Tensor, logits_indices: torch.Tensor):
        """What is compiled: the model's pure decode forward, then (with a drafter) the drafter
        context entries of the fed tokens. -> (logits, context entries or None, new K/V)."""
        logits, aux, new_kv = self.model.forward_decode(input_ids, inputs, kv, logits_indices, self.aux_layer_ids)
        ctx = self.context(aux, inputs.positions) if self.context is not None else None
        return logits, ctx, new_kv

    def __call__(self, input_ids: torch.Tensor, inputs: DecodeInputs, logits_indices: torch.Tensor):
        """-> (logits of `logits_indices`, the drafter context entries of the fed tokens (None
        without a drafter), their new target K/V); the caller writes both at `inputs.slots`."""
        cls = inputs.shape_class
        # (a context of one entry: a dimension of 1, which the graphs do not take)
        compiled = cls in self.ready and input_ids.shape[0] <= self.max_rows and inputs.gather.shape[1] >= 2
        n = logits_indices.shape[0]
        # A compiler treats a size of 0 or 1 as a constant. Decode and verification steps sample every
        # token, but a step of prompt chunks may sample one row or none (a chunk that ends before its
        # prompt does): pad the rows to the class's smallest (as its dummy inputs have them) instead
        # of recompiling in the middle of serving, and return the rows asked for.
        pad = max(0, (1 if cls == (False, False) else 2) - n) if compiled else 0
        if pad:
            logits_indices = torch.cat([logits_indices, logits_indices.new_zeros(pad)])
        with torch.inference_mode():
            if compiled:
                logits, ctx, new_kv = _run(self._compiled, self.settled, input_ids, inputs, self.kv, logits_indices)
            else:
                logits, ctx, new_kv = self._forward(input_ids, inputs, self.kv, logits_indices)
        return (logits[:n] if pad else logits), ctx, new_kv

    def describe(self) -> dict:
        out = {"eager": self.why_eager, "graphs_ready": len(self.ready),
               "graphs": len(SHAPE_CLASSES), "compile_seconds": {self.name(c): round(s, 1) for c, s in self.compile_seconds.items()},
               "failed": self.failed}
        if self.draft is not None:
            out["draft"] = {"graphs_ready": len(self.draft.ready), "graphs": len(DRAFT_CLASSES),
                            "compile_seconds": {self.draft.name(c): round(s, 1) for c, s in self.draft.compile_seconds.items()}}
        return out


class CompiledDraft:
    """The drafter's pass (`DraftProposer.draft_pass`: the context gather, the block pass, the base
    logits and, for greedy unconstrained rows, the sequential Markov chain) compiled per class of
    `DRAFT_CLASSES`, by `CompiledStep`'s thread after the decode graphs. Eagerly the pass is about
    150 small ops: for one request on two Sapphire Rapids cores 4.0 ms eagerly and 2.3 ms compiled
    (called alone, interleaved, 6 rounds), against a decode forward of 8-10 ms. Inside serving,
    where the target's weights pass through the caches between two drafts, it measured 3.6-4.0 ms.

    A call runs the graph of its class when it is ready and the call fits what the graph was
    specialised on (the drafter's own block size, of which it takes the positions asked for; a
    context of at least 2 entries; rows within the packed weights' limit, beyond which the linears
    take their dense weights: another graph), else the eager pass. Which path runs depends only on
    the rows, their context and the positions asked for, all fixed before anything is drafted.
    Drafts only steer speed (verification decides every token, the same whatever the drafter
    computes; a sampled row is verified against the very distributions it was drawn from), so
    inductor's arithmetic needs no comparison with eager's here."""

    what = "drafter pass"
    # Up to this many rows a graph drafts the whole block even where the plan asks for fewer
    # positions: one request on two Sapphire Rapids cores, the compiled block of 7 takes 1.95 ms
    # against 2.29 eagerly for 3 positions; 2 requests 3.2 against 3.1; 4 requests 4.5 against
    # 3.6 (the head's rows grow with the positions). More rows draft only what is asked.
    FULL_BLOCK_ROWS = 2

    def __init__(self, proposer, gamma: int, block_size: int):
        self.proposer = proposer
        self.gamma = gamma
        self.block_size = block_size
        d = proposer.drafter
        packed = [quant.packed_of(m) for m in d.modules() if isinstance(m, torch.nn.Linear)]
        packed.append(d._draft_head_packed)
        self.max_rows = min((quant.max_rows(p) for p in packed if p is not None), default=1 << 62)
        self.ready: set[tuple[bool, bool]] = set()
        self.compile_seconds: dict[tuple[bool, bool], float] = {}
        self._compiled = None

    @staticmethod
    def name(cls: tuple[bool, bool]) -> str:
        return f"{'batch' if cls[0] else 'single'}-{'chain' if cls[1] else 'block'}"

    @property
    def all_ready(self) -> bool:
        return len(self.ready) == len(DRAFT_CLASSES)

    def prepare(self) -> None:
        self._compiled = torch.compile(self.proposer.draft_pass, dynamic=True, fullgraph=True)

    def _dummy(self, several: bool, chain: bool):
        """A class's arguments: blocks over the first pool slots (read only), one context entry
        masked; made in inference mode, as `DraftProposer.propose` makes a step's (a guard)."""
        r, c = (2 if several else 1), 3 * self.block_size // 2 + 7
        pool = self.proposer.pool
        with torch.inference_mode():
            mask = torch.ones(r, c, dtype=torch.bool, device=pool.device)
            mask[:, -1] = False
            flat = torch.arange(r * c, device=pool.device) % pool.shape[2]
            zeros = torch.zeros(r, dtype=torch.long, device=pool.device)
            return pool, zeros, zeros + c, flat, mask, self.gamma, chain

    def __call__(self, pool, anchors, anchor_pos, flat, mask, gamma: int, chain: bool):
        """`draft_pass` of `gamma` <= the drafter's block size positions: through a graph (of the
        whole block, sliced) where one fits and is the cheaper, else eagerly."""
        r, c = mask.shape
        if ((r > 1, chain) not in self.ready or c < 2 or r * self.gamma > self.max_rows
                or (gamma != self.gamma and r > self.FULL_BLOCK_ROWS)):
            return self.proposer.draft_pass(pool, anchors, anchor_pos, flat, mask, gamma, chain)
        # (all guards evaluated: skipping them measured no gain here, 2.3 ms either way)
        out = self._compiled(pool, anchors, anchor_pos, flat, mask, self.gamma, chain)
        # the leading positions of the whole block: drafts as the drafter was trained to make them
        # (a block of its block size), where a shorter block's are its own
        return tuple(t if t is None or gamma == self.gamma else t[:, :gamma] for t in out)


# DSPARK_CHECK_GUARDS=1 evaluates every guard of a compiled decode step's call (`_run`).
CHECK_GUARDS = os.environ.get("DSPARK_CHECK_GUARDS", "0") not in ("", "0")


def _run(compiled, settled: bool, *args):
    """Call a compiled decode step. Dynamo checks each call against the guards of its graphs: some
    7,000 (the type, size and strides of every weight tensor, every norm's eps...), 0.3-0.8 ms of a
    forward of one request (8-10 ms on two Sapphire Rapids cores, six interleaved comparisons).
    Once every graph is compiled (`settled`: no compile in flight, none to come), only the guards
    that tell the graphs apart are evaluated (`skip_guard_eval_unsafe`): the weights never change
    after loading, and `CompiledStep.__call__` sends a graph only the inputs it was made for (its
    class, the row limit, no dimension of 1), which the tests drive with `fail_on_recompile` over
    sizes unlike the warm-up's. DSPARK_CHECK_GUARDS=1 evaluates them all."""
    if not settled or CHECK_GUARDS:
        return compiled(*args)
    from torch._dynamo import eval_frame

    stance = getattr(getattr(eval_frame, "_stance", None), "stance", "default")  # keep a caller's (tests: fail_on_recompile)
    with torch.compiler.set_stance(stance, skip_guard_eval_unsafe=True):
        return compiled(*args)


def packed_weights(model) -> list:
    """The packed weight of every linear and of the head (None where one has none)."""
    return [quant.packed_of(layer) for _, layer in model.linears()] + [getattr(model, "head_packed", None)]


def _all_packed(model) -> bool:
    return getattr(model, "head_packed", None) is not None and all(
        quant.packed_of(layer) is not None for _, layer in model.linears())


def _configure() -> None:
    """The compiler settings the graphs need, for the calling thread (torch keeps user settings of
    its compiler configs per thread)."""
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config

    inductor_config.emulate_precision_casts = True  # fused chains round where eager rounds
    # The graph's wrapper (the code that calls its ~300 kernels and extern ops) in C++ rather than
    # Python: the same kernels, so the same bits; a decode forward of one request 9.7 -> 8.3 ms on
    # two Sapphire Rapids cores (docs/benchmarks/compile.md). TORCHINDUCTOR_CPP_WRAPPER=0 keeps the
    # Python wrapper.
    if "TORCHINDUCTOR_CPP_WRAPPER" not in os.environ:
        inductor_config.cpp_wrapper = True
    # Every dimension its own symbol: with duck shaping, two sizes equal in the dummy inputs would
    # be guarded equal, and a real step would recompile.
    fx_config.use_duck_shape = False


def code_fingerprint() -> str:
    """A digest of what a compiled graph is traced from: torch's version and the source of the
    models package, of this module and of engine/speculative.py (the drafter context entries).
    Inductor's caches restore a graph with the guards of the compile that made it, keyed by the
    traced graph and not by the Python around it: an entry made by an earlier version, whose code
    took a branch on a size (the packed kernels' former 64-row limit), came back with that bound,
    and a step of 68 tokens recompiled in the middle of serving (15 s). So graphs of another
    version of the code are not reused."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256(torch.__version__.encode())
    models = Path(quant.__file__).parent
    here = Path(__file__)  # this module, and the drafter context entries traced into the graphs
    for path in sorted([*models.rglob("*.py"), *models.rglob("*.cpp"), here, here.with_name("speculative.py")]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _use_dspark_inductor_cache() -> None:
    """Keep inductor's compiled kernels in the dspark cache directory (persistent across starts;
    /tmp is not in a container), one directory per version of the traced code
    (`code_fingerprint`), unless the user chose a directory."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its default into the variable the first time it asks: that is not a choice.
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        from dspark_serve.models.loader import cache_dir

        path = cache_dir() / "inductor" / code_fingerprint()
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
