"""Shared test setup.

TRITON_INTERPRET must be set before triton is imported, so it is set here, first, whenever no GPU
is present: the triton backend then runs on CPU tensors (keep those shapes small).
"""

import math
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


def require_framework(distribution: str, module: str | None = None):
    """The pinned framework an integration test runs against: its module (imported) or, with
    module=None, its installed distribution (OpenRLHF's package does not import without deepspeed
    and flash-attn). `make test` installs them and sets ALIGNOPS_REQUIRE_INTEGRATIONS=1, so there a
    missing framework fails the run; elsewhere (a GPU machine without network) the file is skipped."""
    import importlib  # noqa: PLC0415
    import importlib.metadata  # noqa: PLC0415

    try:
        return importlib.metadata.distribution(distribution) if module is None else importlib.import_module(module)
    except (ImportError, importlib.metadata.PackageNotFoundError) as e:
        if os.environ.get("ALIGNOPS_REQUIRE_INTEGRATIONS") == "1":
            raise RuntimeError(f"{distribution} is not installed: `make integrations` installs the pinned "
                               f"version the integration tests need") from e
        pytest.skip(f"{distribution} is not installed (make integrations)", allow_module_level=True)


def make_logits(n: int, v: int, dtype: torch.dtype, pattern: str, gen: torch.Generator, device="cpu", *,
                neginf_frac: float = 0.3, first_tile: int | None = None) -> torch.Tensor:
    """[n, v] test logits drawn in float64, then cast: "normal"; "peaked" (one logit +50 per row:
    p ~ 1 at one column, ~e^-50 elsewhere); "shifted_up"/"shifted_down" (+-1000); "neginf"
    (a `neginf_frac` share of -inf); "neginf_first_tile" (the first `first_tile` + 3 columns -inf,
    so a tiled kernel's running max stays -inf through whole tiles)."""
    x = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    if pattern == "peaked":
        x[torch.arange(n), torch.randint(0, v, (n,), generator=gen)] += 50
    elif pattern == "shifted_up":
        x += 1000
    elif pattern == "shifted_down":
        x -= 1000
    elif pattern == "neginf" and v > 1:
        x[torch.rand(n, v, generator=gen) < neginf_frac] = -math.inf
    elif pattern == "neginf_first_tile" and v > 1:
        x[:, : max(1, min(v - 1, first_tile + 3))] = -math.inf
    return x.to(dtype=dtype, device=device)


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
