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


def checkout_root(module_level: bool = False):
    """The alignops source checkout, for the few tests that read files the installed package does
    not carry (csrc/, the docs): ALIGNOPS_CHECKOUT when set (the wheel check runs the tests from a
    copy outside the tree, against the installed package), else the tree these tests sit in; a
    test that needs it and has neither is skipped, saying so."""
    import pathlib  # noqa: PLC0415
    env = os.environ.get("ALIGNOPS_CHECKOUT")
    root = pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[1]
    if not (root / "setup.py").exists() or not (root / "csrc").is_dir():
        pytest.skip("needs a checkout of the alignops repository (set ALIGNOPS_CHECKOUT to one)",
                    allow_module_level=module_level)
    return root


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


def fast_backends() -> list[str]:
    """Every fast backend that runs here, each once, on the device it is for: cpu on CPU tensors;
    triton on CUDA tensors where there is a GPU (compiled), else on CPU tensors (interpreted); cuda
    on CUDA tensors. `device_of(backend)` gives the device a test makes its tensors on."""
    return [b for b in ("cpu", "triton", "cuda") if b in backends_for(device_of(b))]


def device_of(backend: str) -> str:
    """The device a backend-parametrised test runs `backend` on (see fast_backends)."""
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def required_backends() -> dict[str, str]:
    """The backends ALIGNOPS_REQUIRE_BACKENDS demands, each with the device it must run on.
    `auto` (what `make test` and bench/gpu.sh set): the machine's own set, cpu and triton
    everywhere (interpreted without a GPU), cuda where there is a GPU; or a comma-separated list."""
    spec = os.environ.get("ALIGNOPS_REQUIRE_BACKENDS", "").strip()
    if not spec:
        return {}
    names = ["cpu", "triton"] + (["cuda"] if HAS_CUDA else []) if spec == "auto" else \
        [s.strip() for s in spec.split(",") if s.strip()]
    return {b: device_of(b) for b in names}


def _backend_failure(backend: str, device: str) -> str | None:
    """None if `backend` runs a token log-prob on `device` and agrees with float64, else why not."""
    reason = _backend.why_unavailable(backend, torch.device(device))
    if reason is not None:
        return reason
    try:
        import alignops as ao  # noqa: PLC0415
        x = torch.linspace(-3, 3, 2 * 37, dtype=torch.float32).reshape(2, 37).to(device)
        y = torch.tensor([3, 36]).to(device)
        got = ao.token_logprobs(x, y, backend=backend).double().cpu()
        want = torch.log_softmax(x.double().cpu(), -1).gather(1, y.cpu()[:, None])[:, 0]
        if not torch.allclose(got, want, rtol=0, atol=1e-5):
            return f"token_logprobs gave {got.tolist()}, float64 says {want.tolist()}"
    except Exception as e:  # noqa: BLE001 - any failure of a required backend is reported, then fatal
        return f"{type(e).__name__}: {e}"
    return None


def pytest_report_header(config):
    import alignops  # noqa: PLC0415
    return f"alignops from {os.path.dirname(alignops.__file__)}"


def pytest_sessionstart(session):
    """Under `make test` a backend that should run here and does not fails the run at once, naming
    it, instead of turning its parametrisations into skips. ALIGNOPS_EXPECT_INSTALLED=1 (the wheel
    check) fails the run if alignops is imported from a source tree instead of site-packages."""
    if os.environ.get("ALIGNOPS_EXPECT_INSTALLED") == "1":
        import alignops  # noqa: PLC0415
        where = os.path.dirname(os.path.abspath(alignops.__file__))
        if os.path.exists(os.path.join(where, "..", "setup.py")) or "site-packages" not in where:
            pytest.exit(f"ALIGNOPS_EXPECT_INSTALLED: alignops was imported from {where}, not from an installed "
                        "package", returncode=3)
    failures = [f"{b} on {d} tensors: {why}" for b, d in required_backends().items()
                if (why := _backend_failure(b, d)) is not None]
    if failures:
        pytest.exit("ALIGNOPS_REQUIRE_BACKENDS: required backends cannot run here:\n  " + "\n  ".join(failures),
                    returncode=3)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
