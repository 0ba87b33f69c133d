"""How the package meets a user's environment: the build refuses an environment without torch
instead of building against a downloaded one; a required backend that cannot run fails the test
run instead of turning into skips; the trainer names its missing extra before any work.

(`make test` also builds the wheel and the sdist, installs the wheel into a clean virtualenv and
runs the op tests there: the Makefile's wheel-check and op-tests, tools/check_dist.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import checkout_root

TESTS = Path(__file__).resolve().parent


def _broken_module(tmp_path, name: str) -> str:
    """A folder to put first on PYTHONPATH in which `import <name>` raises ImportError."""
    pkg = tmp_path / "broken" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"raise ImportError('planted: {name} is broken here')\n")
    return str(tmp_path / "broken")


def test_the_build_refuses_an_environment_without_torch(tmp_path):
    root = checkout_root()
    env = dict(os.environ, PYTHONPATH=_broken_module(tmp_path, "torch"))
    proc = subprocess.run([sys.executable, "setup.py", "dist_info", "--output-dir", str(tmp_path)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--no-build-isolation" in proc.stderr and "found none here" in proc.stderr, proc.stderr[-2000:]


def test_the_sdist_needs_no_torch(tmp_path):
    """`egg_info` is what pip runs first for an sdist: it must work where torch does not import."""
    root = checkout_root()
    env = dict(os.environ, PYTHONPATH=_broken_module(tmp_path, "torch"))
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "alignops.egg-info" / "PKG-INFO").exists()


def _pytest_with(tmp_path, required: str, *pythonpath: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "ALIGNOPS_REQUIRE"))}
    env.update(ALIGNOPS_REQUIRE_BACKENDS=required,
               PYTHONPATH=os.pathsep.join([*pythonpath, str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
                           str(TESTS / "test_cpu_isa.py"), "-k", "every_compiled_level"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_required_backend_that_cannot_run_fails_the_run(tmp_path):
    broken = _broken_module(tmp_path, "triton")
    proc = _pytest_with(tmp_path, "cpu,triton", broken)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert "required backends cannot run here" in out and "triton" in out and "planted" in out, out[-3000:]
    # the same broken triton with only cpu required: the gate lets the run go on
    proc = _pytest_with(tmp_path, "cpu", broken)
    assert proc.returncode in (0, 5), (proc.stdout + proc.stderr)[-3000:]


def test_auto_requires_the_machines_backends(monkeypatch):
    from tests import conftest  # noqa: PLC0415
    monkeypatch.setenv("ALIGNOPS_REQUIRE_BACKENDS", "auto")
    want = {"cpu": "cpu", "triton": "cuda" if conftest.HAS_CUDA else "cpu"}
    if conftest.HAS_CUDA:
        want["cuda"] = "cuda"
    assert conftest.required_backends() == want
    monkeypatch.setenv("ALIGNOPS_REQUIRE_BACKENDS", "")
    assert conftest.required_backends() == {}


def test_the_trainer_names_its_missing_extra(monkeypatch):
    import importlib.util  # noqa: PLC0415

    from alignops.train import require_train_extra  # noqa: PLC0415
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(ImportError, match=r"matplotlib.*alignops\[train\]"):
        require_train_extra()
