"""The reference trainer: one readable RL loop that drives every method through alignops' ops.

    python -m alignops.train --method grpo          # see --help
"""

import importlib.util

# What the trainer imports beyond alignops's own dependencies: the `train` extra of the package.
TRAIN_EXTRA = ("transformers", "safetensors", "matplotlib", "tqdm", "peft")


def require_train_extra() -> None:
    """Fail before any work, naming what is missing, instead of deep inside a run (a 20 s run once
    trained and then crashed in plot_curves for want of matplotlib)."""
    missing = [m for m in TRAIN_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the reference trainer needs {', '.join(missing)}: "
                          f"pip install 'alignops[train]' (pinned to the versions the tests ran)")
