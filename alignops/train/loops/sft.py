"""SFT-family loops: DFT on the task's expert answers; RAFT and iw-SFT on the policy's own samples."""

from __future__ import annotations

import dataclasses

from alignops.train.loops.base import DataLoop


@dataclasses.dataclass
class DFTOptions:
    batch_size: int = 64           # expert (prompt, answer) pairs per step

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class DFTLoop(DataLoop):
    """DFT (docs/methods.md §2.27): SFT on expert completions with each token's NLL weighted by
    its detached probability sg(p)."""

    Options = DFTOptions

    def step(self, step: int) -> dict:
        run = self.run
        problems = run.task.sample(run.rng, self.opts.batch_size)
        with_steps = run.task.with_steps()
        batch = run.teacher_batch([p.prompt for p in problems], [p.expert_completion(with_steps) for p in problems])
        return run.sft_step(batch, step, weighting="dft")
