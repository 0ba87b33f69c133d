"""`make bench`: every benchmark in bench/ (bench_*.py with a main()), results in bench/results/.

    python -m bench.run [--skip fused_linear,...] [benchmark options]
"""

import importlib
import pkgutil
import sys

import bench


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    skip = set()
    while "--skip" in argv:  # --skip a,b: leave out bench_a and bench_b (the rest of argv goes to each)
        i = argv.index("--skip")
        skip |= {f"bench_{s.strip().removeprefix('bench_')}" for s in argv[i + 1].split(",") if s.strip()}
        del argv[i:i + 2]
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    for name in names:
        if name in skip:
            print(f"== {name}: skipped (--skip)")
            continue
        print(f"== {name}")
        importlib.import_module(f"bench.{name}").main(argv)


if __name__ == "__main__":
    main()
