"""Test-only fault injection: make one request fail inside the engine, on purpose.

Reliability tests need to prove that a failure inside one request's processing
(a NaN in its logits, an exception in its sampling preparation or its
detokenization) fails that request alone and leaves the others and the engine
running, and that a dead engine thread is noticed (`kill_engine`). Such
failures cannot be provoked from outside, so the engine has a hook for them,
armed per request id.

The hook exists only when the process was started with DSPARK_FAULT_INJECTION=1
(`FaultInjector.from_env()` returns None otherwise, and every check in the
engine is then a single `is None` test). The server, with the hook present,
reads the request body field `dspark_fault` (see docs/reliability.md).
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "DSPARK_FAULT_INJECTION"
KINDS = ("nan_logits", "prepare", "detokenize", "kill_engine")


class InjectedFault(RuntimeError):
    """Raised by an armed `prepare` or `detokenize` fault."""


class EngineKilled(BaseException):
    """Raised by an armed `kill_engine` fault. Not an Exception: it escapes the per-request and
    per-step handlers and ends the engine thread, as a bug outside them would."""


class FaultInjector:
    def __init__(self):
        # request id -> fault kind; set by the server's event loop, read by the engine thread
        # (single dict operations: atomic under the GIL).
        self._armed: dict[str, str] = {}

    @classmethod
    def from_env(cls, environ=None) -> "FaultInjector | None":
        environ = os.environ if environ is None else environ
        return cls() if environ.get(ENV_VAR, "") not in ("", "0", "false") else None

    def arm(self, request_id: str, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {list(KINDS)}")
        self._armed[request_id] = kind

    def disarm(self, request_id: str) -> None:
        self._armed.pop(request_id, None)

    def after_forward(self, logits: torch.Tensor, rows: list[tuple[str, int, int]]) -> None:
        """rows: (request id, first row, number of rows) of each request in `logits`."""
        for rid, row, nrows in rows:
            kind = self._armed.get(rid)
            if kind == "nan_logits":
                with torch.inference_mode():  # the runner's logits are inference tensors
                    logits[row:row + nrows] = float("nan")
            elif kind == "kill_engine":
                raise EngineKilled(f"injected engine-thread death (request {rid})")

    def before_prepare(self, request_ids: list[str]) -> None:
        """Called by the Sampler on the requests of a batch, then on each alone after a failure."""
        for rid in request_ids:
            if self._armed.get(rid) == "prepare":
                raise InjectedFault(f"injected sampling-preparation failure in request {rid}")

    def before_detokenize(self, request_id: str) -> None:
        if self._armed.get(request_id) == "detokenize":
            raise InjectedFault(f"injected detokenization failure in request {request_id}")
