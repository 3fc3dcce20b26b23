r"""Prints parameter counts per component for gin model files, abstractly (jax.eval_shape).

    python scripts/param_counts.py                       # every gin/models/*.gin
    python scripts/param_counts.py gin/models/tiny.gin   # one file

Nothing is allocated, so the 1.6B-parameter configs count in seconds on a laptop.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from spectron_jax import config as config_lib
from spectron_jax import models

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin"


def format_counts(name: str, counts: dict[str, int]) -> str:
    parts = "  ".join(f"{k} {v / 1e6:,.2f}M" for k, v in counts.items() if k != "total")
    return f"{name:<14} total {counts['total'] / 1e6:>9,.2f}M  |  {parts}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="gin model files (default: gin/models/*.gin)")
    args = parser.parse_args(argv)
    files = args.files or sorted(str(p) for p in (GIN_DIR / "models").glob("*.gin"))
    for path in files:
        counts = models.param_counts(config_lib.config_from_gin_file(path, (str(GIN_DIR),)))
        print(format_counts(pathlib.Path(path).stem, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
