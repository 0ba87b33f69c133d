"""What a run records: the step's metrics (TRL's names) appended to metrics.jsonl, the curves plot,
and the progress bar (rank 0 alone writes them under DDP)."""

from __future__ import annotations

import json
import os

import torch

from alignops.train import ddp


def rollout_metrics(rollout, group_size: int, ranks: ddp.Ranks = ddp.ALONE) -> dict:
    """The sampled batch's reward and completion statistics, with TRL's names; under DDP of the
    global batch (the ranks' per-row values gathered)."""
    rewards = ddp.gather_rows(rollout.rewards, ranks)
    correct = ddp.gather_rows(rollout.correct, ranks)
    lengths = ddp.gather_rows(rollout.batch.lengths, ranks)
    truncated = ddp.gather_rows(rollout.batch.truncated, ranks)
    r = rewards.view(-1, group_size) if rewards.numel() % group_size == 0 else rewards.view(1, -1)
    return {"reward": rewards.mean(), "reward_std": rewards.std() if rewards.numel() > 1 else 0.0,
            "frac_reward_zero_std": (r.std(-1) == 0).float().mean(), "accuracy": correct.float().mean(),
            "completions/mean_length": lengths.mean(), "completions/clipped_ratio": truncated.float().mean()}


class MetricLog:
    """The run's rows, appended to `path` as JSON lines; `write=False` (every rank but 0 under
    DDP) keeps the rows, read back on resume, without touching the file."""

    def __init__(self, path: str | None, resume: bool, write: bool = True):
        self.path, self.rows, self.write = path, [], write
        if path and resume and os.path.exists(path):
            with open(path) as f:
                lines = [line for line in f if line.strip()]
            for i, line in enumerate(lines):
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    if i < len(lines) - 1:
                        raise
                    # the last row, torn by a crash mid-append: dropped (truncate rewrites the file)
        elif path and write:
            open(path, "w").close()

    def add(self, row: dict) -> None:
        row = {k: (round(float(v), 6) if isinstance(v, (float, torch.Tensor)) else v) for k, v in row.items()}
        self.rows.append(row)
        if self.path and self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def truncate(self, step: int) -> None:
        """On resume: forget rows the interrupted run logged after its last checkpoint."""
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]
        if self.path and self.write:
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)


def plot_curves(rows: list[dict], path: str, title: str) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    train_rows = [r for r in rows if "reward" in r]
    ax[0].plot([r["step"] for r in train_rows], [r["reward"] for r in train_rows], lw=0.6, alpha=0.5, label="per step")
    avg = moving_average([r["reward"] for r in train_rows], 25)
    ax[0].plot([r["step"] for r in train_rows], avg, lw=1.5, label="mean of 25 steps")
    ax[0].set(xlabel="step", ylabel="mean reward", title=f"{title}: training reward")
    ax[0].legend(fontsize=7)
    ev = [r for r in rows if "eval/accuracy" in r]
    ax[1].plot([r["step"] for r in ev], [100 * r["eval/accuracy"] for r in ev], marker="o", label="greedy")
    for key in sorted({k for r in ev for k in r if k.startswith("eval/mean@")}):
        pts = [r for r in ev if key in r]
        ax[1].plot([r["step"] for r in pts], [100 * r[key] for r in pts], marker="s", label=key.split("/")[1])
    ax[1].set(xlabel="step", ylabel="held-out accuracy (%)", title="held-out accuracy")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def moving_average(xs: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def progress(iterable, enabled: bool, time_budget_s: float | None = None, elapsed_s=None, **kw):
    """A tqdm bar over `iterable` (the iterable itself when not `enabled`). With `time_budget_s`
    the run ends on time, not on the iterable's length (often unbounded: max_steps 10**6), so the
    bar counts seconds out of the budget, with the steps done as a postfix: `elapsed_s()` returns
    the seconds that count against the budget (the trainer leaves evaluation out), wall-clock time
    since the bar started by default. `initial` (steps done before a resume) starts the step count.

        bar = progress(range(10**6), True, time_budget_s=120, elapsed_s=lambda: train_seconds)
        for step in bar:
            ...
            bar.set_postfix(reward="0.50")   # shown after steps=N
    """
    if not enabled:
        return iterable
    if time_budget_s is not None and time_budget_s <= 0:
        raise ValueError(f"time_budget_s must be > 0 or None, got {time_budget_s}")
    from tqdm.auto import tqdm  # noqa: PLC0415
    if time_budget_s is None:
        return tqdm(iterable, **kw)
    return TimeBudgetBar(tqdm, iterable, time_budget_s, elapsed_s, **kw)


class TimeBudgetBar:
    """tqdm over seconds of a time budget; iterating yields the wrapped iterable's items."""

    def __init__(self, tqdm, iterable, time_budget_s: float, elapsed_s=None, initial: int = 0, **kw):
        kw.pop("total", None)
        self.iterable, self.steps, self.user_postfix = iterable, initial, {}
        if elapsed_s is None:
            import time  # noqa: PLC0415
            start = time.monotonic()
            elapsed_s = lambda: time.monotonic() - start  # noqa: E731
        self.elapsed_s = elapsed_s
        self.bar = tqdm(total=float(time_budget_s), unit="s",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}{postfix}]", **kw)
        self._refresh()

    def __iter__(self):
        try:
            for item in self.iterable:
                self.steps += 1  # counted when handed out: a run that breaks after its last step counts it
                yield item
                self._refresh()
        finally:
            self.close()

    def set_postfix(self, **postfix):
        self.user_postfix = postfix
        self._refresh()

    def _refresh(self):
        self.bar.n = min(float(self.elapsed_s()), self.bar.total)
        self.bar.set_postfix(steps=self.steps, **self.user_postfix)  # set_postfix redraws

    def close(self):
        if not self.bar.disable:
            self._refresh()
        self.bar.close()
