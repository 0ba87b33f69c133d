"""Checkpoints in safetensors, loaded without pickle, that survive a crash at any point of a save.

A checkpoint directory holds model.safetensors (policy weights), optim.safetensors (optimizer
state, flattened), any extra tensor files (the trainer's critic.safetensors and
critic_optim.safetensors), tokenizer.json and state.json (step, RNG states, config, optimizer
skeletons, and the list of the checkpoint's files with their sizes).

Save protocol (`save_checkpoint`): every file is written into a fresh sibling directory
`<path>.ckpt-tmp-<pid>` and fsynced, state.json last, then the directory itself; then the old
checkpoint is renamed `<path>` -> `<path>.ckpt-old`, the new one `<path>.ckpt-tmp-<pid>` -> `<path>`
(the commit), the parent directory fsynced and `<path>.ckpt-old` deleted. A crash leaves at most: a
partial `.ckpt-tmp-<pid>` (ignored, and deleted once its process is gone), `<path>` missing with a
complete `<path>.ckpt-old` (between the two renames: `recover` renames it back), or `<path>` complete
with a stale `<path>.ckpt-old` (deleted). Every reader goes through `locate`, which runs `recover`
first, so what loads is always the previous checkpoint or the new one, never a mix. (The suffixes
are distinctive because `recover` deletes what carries them: a user's own `<path>.old` is safe.)

Why renames of whole directories and not a symlink swap (`os.replace` of a link is atomic and has
no window without `<path>`): with the rename pattern `<path>` stays a plain directory, so copying,
rsync, archiving, `rm -r` or moving a run to another machine behave as users expect (no dangling
link, no hidden versioned directory beside it), and nothing depends on the filesystem supporting
symlinks; the price is the one-rename window, which `recover` closes on the next load.

`<path>` is replaced whole: `save_checkpoint` refuses to replace a directory holding anything but
checkpoint files, and a training run keeps its checkpoint in `<output_dir>/checkpoint`
(CHECKPOINT_SUBDIR), beside its metrics.

For crash tests, ALIGNOPS_CHECKPOINT_KILL="<save>:<step>" makes the process SIGKILL itself right after
step <step> (1-based) of its <save>-th save_checkpoint call (each written file, the directory fsync,
each rename, the parent fsync and the removal of the old checkpoint is one step), after writing
"checkpoint: SIGKILL after save <save> step <step>: <what>" to stderr.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import sys
import warnings

import torch
from safetensors.torch import load_file, save

CHECKPOINT_SUBDIR = "checkpoint"  # where a training run (trainer.train) keeps its checkpoint
TMP_SUFFIX = ".ckpt-tmp-"  # + pid: a save being written
OLD_SUFFIX = ".ckpt-old"   # the previous checkpoint during a swap
KILL_ENV = "ALIGNOPS_CHECKPOINT_KILL"
_saves = 0  # save_checkpoint calls in this process (the crash hook counts them)


# --------------------------------------------------------------------------------------------
# single files (a checkpoint is several, written by save_checkpoint)


def load_json(path: str):
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# optimizer and RNG state


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


def rng_state(generator: torch.Generator | None, py_rng: random.Random) -> dict:
    """CPU, sampler (when a generator is given; the trainer seeds a generator per group instead,
    rollout.GroupSeeds) and Python RNG states; the CUDA ones (one per device) when CUDA is
    available (the trainer's mini-batch permutations on a GPU draw from the CUDA default generator)."""
    state = {"torch": torch.get_rng_state().tolist(),
             "python": list(py_rng.getstate()[1]), "python_version": py_rng.getstate()[0],
             "python_gauss": py_rng.getstate()[2]}
    if generator is not None:
        state["sampler"] = generator.get_state().tolist()
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict, generator: torch.Generator | None, py_rng: random.Random) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if generator is not None:
        if "sampler" not in state:
            raise ValueError("the checkpoint holds no sampler generator state (it seeds a generator per group)")
        generator.set_state(torch.tensor(state["sampler"], dtype=torch.uint8))
    py_rng.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    cuda = state.get("cuda")
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn("the checkpoint holds CUDA RNG states but CUDA is not available: not restored",
                          stacklevel=2)
            return
        n = torch.cuda.device_count()
        if len(cuda) != n:
            warnings.warn(f"the checkpoint holds {len(cuda)} CUDA RNG states, this machine has {n} devices: "
                          f"restoring the first {min(n, len(cuda))}", stacklevel=2)
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda[:n]])


# --------------------------------------------------------------------------------------------
# whole checkpoints


def _kill_point(save_index: int, step: int, what: str) -> None:
    """The crash-test hook (ALIGNOPS_CHECKPOINT_KILL, see the module docstring)."""
    want = os.environ.get(KILL_ENV)
    if want and want == f"{save_index}:{step}":
        sys.stderr.write(f"checkpoint: SIGKILL after save {save_index} step {step}: {what}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: str) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def _model_tensors(model) -> dict[str, torch.Tensor]:
    """model.state_dict() with each tied tensor once, under its first name (safetensors refuses
    tensors that share memory): a tied lm_head.weight is left out, and load_model_weights keeps
    the freshly built model's tie."""
    seen, tensors = set(), {}
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key not in seen or t.numel() == 0:  # empty tensors may all sit at address 0
            seen.add(key)
            tensors[name] = t
    return tensors


def is_complete(path: str) -> bool:
    """A directory holding a whole checkpoint: state.json (written last) parses and every file it
    lists has its recorded size; checkpoints from before the file list need model.safetensors."""
    try:
        state = load_json(os.path.join(path, "state.json"))
    except (OSError, ValueError):
        return False
    files = state.get("checkpoint_files") if isinstance(state, dict) else None
    if files is None:
        return os.path.isfile(os.path.join(path, "model.safetensors"))
    try:
        return all(os.path.getsize(os.path.join(path, name)) == size for name, size in files.items())
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(path: str) -> str | None:
    """Repairs what an interrupted save left at `path` and returns the directory of the complete
    checkpoint there (None when there is none): a complete `<path>.ckpt-old` is renamed back when
    `<path>` is missing (the crash fell between the two renames) and read in place when `<path>`
    exists but is incomplete (not something a save leaves; nothing is deleted then); a stale
    `<path>.ckpt-old` beside a complete `<path>` and the `<path>.ckpt-tmp-<pid>` of processes that
    are gone (or of this one: no save of ours is under way when this runs) are deleted."""
    path = os.path.abspath(path)
    old = path + OLD_SUFFIX
    if not os.path.lexists(path) and is_complete(old):
        os.rename(old, path)
        _fsync_dir(os.path.dirname(path))
    elif os.path.isdir(old) and is_complete(path):
        shutil.rmtree(old)
    for tmp in glob.glob(glob.escape(path + TMP_SUFFIX) + "*"):
        pid = tmp[len(path + TMP_SUFFIX):]
        if os.path.isdir(tmp) and pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)
    if is_complete(path):
        return path
    return old if is_complete(old) else None


def locate(path: str | None) -> str | None:
    """The directory of the committed checkpoint for `path` (after `recover`): a training run's
    `<path>/checkpoint`, else `<path>` itself (a checkpoint directory, e.g. the SFT base, or a run
    written before runs kept their checkpoint in a subdirectory); None when there is none."""
    if not path:
        return None
    if not os.path.isdir(path) and not os.path.isdir(os.path.abspath(path) + OLD_SUFFIX):
        return None
    for p in (os.path.join(path, CHECKPOINT_SUBDIR), path):
        where = recover(p)  # also when p is missing: its dead saves' .ckpt-tmp-<pid> go
        if where is not None:
            return where
    return None


def _replaceable(path: str) -> bool:
    """A save may replace `path`: missing, or a directory of checkpoint files only (a checkpoint, or
    what the earlier in-place writer left when it was interrupted); never a directory with anything
    else in it (a run's metrics, a user's files)."""
    if not os.path.lexists(path):
        return True
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    return all(os.path.isfile(os.path.join(path, e)) and (e in ("state.json", "tokenizer.json")
                                                          or e.endswith(".safetensors") or ".tmp-" in e)
               for e in os.listdir(path))


def save_checkpoint(path: str, model, optimizer=None, state: dict | None = None, tokenizer=None,
                    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Writes a whole checkpoint to `path` (the protocol of the module docstring): `model`'s
    weights, `optimizer`'s state (its skeleton into state['optimizer']), `tokenizer`, and
    `extra_tensors` {file name: tensors}; `state` goes to state.json."""
    global _saves
    _saves += 1
    n, step = _saves, 0
    path = os.path.abspath(path)

    def done(what):
        nonlocal step
        step += 1
        _kill_point(n, step, what)

    recover(path)  # finishes an earlier interrupted save; deletes our own leftover tmp
    if not _replaceable(path):
        raise ValueError(f"{path} exists and is not a checkpoint directory: a checkpoint save replaces its "
                         f"directory whole; choose another path")
    files: dict[str, bytes] = {"model.safetensors": _tensor_bytes(_model_tensors(model))}
    state = dict(state or {})
    if optimizer is not None:
        tensors, state["optimizer"] = optimizer_tensors(optimizer)
        files["optim.safetensors"] = _tensor_bytes(tensors)
    for name, tensors in (extra_tensors or {}).items():
        files[name] = _tensor_bytes(tensors)
    if tokenizer is not None:
        files["tokenizer.json"] = tokenizer.to_json().encode()
    state["checkpoint_files"] = {name: len(data) for name, data in files.items()}
    files["state.json"] = json.dumps(state, indent=1).encode()  # last: the checkpoint is whole once it exists

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}{TMP_SUFFIX}{os.getpid()}"
    os.makedirs(tmp)
    for name, data in files.items():
        _write_file(os.path.join(tmp, name), data)
        done(f"wrote {name}")
    _fsync_dir(tmp)
    done("fsynced the new directory")
    old = path + OLD_SUFFIX
    had_old = os.path.isdir(old)
    if had_old:  # recover kept it: <path> is missing or not a whole checkpoint (checkpoint files only)
        if os.path.lexists(path):
            shutil.rmtree(path)
    elif os.path.isdir(path):
        os.rename(path, old)
        had_old = True
        done("renamed the old checkpoint to .ckpt-old")
    os.rename(tmp, path)
    done("renamed the new checkpoint into place (commit)")
    _fsync_dir(os.path.dirname(path))
    done("fsynced the parent directory")
    if had_old:
        shutil.rmtree(old)
        done("removed .ckpt-old")


def load_tensors(path: str, name: str) -> dict[str, torch.Tensor]:
    """One tensor file of the checkpoint for `path` (see `locate`)."""
    return load_file(os.path.join(_located(path), name))


def load_state(path: str) -> dict:
    """state.json of the checkpoint for `path` (see `locate`)."""
    return load_json(os.path.join(_located(path), "state.json"))


def _located(path: str) -> str:
    where = locate(path)
    if where is None:
        raise FileNotFoundError(f"no complete checkpoint at {path!r}")
    return where


def load_model_weights(path: str, model) -> None:
    weights = load_tensors(path, "model.safetensors")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight") or "lm_head.weight" in weights]
    if real_missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {real_missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def is_checkpoint(path: str | None) -> bool:
    return locate(path) is not None
