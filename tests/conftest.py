"""Shared test setup.

TRITON_INTERPRET must be set before triton is imported, so it is set here, first, whenever no GPU
is present: the triton backend then runs on CPU tensors (keep those shapes small).
"""

import os

if os.environ.get("ALIGNOPS_TEST_GPU") != "1":
    try:
        import torch as _torch
        _has_cuda = _torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from alignops import _backend  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()


def backends_for(device: str) -> list[str]:
    """Non-reference backends that run on tensors of `device` here."""
    return [b for b in _backend.available_backends(device) if b != "torch"]


def device_backend_pairs() -> list[tuple[str, str]]:
    """(device, backend) pairs that run here: every fast backend is compared with the oracle."""
    pairs = [("cpu", b) for b in backends_for("cpu")]
    if HAS_CUDA:
        pairs += [("cuda", b) for b in backends_for("cuda")]
    return pairs


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
