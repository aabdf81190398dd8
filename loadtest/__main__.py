"""`python -m dspark_serve.loadtest [run] ...`, `python -m dspark_serve.loadtest sweep ...`,
`python -m dspark_serve.loadtest plot ...`."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "sweep":
        from .sweep import sweep_main

        return sweep_main(argv[1:])
    if argv and argv[0] == "plot":
        from .sweep import plot_main

        return plot_main(argv[1:])
    from .cli import run_main

    return run_main(argv[1:] if argv and argv[0] == "run" else argv)


if __name__ == "__main__":
    raise SystemExit(main())
