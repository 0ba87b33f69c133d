"""`make bench`: every benchmark in bench/ (bench_*.py with a main()), results in bench/results/."""

import importlib
import pkgutil
import sys

import bench


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    for name in names:
        print(f"== {name}")
        importlib.import_module(f"bench.{name}").main(argv)


if __name__ == "__main__":
    main()
