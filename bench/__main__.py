"""`python -m bench` (or `make bench`): run every benchmark in this folder in turn, each printing its own figures.

`python -m bench NAME ...` runs only those; to pass flags, run one directly: `python -m bench.vector_index --help`.
"""

import pkgutil
import runpy
import sys
from pathlib import Path


def main() -> None:
    available = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))
    chosen = sys.argv[1:] or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        sys.exit(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available)}")
    for name in chosen:
        print(f"\n######## bench.{name}", flush=True)
        sys.argv = [f"bench.{name}"]
        runpy.run_module(f"bench.{name}", run_name="__main__")


if __name__ == "__main__":
    main()
