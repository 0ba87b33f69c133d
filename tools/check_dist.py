"""What `make wheel` packed, checked as a user would receive it (part of `make test`).

    python tools/check_dist.py dist [--build-sdist PYTHON]

The wheel: the extension and one CPU kernel library per ISA level of the architecture, the Triton
kernels as alignops.kernels, the build record, py.typed and the licence; no top-level package but
alignops (no tests, bench or kernels); `torch==` the release the extension was built against and
the extras. The sdist: every tracked file the build reads (csrc/, kernels/, alignops/, setup.py,
pyproject.toml) and the tests with their conftest, never a build product. `--build-sdist PYTHON`
also builds a wheel from the unpacked sdist with that interpreter (the default ISA level only, to
keep it short), which proves the sdist builds on its own.
"""

from __future__ import annotations

import argparse
import email.parser
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tracked(*paths: str) -> set[str]:
    out = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(out.split())


def check_wheel(whl: Path, torch_release: str) -> list[str]:
    errors = []
    names = set(zipfile.ZipFile(whl).namelist())
    isas = ["default", "avx2", "avx512"] if platform.machine() in ("x86_64", "AMD64") else ["default"]
    for lib in ["_C"] + [f"_cpu_{i}" for i in isas]:
        if not any(n.startswith(f"alignops/{lib}.") and n.endswith(".so") for n in names):
            errors.append(f"wheel lacks alignops/{lib}*.so")
    for kernel in sorted(p.name for p in (ROOT / "kernels").glob("*.py")):
        if f"alignops/kernels/{kernel}" not in names:
            errors.append(f"wheel lacks alignops/kernels/{kernel}")
    for module in sorted(tracked("alignops")):
        if module.endswith(".py") and module not in names:
            errors.append(f"wheel lacks {module}")
    for f in ("alignops/_build_info.json", "alignops/py.typed"):
        if f not in names:
            errors.append(f"wheel lacks {f}")
    if not any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names):
        errors.append("wheel lacks the LICENSE")
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    if tops != {"alignops"}:
        errors.append(f"wheel installs top-level names other than alignops: {sorted(tops - {'alignops'})}")
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = email.parser.Parser().parsestr(zipfile.ZipFile(whl).read(meta_name).decode())
    requires = meta.get_all("Requires-Dist") or []
    if f"torch=={torch_release}" not in requires:
        errors.append(f"wheel requires {[r for r in requires if r.startswith('torch')]}, not torch=={torch_release} "
                      f"(the torch it was built against)")
    extras = set(meta.get_all("Provides-Extra") or [])
    for extra in ("triton", "train", "trl", "verl", "openrlhf", "dev"):
        if extra not in extras:
            errors.append(f"wheel lacks the extra [{extra}]")
    if meta.get("License") != "Apache-2.0" and "Apache" not in (meta.get("License-Expression") or ""):
        errors.append(f"wheel licence is {meta.get('License')!r}")
    return errors


def check_sdist(sdist: Path) -> list[str]:
    errors = []
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    need = tracked("csrc", "kernels", "alignops", "tests") | {"setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE"}
    for f in sorted(need - names):
        errors.append(f"sdist lacks {f}")
    for f in sorted(names):
        if f.endswith((".so", ".o", ".pyc")) or f == "alignops/_build_info.json":
            errors.append(f"sdist carries a build product: {f}")
    return errors


def build_sdist(sdist: Path, python: str) -> list[str]:
    """A wheel from the unpacked sdist, alone in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        src = next(Path(tmp).iterdir())
        env = dict(os.environ, ALIGNOPS_CPU_ISAS="default", ALIGNOPS_NO_CUDA="1")
        proc = subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                               str(Path(tmp) / "out"), str(src)], env=env, capture_output=True, text=True,
                              cwd=tmp)
        if proc.returncode != 0:
            return [f"the sdist does not build:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"]
        whl = next((Path(tmp) / "out").glob("*.whl"))
        names = zipfile.ZipFile(whl).namelist()
        if not any(n.startswith("alignops/_C.") for n in names):
            return ["the wheel built from the sdist has no alignops/_C"]
    return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dist", type=Path)
    ap.add_argument("--build-sdist", metavar="PYTHON", help="also build a wheel from the sdist with this python")
    args = ap.parse_args(argv)
    import torch  # noqa: PLC0415 - the torch the wheel was built against is the one of this interpreter
    release = torch.__version__.split("+", 1)[0]
    wheels, sdists = sorted(args.dist.glob("alignops-*.whl")), sorted(args.dist.glob("alignops-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"check_dist: expected one wheel and one sdist in {args.dist}, found {wheels + sdists}")
        return 1
    errors = check_wheel(wheels[0], release) + check_sdist(sdists[0])
    if args.build_sdist and not errors:
        errors += build_sdist(sdists[0], args.build_sdist)
    for e in errors:
        print(f"check_dist: FAIL {e}")
    print(f"check_dist: {wheels[0].name} and {sdists[0].name}: "
          + ("ok" + (", the sdist builds" if args.build_sdist else "") if not errors else f"{len(errors)} problems"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
