"""Checkpoints in safetensors, written atomically (temp file + rename), loaded without pickle.

A checkpoint directory holds model.safetensors (policy weights), optim.safetensors (optimizer
state, flattened), state.json (step, RNG states, config, metrics so far) and tokenizer.json.
"""

from __future__ import annotations

import json
import os
import random

import torch
from safetensors.torch import load_file, save_file


def _atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda p: save_file(tensors, p))


def save_json(path: str, data) -> None:
    def write(p):
        with open(p, "w") as f:
            json.dump(data, f, indent=1)
    _atomic(path, write)


def load_json(path: str):
    with open(path) as f:
        return json.load(f)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Flattens an optimizer state dict into tensors (safetensors) + a JSON skeleton."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict, skeleton: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in skeleton["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": skeleton["param_groups"]})


def rng_state(generator: torch.Generator, py_rng: random.Random) -> dict:
    return {"torch": torch.get_rng_state().tolist(), "sampler": generator.get_state().tolist(),
            "python": list(py_rng.getstate()[1]), "python_version": py_rng.getstate()[0],
            "python_gauss": py_rng.getstate()[2]}


def set_rng_state(state: dict, generator: torch.Generator, py_rng: random.Random) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    generator.set_state(torch.tensor(state["sampler"], dtype=torch.uint8))
    py_rng.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


def save_checkpoint(path: str, model, optimizer=None, state: dict | None = None, tokenizer=None) -> None:
    os.makedirs(path, exist_ok=True)
    save_tensors(os.path.join(path, "model.safetensors"), model.state_dict())
    if optimizer is not None:
        tensors, skeleton = optimizer_tensors(optimizer)
        save_tensors(os.path.join(path, "optim.safetensors"), tensors)
        state = dict(state or {}, optimizer=skeleton)
    if tokenizer is not None:
        _atomic(os.path.join(path, "tokenizer.json"), lambda p: open(p, "w").write(tokenizer.to_json()))
    # state.json last: a checkpoint is complete exactly when it exists
    save_json(os.path.join(path, "state.json"), state or {})


def load_model_weights(path: str, model) -> None:
    weights = load_file(os.path.join(path, "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight") or "lm_head.weight" in weights]
    if real_missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {real_missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def is_checkpoint(path: str | None) -> bool:
    return bool(path) and os.path.exists(os.path.join(path, "state.json")) and \
        os.path.exists(os.path.join(path, "model.safetensors"))
