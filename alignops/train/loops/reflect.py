"""Reflect, Retry, Reward (docs/methods.md §2.31): GRPO on self-reflections after a failed attempt.

Attempt 1 is the policy's greedy answer to the prompt. When the verifier rejects it, the retry
prompt is the prompt, attempt 1 and ';' ("37+48=84;"); the model writes a reflection, the
marker '#', and attempt 2 ("7+8=15;3+4+1=8#85"). The task's verifier reads the text after the
last '#', so the reward is attempt 2's correctness. A group of num_generations retries per failed
prompt gives GRPO advantages (§2.8); the loss mask covers the reflection (up to and including
its closing '#') and never attempt 2's answer, so the model is taught to reflect, not answers.
Prompts whose first attempt succeeds produce no training rows. Every update also carries the
self-replay term of format_grpo.py (the frozen base's greedy answers to plain prompts; not in the paper).
"""

from __future__ import annotations

import dataclasses

import torch

import alignops as ao
from alignops.train.loops.base import DataLoop
from alignops.train.loops.format_grpo import (SelfReplay, check_no_kl, check_warmup, grpo_update, load_replay_state,
                                              replay_state, warmup_sft_step)

RETRY_MARK = ";"       # closes attempt 1: what follows is the reflection
ANSWER_MARK = "#"      # closes the reflection: what follows is attempt 2 (the task's answer marker)


def retry_prompt(problem, attempt: str) -> str:
    return problem.prompt + attempt + RETRY_MARK


def reflection_mask(completion_ids: torch.Tensor, completion_mask: torch.Tensor, marker_id: int) -> torch.Tensor:
    """[B, T] float: 1 on a row's valid tokens up to and including its last `marker_id`, 0 after
    (attempt 2's answer and the EOS) and on rows without the marker (no reflection)."""
    valid = completion_mask > 0
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device).expand_as(completion_ids)
    is_marker = (completion_ids == marker_id) & valid
    last = torch.where(is_marker, positions, torch.full_like(positions, -1)).max(-1, keepdim=True).values
    return ((positions <= last) & valid).to(completion_mask.dtype)


@dataclasses.dataclass
class ReflectOptions:
    reflection_tokens: int | None = None  # the retry may write reflection_tokens + max_completion_length
                                    # tokens; None: enough for the task's longest expert solution + EOS
    format_warmup_steps: int = 30   # first steps: SFT on "attempt1;<expert steps>#<answer>" (format only)
    warmup_batch_size: int = 64     # problems per warm-up step
    warmup_learning_rate: float | None = 1e-3  # the base's own SFT rate (None: the run's learning_rate)
    replay_coef: float = 1.0        # weight of the self-replay NLL in every update (0: off, the paper's loss)
    replay_batch: int = 64          # replay rows per update
    replay_pool: int = 512          # training problems whose plain prompts the base answers once

    def __post_init__(self):
        if self.reflection_tokens is not None and self.reflection_tokens < 1:
            raise ValueError(f"reflection_tokens must be >= 1 or None, got {self.reflection_tokens}")
        if self.warmup_batch_size < 1:
            raise ValueError(f"warmup_batch_size must be >= 1, got {self.warmup_batch_size}")
        check_warmup(self)


class ReflectRetryLoop(DataLoop):
    """Reflect, Retry, Reward: first attempts, reflections on the failures, GRPO on the
    reflection tokens rewarded by the second attempt."""

    Options = ReflectOptions

    def __init__(self, run, options):
        super().__init__(run, options)
        check_no_kl(run.cfg, run.cfg.method)
        self.marker_id = run.tok.encode(ANSWER_MARK)[0]
        # a retry cut by the token limit never reaches its answer: GRPO would only ever see reward 0
        solutions = [p.expert_completion(with_steps=True) for p in run.task.train if p.steps]
        longest = max(solutions, key=len, default="")
        need = len(run.tok.encode(longest, eos=True))
        self.reflection_tokens = (options.reflection_tokens if options.reflection_tokens is not None
                                  else max(1, need - run.cfg.max_completion_length))
        if solutions and self.retry_tokens < need:
            raise ValueError(f"method {run.cfg.method!r}: reflection_tokens + max_completion_length = "
                             f"{self.retry_tokens} tokens cannot hold the longest expert solution {longest!r} "
                             f"+ EOS ({need}); set reflection_tokens >= {need - run.cfg.max_completion_length} "
                             f"(or leave it None)")
        self.replay = SelfReplay(run, options.replay_coef, options.replay_batch, options.replay_pool)

    def state_dict(self) -> dict:
        return replay_state(self.replay)

    def load_state_dict(self, state: dict, tensors: dict) -> None:
        load_replay_state(self.replay, state)

    @property
    def retry_tokens(self) -> int:
        return self.reflection_tokens + self.run.cfg.max_completion_length

    def _first_attempts(self, problems) -> tuple[list[str], list[bool]]:
        """Greedy attempt 1 of each problem and the verifier's verdict."""
        _, texts = self.run.sample([p.prompt for p in problems], temperature=0.0)
        return texts, [self.run.task.reward(p, t) > 0 for p, t in zip(problems, texts)]

    def step(self, step: int) -> dict:
        run, cfg, G = self.run, self.run.cfg, self.run.cfg.num_generations
        if step < self.opts.format_warmup_steps:
            problems = run.task.sample(run.rng, self.opts.warmup_batch_size)
            attempts, _ = self._first_attempts(problems)
            batch = run.teacher_batch([retry_prompt(p, a) for p, a in zip(problems, attempts)],
                                      [p.expert_completion(with_steps=True) for p in problems])
            return {**warmup_sft_step(run, batch, step, self.opts.warmup_learning_rate, self.replay),
                    "rrr/warmup": 1.0}
        problems = run.task.sample(run.rng, cfg.num_prompts)
        attempts, solved = self._first_attempts(problems)
        failed = [(p, a) for p, a, ok in zip(problems, attempts, solved) if not ok]
        metrics = {"rrr/warmup": 0.0, "rrr/first_attempt_accuracy": sum(solved) / len(problems),
                   "rrr/first_attempt_failures": float(len(failed))}
        if not failed:  # every first attempt succeeded: no training rows
            return {**grpo_update(run, None, None, None, step, self.retry_tokens), **metrics,
                    "rrr/final_accuracy": 1.0}
        batch, texts = run.sample([retry_prompt(p, a) for p, a in failed], G, max_new_tokens=self.retry_tokens)
        rewards = torch.tensor([run.task.reward(failed[i // G][0], t) for i, t in enumerate(texts)],
                               dtype=torch.float32, device=batch.completion_mask.device)
        mask = reflection_mask(batch.completion_ids, batch.completion_mask, self.marker_id)
        # groups whose retries all score alike have zero advantages: leave them out, so that a step
        # with no signal skips the optimiser instead of letting Adam's moments move the weights
        keep = ao.dynamic_sampling_mask(rewards, G).row_keep
        if bool(keep.any()):
            rows = keep.nonzero().squeeze(-1)
            update = grpo_update(run, batch.select(rows), rewards[rows], mask[rows], step, self.retry_tokens,
                                 self.replay)
        else:
            update = grpo_update(run, None, None, None, step, self.retry_tokens)
        metrics["rrr/kept_groups"] = float(keep.sum()) / G
        # final: each prompt's outcome, solved at once or by the sampled retries (their mean)
        final = (sum(solved) + float(rewards.view(-1, G).mean(-1).sum())) / len(problems)
        success = float(rewards.mean())
        return {**update, **metrics, "reward": success, "rrr/second_attempt_success": success,
                "rrr/final_accuracy": final,
                "rrr/reflection_tokens": float(mask.sum()) / mask.shape[0],
                "rrr/no_reflection_frac": float((mask.sum(-1) == 0).float().mean())}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The trainer's row (eval/accuracy is the first-attempt greedy accuracy), plus on the
        held-out first-attempt failures the share a greedy reflection + retry fixes."""
        run = self.run
        out = run.evaluate()
        problems = run.task.heldout[:run.cfg.eval_size]
        attempts, solved = self._first_attempts(problems)
        failed = [(p, a) for p, a, ok in zip(problems, attempts, solved) if not ok]
        fixed = 0
        if failed:
            _, texts = run.sample([retry_prompt(p, a) for p, a in failed], temperature=0.0,
                                  max_new_tokens=self.retry_tokens)
            fixed = sum(run.task.reward(p, t) > 0 for (p, _), t in zip(failed, texts))
        out["eval/first_attempt_failures"] = float(len(failed))
        out["eval/second_attempt_success"] = fixed / len(failed) if failed else 0.0
        out["eval/accuracy_after_retry"] = (sum(solved) + fixed) / max(1, len(problems))
        return out
