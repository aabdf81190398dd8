"""`dspark synth-prompts`: templated math and Python prompts for gen-data."""

from __future__ import annotations

import ast
import json
import re
from fractions import Fraction

from dspark_serve.server.cli import main
from dspark_serve.training.data import iter_examples
from dspark_serve.training.prompts import MATH_SUFFIX, synth_prompts


def test_prompts_are_distinct_and_a_seed_fixes_them():
    a = list(synth_prompts(800, seed=3))
    assert len(a) == len(set(a)) == 800
    assert a == list(synth_prompts(800, seed=3))
    assert a != list(synth_prompts(800, seed=4))
    # a prefix keeps the mix: ~40% Python (one-line requests and stubs), the rest math
    code = sum(p.startswith("Write a") or "```python" in p for p in a[:400])
    assert 0.3 < code / 400 < 0.5
    assert 0.6 < sum(p.endswith(MATH_SUFFIX) for p in a[:400]) / (400 - code) < 0.95


def test_function_stubs_are_valid_python_with_a_docstring():
    stubs = [p for p in synth_prompts(600, seed=0) if "```python" in p]
    assert len(stubs) > 50
    for p in stubs:
        src = re.search(r"```python\n(.*)```", p, re.S).group(1)
        fn = [n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef)]
        assert len(fn) == 1 and ast.get_docstring(fn[0]), p
        assert fn[0].returns is not None and all(a.annotation is not None for a in fn[0].args.args), p


def test_linear_equations_have_the_integer_solution_they_were_built_from():
    eqs = [re.search(r"\$(\d+)x ([+-]) (\d+) = (-?\d+)\$", p) for p in synth_prompts(3000, seed=1)]
    eqs = [m for m in eqs if m]
    assert len(eqs) > 20
    for m in eqs:
        a, sign, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        x = Fraction(c - (b if sign == "+" else -b), a)
        assert x.denominator == 1 and -10 <= x <= 15


def test_cli_writes_jsonl_that_gen_data_reads(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert main(["synth-prompts", "--out", str(out), "--num", "50", "--seed", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompts"] == 50
    rows = list(iter_examples(str(out)))
    assert [text for _, text, _ in rows] == list(synth_prompts(50, seed=2))
    assert all(reply is None for _, _, reply in rows)  # prompts only: the target writes the responses
