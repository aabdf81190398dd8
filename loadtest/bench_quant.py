"""Packed (int4 / int8) against dense linears on this CPU, at the default model's shapes.

    python -m dspark_serve.loadtest.bench_quant [--threads 2] [--dtype bfloat16] [--out docs/benchmarks/quantization]

Times one model's worth of projections (30 layers of qkv, o, gate_up and down, each layer its own
weights so that they stream from memory as in a real forward, not from cache) and the 49152 x 576
output head, for 1 to 128 rows, in five forms through models/quant.py: dense (--quantization none);
torch's kernels, int4 (group 32) and int8 (per channel); and our VNNI kernel (models/kernels, where
it builds), int4-vnni (Q4_1 blocks) and int8-vnni (Q8_0 blocks). It also measures the machine's memory
bandwidth with a large copy, for the roofline: bytes of weights one decode row reads / bandwidth.
Writes JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dspark_serve.loadtest.bench_engine import write_results

from dspark_serve.models import quant

from .report import cpu_model

SHAPES = [(1728, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2-135M: qkv, o, gate_up, down
HEAD = (49152, 576)
LAYERS = 30
ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


def _weights(kind: str, shape: tuple[int, int], dtype: torch.dtype, gen: torch.Generator):
    w = torch.randn(*shape, generator=gen) * 0.02
    if kind == "dense":
        wd = w.to(dtype)
        return (lambda x: torch.nn.functional.linear(x, wd)), wd.numel() * wd.element_size()
    kind, _, layout = kind.partition("-")
    packed = quant.PackedWeight.quantize(w, kind, dtype, layout=layout or "torch")
    return packed.mm, packed.nbytes


def _time(fn, repeats: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write counted)."""
    src = torch.ones(mib << 18, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / t


def run(threads: int, dtype: torch.dtype, repeats: int) -> dict:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    result = {"cpu": cpu_model(), "threads": threads, "dtype": str(dtype).removeprefix("torch."),
              "torch": torch.__version__, "rows": list(ROWS), "kinds": {}}
    bandwidth = memory_bandwidth()
    result["memory_bandwidth_gb_s"] = bandwidth / 1e9
    with torch.inference_mode():
        kinds = ("dense", "int4", "int8") + (("int4-vnni", "int8-vnni") if quant.vnni_kernel() else ())
        for kind in kinds:
            layers = [[_weights(kind, s, dtype, gen) for s in SHAPES] for _ in range(LAYERS)]
            head, head_bytes = _weights(kind, HEAD, dtype, gen)
            layer_bytes = sum(b for layer in layers for _, b in layer)
            per_rows = {}
            for rows in ROWS:
                xs = {k: torch.randn(rows, k, generator=gen).to(dtype) for k in (576, 1536)}

                def layers_fwd():
                    for layer in layers:
                        for (fn, _), (_, k) in zip(layer, SHAPES):
                            fn(xs[k])

                per_rows[rows] = {"layers_ms": _time(layers_fwd, repeats) * 1e3,
                                  "head_ms": _time(lambda: head(xs[576]), repeats) * 1e3}
            one = per_rows[1]
            result["kinds"][kind] = {
                "layer_bytes": layer_bytes, "head_bytes": head_bytes, "per_rows": per_rows,
                # a decode row reads every weight once: the share of the bandwidth it reaches
                "one_row_roofline_ms": (layer_bytes + head_bytes) / bandwidth * 1e3,
                "one_row_ms": one["layers_ms"] + one["head_ms"],
            }
            print(kind, {r: round(v["layers_ms"] + v["head_ms"], 2) for r, v in per_rows.items()}, flush=True)
    return result


def markdown(res: dict) -> str:
    packed = [k for k in res["kinds"] if k != "dense"]
    lines = [
        "| rows | " + " | ".join(f"{k} ms (layers + head)" for k in res["kinds"]) + " | "
        + " | ".join(f"{k} / dense" for k in packed) + " |",
        "| ---: | " + " | ".join("---:" for _ in res["kinds"]) + " | " + " | ".join("---:" for _ in packed) + " |",
    ]
    for r in res["rows"]:
        cells, tot = [], {}
        for kind, k in res["kinds"].items():
            v = k["per_rows"][r] if r in k["per_rows"] else k["per_rows"][str(r)]
            tot[kind] = v["layers_ms"] + v["head_ms"]
            cells.append(f"{v['layers_ms']:.1f} + {v['head_ms']:.1f}")
        lines.append(f"| {r} | " + " | ".join(cells) + " | " + " | ".join(f"{tot[k] / tot['dense']:.2f}" for k in packed) + " |")
    lines.append("")
    lines.append(f"Memory bandwidth (a 512 MiB copy, read + write): {res['memory_bandwidth_gb_s']:.1f} GB/s.")
    lines.append("")
    lines.append("| weights | MB read per decode row | one row, ms | at the bandwidth, ms | share of the roofline |")
    lines.append("| --- | ---: | ---: | ---: | ---: |")
    for kind, k in res["kinds"].items():
        mb = (k["layer_bytes"] + k["head_bytes"]) / 1e6
        lines.append(f"| {kind} | {mb:.0f} | {k['one_row_ms']:.1f} | {k['one_row_roofline_ms']:.1f} | "
                     f"{k['one_row_roofline_ms'] / k['one_row_ms']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="docs/benchmarks/quantization-kernels", help="path prefix of the .json and .md")
    args = ap.parse_args(argv)
    res = run(args.threads, getattr(torch, args.dtype), args.repeats)
    write_results(Path(args.out), res, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
