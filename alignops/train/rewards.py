"""Reward functions: `fn(task, problem, completion) -> float`, combined by weights.

Built-in: `accuracy` (the task's exact verifier, the default), `format` (the final answer is a
well-formed integer) and `arithmetic_work`, a rule-based judge of the shown work for the
arithmetic tasks (AWPO's reasoning reward). A user function is named `module:function` on the
command line (`--reward_funcs accuracy,mypkg.rewards:brevity --reward_weights 1,0.1`).
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from alignops.train.tasks import addition_steps, final_answer, is_well_formed

RewardFn = Callable[[object, object, str], float]


def accuracy(task, problem, completion: str) -> float:
    return float(task.reward(problem, completion))


def well_formed(task, problem, completion: str) -> float:
    return 1.0 if is_well_formed(completion) else 0.0


_OPERANDS = re.compile(r"^(\d+)\+(\d+)=$")


def arithmetic_work(task, problem, completion: str) -> float:
    """Scores the work shown for `a+b=` in [0, 1], independently of the final verdict.

    With column steps ("7+8=15;3+4+1=8#85"): the share of the expert's column steps the
    completion states correctly, in order. Answer only ("85"): each digit of the answer is the
    outcome of one column, so the share of answer digits right in their column (units first),
    less a share for every extra digit. Problems that are not `a+b=` score 0."""
    m = _OPERANDS.match(problem.prompt)
    if not m:
        return 0.0
    a, b = int(m.group(1)), int(m.group(2))
    expert = addition_steps(a, b)
    if "#" in completion:
        shown = completion.rsplit("#", 1)[0].split(";")
        columns = expert[:-1]
        right = sum(1 for i, step in enumerate(columns) if i < len(shown) and shown[i].strip() == step)
        return right / len(columns)
    got, want = final_answer(completion)[::-1], expert[-1][::-1]
    if not got.isdigit():
        return 0.0
    right = sum(1 for g, w in zip(got, want) if g == w)
    return max(0.0, (right - max(0, len(got) - len(want))) / len(want))


BUILTIN: dict[str, RewardFn] = {"accuracy": accuracy, "format": well_formed, "arithmetic_work": arithmetic_work}


def resolve(name: str) -> RewardFn:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"unknown reward function {name!r}: built-in {sorted(BUILTIN)} or 'module:function'")
    module, attr = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load reward function {name!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward function {name!r} is not callable")
    return fn


class RewardModel:
    """Weighted sum of reward functions; `per_function` keeps each one's scores for metrics."""

    def __init__(self, names: str, weights: str | None = None):
        self.names = [n.strip() for n in names.split(",") if n.strip()]
        if not self.names:
            raise ValueError("reward_funcs is empty")
        self.fns = [resolve(n) for n in self.names]
        if weights is None or weights == "":
            self.weights = [1.0] * len(self.fns)
        else:
            self.weights = [float(w) for w in str(weights).split(",")]
            if len(self.weights) != len(self.fns):
                raise ValueError(f"reward_weights has {len(self.weights)} entries for {len(self.fns)} reward_funcs")

    def score(self, task, problems, completions) -> dict[str, list[float]]:
        """Each function's scores, by name."""
        return {name: [float(fn(task, p, c)) for p, c in zip(problems, completions)]
                for name, fn in zip(self.names, self.fns)}

    def combine(self, scores: dict[str, list[float]]) -> tuple[list[float], dict[str, float]]:
        """The weighted total per completion, and each function's mean when there are several."""
        totals = [0.0] * len(next(iter(scores.values())))
        metrics = {}
        for (name, values), w in zip(scores.items(), self.weights):
            totals = [t + w * s for t, s in zip(totals, values)]
            if len(self.fns) > 1:
                metrics[f"rewards/{name.rsplit(':', 1)[-1]}"] = sum(values) / max(1, len(values))
        return totals, metrics

    def __call__(self, task, problems, completions) -> tuple[list[float], dict[str, float]]:
        return self.combine(self.score(task, problems, completions))
