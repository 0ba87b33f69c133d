"""Built-in tasks: deterministic, dependency-free, with exact verifiable rewards.

A task gives problems (prompt, answer, expert solution written as steps) split into a train set
and a fixed held-out set, and a verifier that scores a completion. `add` (a+b, a, b < 100, answer
only) is the default: a tiny model goes from weak to strong on it in minutes on a CPU.
`add_steps` asks for the column-addition steps before the answer (used by SRL-style methods).
`JsonlTask` loads users' own prompts+answers.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    steps: tuple[str, ...] = ()  # expert solution, one step per entry; the last is the answer

    def expert_completion(self, with_steps: bool = False) -> str:
        if with_steps and self.steps:
            return ";".join(self.steps[:-1]) + "#" + self.steps[-1]
        return self.answer


def final_answer(completion: str) -> str:
    """The text after the last '#', or the whole completion when there is none."""
    return completion.rsplit("#", 1)[-1].strip()


class Task:
    name = "task"
    alphabet = "0123456789+-*=;# "

    def __init__(self, problems: list[Problem], heldout_size: int, seed: int = 1234):
        problems = list(problems)
        random.Random(seed).shuffle(problems)  # one fixed split, independent of the run's seed
        if not 0 < heldout_size < len(problems):
            raise ValueError(f"heldout_size must be in (0, {len(problems)}), got {heldout_size}")
        self.heldout = problems[:heldout_size]
        self.train = problems[heldout_size:]

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        return [self.train[rng.randrange(len(self.train))] for _ in range(n)]

    def reward(self, problem: Problem, completion: str) -> float:
        return 1.0 if final_answer(completion) == problem.answer else 0.0

    def with_steps(self) -> bool:
        return False


def addition_steps(a: int, b: int) -> tuple[str, ...]:
    """Column addition from the units: '7+8=15', '3+4+1=8', then the answer '85'."""
    steps, carry, i = [], 0, 0
    da, db = str(a)[::-1], str(b)[::-1]
    while i < max(len(da), len(db)):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
        carry, i = s // 10, i + 1
    return tuple(steps) + (str(a + b),)


class AdditionTask(Task):
    name = "add"

    def __init__(self, max_operand: int = 100, heldout_size: int = 1000, seed: int = 1234):
        problems = [Problem(f"{a}+{b}=", str(a + b), addition_steps(a, b))
                    for a in range(max_operand) for b in range(max_operand)]
        super().__init__(problems, heldout_size, seed)


class AdditionStepsTask(AdditionTask):
    name = "add_steps"

    def with_steps(self) -> bool:
        return True


class JsonlTask(Task):
    """Lines of {"prompt": ..., "answer": ..., "steps": [...] (optional)}; exact-match reward on
    the final answer. The alphabet is every character the file uses."""

    name = "jsonl"

    def __init__(self, path: str, heldout_size: int | None = None, seed: int = 1234):
        problems = []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "prompt" not in row or "answer" not in row:
                    raise ValueError(f"{path}:{lineno}: each line needs 'prompt' and 'answer'")
                problems.append(Problem(str(row["prompt"]), str(row["answer"]),
                                        tuple(str(s) for s in row.get("steps", ()))))
        chars = sorted(set("".join(p.prompt + p.answer + "".join(p.steps) for p in problems)) | set("#;"))
        self.alphabet = "".join(chars)
        super().__init__(problems, heldout_size or max(1, len(problems) // 10), seed)


TASKS = {"add": AdditionTask, "add_steps": AdditionStepsTask}


def make_task(name: str) -> Task:
    if name.endswith(".jsonl"):
        return JsonlTask(name)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)} or a path to a .jsonl file")
    return TASKS[name]()


_ANSWER_RE = re.compile(r"^-?\d+$")


def is_well_formed(completion: str) -> bool:
    return bool(_ANSWER_RE.match(final_answer(completion)))
