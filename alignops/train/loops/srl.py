"""SRL (docs/methods.md §2.30): step-wise expert imitation rewarded by string similarity.

Each expert solution of N steps becomes N step-prompts: the problem, ';', then the first k-1
expert steps each closed by ';' ("37+48=;7+8=15;"); the model writes "<reasoning>#<action>" and
the action is scored against expert step k by difflib's ratio (-1 when no action can be parsed).
GRPO (§2.8) over groups of samples of one step-prompt, with the std filter of §00.14.

Self-replay (not in the paper, docs/loops/srl.md; format_grpo.py): every update adds replay_coef
times the SFT NLL of the frozen base's own greedy answers to plain prompts, so that teaching the
new format does not erase what the base does on the plain prompt.
"""

from __future__ import annotations

import dataclasses
import difflib

import torch

import alignops as ao
from alignops.train.loops.base import DataLoop
from alignops.train.loops.format_grpo import (SelfReplay, check_no_kl, check_warmup, grpo_update, load_replay_state,
                                              replay_state, warmup_sft_step)
from alignops.train.rollout import concat_batches

STEP_END = ";"    # closes the problem and each expert step in a step-prompt
ACTION_MARK = "#"  # separates the reasoning from the action


def step_prompt(problem, k: int) -> str:
    """The prompt of step k (1-based): the problem, ';', and expert steps 1..k-1 each closed by ';'.
    The ';' after the problem keeps step-prompts apart from the plain prompt the evaluation asks."""
    return problem.prompt + STEP_END + "".join(s + STEP_END for s in problem.steps[:k - 1])


def split_steps(problem) -> list[tuple[str, str]]:
    """(step-prompt, expert step) for k = 1..N."""
    return [(step_prompt(problem, k), problem.steps[k - 1]) for k in range(1, len(problem.steps) + 1)]


def parse_action(output: str) -> str | None:
    """The action: the text after the last '#' (spaces stripped); None when there is no '#' or
    nothing after it."""
    if ACTION_MARK not in output:
        return None
    action = output.rsplit(ACTION_MARK, 1)[1].strip()
    return action or None


def srl_reward(output: str, expert: str) -> float:
    """difflib.SequenceMatcher(None, action, expert, autojunk=False).ratio(); -1 when malformed."""
    action = parse_action(output)
    if action is None:
        return -1.0
    return difflib.SequenceMatcher(None, action, expert, autojunk=False).ratio()


def score_outputs(texts: list[str], truncated: list[bool], experts: list[str]) -> torch.Tensor:
    """[B] srl_reward of each output; an output cut by the token limit (no EOS) is malformed (-1):
    its action may be incomplete."""
    return torch.tensor([-1.0 if cut else srl_reward(t, e) for t, cut, e in zip(texts, truncated, experts)])


@dataclasses.dataclass
class SRLOptions:
    max_new_tokens: int = 12        # reasoning + '#' + action + EOS ("#3+4+1=8" is 8 characters)
    std_eps: float = 1e-6           # std filter: keep groups with reward std > std_eps (§00.14)
    max_sampling_rounds: int = 4    # generation rounds per step to refill the kept groups
    format_warmup_steps: int = 40   # first steps: SFT on "#<expert step>" (the base never saw the format)
    warmup_batch_size: int = 64     # step-prompts per warm-up step
    warmup_learning_rate: float | None = 1e-3  # the base's own SFT rate (None: the run's learning_rate)
    replay_coef: float = 1.0        # weight of the self-replay NLL in every update (0: off, the paper's loss)
    replay_batch: int = 64          # replay rows per update
    replay_pool: int = 512          # training problems whose plain prompts the base answers once

    def __post_init__(self):
        for name in ("max_new_tokens", "max_sampling_rounds", "warmup_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens < 2:
            raise ValueError(f"max_new_tokens must be >= 2 ('#' and an action), got {self.max_new_tokens}")
        if self.std_eps < 0:
            raise ValueError(f"std_eps must be >= 0, got {self.std_eps}")
        check_warmup(self)


class SRLLoop(DataLoop):
    """SRL: GRPO on step-prompts rewarded by the similarity of the written action to the expert
    step, after a short SFT warm-up that teaches the output format."""

    Options = SRLOptions

    def __init__(self, run, options):
        super().__init__(run, options)
        check_no_kl(run.cfg, run.cfg.method)
        if not any(p.steps for p in run.task.train):
            raise ValueError(f"method {run.cfg.method!r} needs expert steps (Problem.steps); task "
                             f"{run.task.name!r} has none")
        self.replay = SelfReplay(run, options.replay_coef, options.replay_batch, options.replay_pool)

    def _draw(self, n: int) -> list[tuple[str, str]]:
        """n (step-prompt, expert step) pairs: a training problem with steps, then one of its steps."""
        rng, out = self.run.rng, []
        while len(out) < n:
            pairs = split_steps(self.run.task.sample(rng, 1)[0])
            if pairs:
                out.append(pairs[rng.randrange(len(pairs))])
        return out

    def step(self, step: int) -> dict:
        if step < self.opts.format_warmup_steps:
            pairs = self._draw(self.opts.warmup_batch_size)
            batch = self.run.teacher_batch([p for p, _ in pairs], [ACTION_MARK + e for _, e in pairs])
            return {**warmup_sft_step(self.run, batch, step, self.opts.warmup_learning_rate, self.replay),
                    "srl/warmup": 1.0}
        return self._grpo_step(step)

    def _grpo_step(self, step: int) -> dict:
        run, cfg, G = self.run, self.run.cfg, self.run.cfg.num_generations
        kept, seen_rewards, malformed, rounds = [], [], 0, 0
        while len(kept) < cfg.num_prompts and rounds < self.opts.max_sampling_rounds:
            rounds += 1
            pairs = self._draw(cfg.num_prompts)
            batch, texts = run.sample([p for p, _ in pairs], G, max_new_tokens=self.opts.max_new_tokens)
            rewards = score_outputs(texts, batch.truncated.tolist(), [e for _, e in pairs for _ in range(G)])
            seen_rewards.append(rewards)
            malformed += int((rewards == -1).sum())
            keep = ao.dynamic_sampling_mask(rewards, G, std_eps=self.opts.std_eps).group_keep.tolist()
            kept += [(batch, rewards, g) for g, ok in enumerate(keep) if ok]
        kept = kept[:cfg.num_prompts]
        if kept:
            batch = concat_batches([b.select(torch.arange(g * G, (g + 1) * G)) for b, _, g in kept],
                                   run.tok.pad_token_id)
            rewards = torch.cat([r[g * G:(g + 1) * G] for _, r, g in kept]).to(batch.completion_mask.device)
            update = grpo_update(run, batch, rewards, batch.completion_mask, step, self.opts.max_new_tokens,
                                 self.replay)
        else:  # every group's rewards were equal in every round: nothing to learn from this step
            update = grpo_update(run, None, None, None, step, self.opts.max_new_tokens)
        all_rewards = torch.cat(seen_rewards)
        return {**update, "reward": float(all_rewards.mean()), "srl/malformed_frac": malformed / all_rewards.numel(),
                "srl/kept_groups": len(kept), "sampling/gen_rounds": rounds, "srl/warmup": 0.0}

    def state_dict(self) -> dict:
        return replay_state(self.replay)

    def load_state_dict(self, state: dict, tensors: dict) -> None:
        load_replay_state(self.replay, state)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The trainer's row (eval/accuracy: the plain prompt's answer), plus, greedily on the
        held-out problems' step-prompts, the mean step reward and the malformed share, and the
        accuracy of solving by chaining the model's own steps."""
        run = self.run
        problems = run.task.heldout[:run.cfg.eval_size]
        pairs = [pair for p in problems for pair in split_steps(p)]
        out = run.evaluate()
        if not pairs:
            return out
        batch, texts = run.sample([p for p, _ in pairs], temperature=0.0, max_new_tokens=self.opts.max_new_tokens)
        rewards = score_outputs(texts, batch.truncated.tolist(), [e for _, e in pairs]).tolist()
        out["eval/srl_step_similarity"] = sum(rewards) / len(rewards)
        out["eval/srl_malformed"] = sum(r == -1 for r in rewards) / len(rewards)
        out["eval/srl_chain_accuracy"] = self._chain_accuracy([p for p in problems if p.steps])
        return out

    def _chain_accuracy(self, problems) -> float:
        """Greedy step by step from "prompt;": each action is appended with ';' until one has no
        '=' (an answer, not a column step) or the expert's step count + 1 is reached."""
        if not problems:
            return 0.0
        prompts = [p.prompt + STEP_END for p in problems]
        answers: list[str | None] = [None] * len(problems)
        open_rows = list(range(len(problems)))
        for _ in range(max(len(p.steps) for p in problems) + 1):
            if not open_rows:
                break
            _, texts = self.run.sample([prompts[i] for i in open_rows], temperature=0.0,
                                       max_new_tokens=self.opts.max_new_tokens)
            still_open = []
            for i, text in zip(open_rows, texts):
                action = parse_action(text)
                if action is None or "=" not in action:
                    answers[i] = action
                else:
                    prompts[i] += action + STEP_END
                    still_open.append(i)
            open_rows = still_open
        return sum(a == p.answer for a, p in zip(answers, problems)) / len(problems)
