"""KL coefficient controllers for KL-in-reward (verl `kl_ctrl`): fixed and adaptive."""

from __future__ import annotations

from torch import Tensor

from alignops._validate import check_float


class FixedKLController:
    """Constant KL coefficient (verl `kl_ctrl.type=fixed`)."""

    def __init__(self, kl_coef: float):
        self.value = check_float("kl_coef", kl_coef, lo=0.0, lo_open=False)

    def update(self, current_kl=None, n_steps: int = 1) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al.'s adaptive KL coefficient (verl `kl_ctrl.type=adaptive`, docs/methods.md §1.10):
    value *= 1 + clip(KL / target_kl - 1, -0.2, 0.2) * n_steps / horizon.

    `current_kl` is the batch KL (a float or a 0-dim tensor; a tensor is read once, which
    synchronises). In data-parallel training pass the global mean so every rank stays identical.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        self.value = check_float("init_kl_coef", init_kl_coef, lo=0.0, lo_open=False)
        self.target = check_float("target_kl", target_kl, lo=0.0, lo_open=True)
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon <= 0:
            raise ValueError(f"horizon must be a positive int, got {horizon!r}")
        self.horizon = horizon

    def update(self, current_kl, n_steps: int) -> float:
        if isinstance(current_kl, Tensor):
            current_kl = float(current_kl.detach().reshape(()))
        current_kl = check_float("current_kl", current_kl)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
