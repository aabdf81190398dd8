"""Builders shared by the tests: tiny random-weight models and drafters, prompts.

(A module with a unique name rather than `conftest`, which several test folders have.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 120.0

CHAT_PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain gravity to a child.",
    "List three fruits and their colours.",
    "How do I reverse a list in Python?",
    "Give me a synonym for happy.",
    "What is 17 times 23?",
    "Describe a sunset in one sentence.",
    "Name a famous physicist.",
    "Translate 'good morning' into French.",
]


def make_tiny_model(path, model_type: str = "llama", tokenizer=None, shard: bool = False, **overrides):
    """Save a random-weight HF model of `model_type` (and a tokenizer) to `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    kw = dict(
        vocab_size=tokenizer.vocab_size if tokenizer is not None else 512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=model_type == "llama",
        eos_token_id=2,
        bos_token_id=1,
    )
    if model_type == "qwen3":
        kw["head_dim"] = 32
    kw.update(overrides)
    cfg = AutoConfig.for_model(model_type, **kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random norms and biases, so the test sees a wrong pairing of weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path), max_shard_size="200KB" if shard else "10GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return model


def make_random_drafter(target_dir_or_model, path, seed: int = 0, **kw):
    """Save a random-weight DSpark drafter (DeepSpec format) shaped for a target."""
    from dspark_serve.models.dspark import DSparkDrafter, random_drafter_config, save_drafter
    from dspark_serve.models.loader import load_model

    target = target_dir_or_model
    if isinstance(target, str):
        target = load_model(target, dtype="float32").model
    torch.manual_seed(seed)
    cfg = random_drafter_config(target.config, **kw)
    drafter = DSparkDrafter(cfg)
    drafter.attach_target(target)
    save_drafter(drafter, path)
    return str(path)


# ---------------------------------------------------------------- driving an engine

def drive(engine, requests, arrivals=None) -> dict:
    """Run requests [(id, token ids, SamplingParams)] to completion on an LLMEngine.

    arrivals: {step index: [request indices]} to add requests mid-flight (default: all at
    step 0). Returns {id: final RequestOutput}.
    """
    pending = dict(arrivals or {0: list(range(len(requests)))})
    done, step = {}, 0
    while pending or engine.has_unfinished_requests():
        for i in pending.pop(step, []):
            rid, ids, p = requests[i]
            engine.add_request(rid, params=p, prompt_token_ids=ids)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return done


def drive_mixed(engine, rng, make_request, num: int = 200, abort_rate: float = 0.2, check=None) -> tuple[int, int]:
    """`num` requests added one by one with 0-3 steps between them, a random live one aborted with
    probability `abort_rate` after each, then run to the end. make_request(rng, i) gives (token ids,
    SamplingParams); check(engine) runs after every addition. Returns (finished, aborted)."""
    live: list[str] = []
    finished = aborted = 0
    for i in range(num):
        ids, p = make_request(rng, i)
        engine.add_request(f"m{i}", params=p, prompt_token_ids=ids)
        live.append(f"m{i}")
        for _ in range(rng.randint(0, 3)):
            for out in engine.step():
                if out.finished:
                    finished += 1
                    live.remove(out.request_id)
        if live and rng.random() < abort_rate:
            victim = rng.choice(live)
            assert engine.abort_request(victim)
            live.remove(victim)
            aborted += 1
        if check is not None:
            check(engine)
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished += out.finished
    return finished, aborted


# ---------------------------------------------------------------- a real server on loopback

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class ServerProcess:
    """`python -m dspark_serve.server.cli serve ...` on a free 127.0.0.1 port, with its log in a file.

    One torch thread unless the args say otherwise (the test client needs the other core).
    `command_prefix` wraps the command (e.g. a sandbox); `env` adds variables; DSPARK_* from
    the caller's environment are dropped so that only what the test passes applies.
    """

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 command_prefix: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DSPARK_")}
        full_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        # --dtype auto would time bf16 against fp32 and may pick bf16; greedy comparisons need fp32.
        full_env["DSPARK_CPU_DTYPE"] = os.environ.get("DSPARK_CPU_DTYPE", "float32")
        # No background compile unless a test asks for it (--no-enforce-eager or its env).
        full_env["DSPARK_ENFORCE_EAGER"] = os.environ.get("DSPARK_ENFORCE_EAGER", "1")
        full_env.update(env or {})
        threads = [] if "--num-threads" in args else ["--num-threads", "1"]
        command = [sys.executable, "-m", "dspark_serve.server.cli", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), *threads, *args]
        self._log = open(log_path, "w")
        # The log is a descriptor opened out here: it stays writable inside any sandbox prefix.
        self.proc = subprocess.Popen([*(command_prefix or []), *command], cwd=REPO, env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def access_lines(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            m = re.search(r"dspark\.access: (\{.*\})$", line)
            if m:
                out.append(json.loads(m.group(1)))
        return out

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@contextmanager
def serving(args: list[str], log_path: Path, env: dict[str, str] | None = None):
    """A ready ServerProcess for the `with` block (fixtures: `with serving(...) as srv: yield srv`)."""
    srv = ServerProcess(args, log_path, env)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
