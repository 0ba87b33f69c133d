"""What a data-loop method is given and what it gives back.

The policy-gradient presets share one step (rollout -> advantages -> policy loss). The methods
here change what the model trains on, or how, more than the loss: preference pairs from the
policy's own samples (DPO family, ORPO, Self-Rewarding), best-of-K selection (RAFT), expert data
mixed into RL (CHORD), step-wise imitation (SRL), a reflection between two attempts (Reflect,
Retry, Reward), a prompt-side experience library with no parameter update (Training-free GRPO),
representation implanting (RAHF). Each is a `DataLoop`: the trainer builds a `Run` (task,
tokenizer, policy from the SFT base, optimiser, seeded samplers), calls `loop.step(step)` once per
step, and keeps doing what it does for every method: the time budget and progress bar, held-out
evaluation, metrics.jsonl, checkpoints (with the loop's own state) and curves.png.

A loop's knobs live in its `Options` dataclass; `--loop_kwargs '{"name": value}'` sets them on the
command line, and unknown names or bad values fail before the first step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import typing

import torch

import alignops as ao
from alignops.train.evaluate import evaluation
from alignops.train.rollout import Batch, GroupSeeds, generate, left_pad, sequence_head


@dataclasses.dataclass
class Run:
    """The pieces every loop uses. `rng` draws problems, `seeds` the sampling noise (both saved in
    checkpoints); `opt` is None for a loop that updates no parameters."""

    cfg: typing.Any
    task: typing.Any
    tok: typing.Any
    policy: torch.nn.Module
    opt: torch.optim.Optimizer | None
    rng: random.Random
    seeds: GroupSeeds
    reward_model: typing.Any
    out_dir: str

    @property
    def device(self):
        return next(self.policy.parameters()).device

    # ---- sampling

    def encode_prompt(self, text: str) -> list[int]:
        return self.tok.encode(text, bos=True)

    @torch.no_grad()
    def sample(self, prompts: list[str], n: int = 1, *, model=None, temperature: float | None = None,
               top_p: float | None = None, max_new_tokens: int | None = None) -> tuple[Batch, list[str]]:
        """Each prompt sampled n times (rows consecutive per prompt), one seeded generator per
        prompt (GroupSeeds). temperature 0 decodes greedily. Returns the batch and the decoded
        completions (up to EOS)."""
        cfg = self.cfg
        encoded = [self.encode_prompt(p) for p in prompts]
        temperature = cfg.temperature if temperature is None else temperature
        batch = generate(model or self.policy, [e for e in encoded for _ in range(n)],
                         max_new_tokens=max_new_tokens or cfg.max_completion_length, eos_id=self.tok.eos_token_id,
                         pad_id=self.tok.pad_token_id, temperature=temperature,
                         top_p=cfg.top_p if top_p is None else top_p,
                         generator=self.seeds.next_round(range(len(prompts))) if temperature > 0 else None)
        return batch, [self.tok.decode(ids) for ids in batch.completion_ids]

    def teacher_batch(self, prompts: list[str], completions: list[str], eos: bool = True) -> Batch:
        """Given (prompt, completion) texts as a Batch, EOS appended to each completion when `eos`
        (token_batch of their ids)."""
        return self.token_batch(prompts, [self.tok.encode(c, eos=eos) for c in completions])

    def token_batch(self, prompts: list[str], completions: list[list[int]]) -> Batch:
        """(prompt text, completion token ids) as a Batch, for scoring or training on them: prompts
        left-padded, completions right-padded; behaviour_logp is 0 (nothing was sampled)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        tok, device = self.tok, self.device
        ids, attn = left_pad([self.encode_prompt(p) for p in prompts], tok.pad_token_id, device)
        T = max(1, max(len(c) for c in completions))
        cids = torch.full((len(completions), T), tok.pad_token_id, dtype=torch.long, device=device)
        cmask = torch.zeros((len(completions), T), device=device)
        for i, c in enumerate(completions):
            if c:
                cids[i, :len(c)] = torch.tensor(c, dtype=torch.long, device=device)
                cmask[i, :len(c)] = 1.0
        return Batch(torch.cat([ids, cids], 1), torch.cat([attn, cmask.long()], 1), ids.shape[1], cids, cmask,
                     torch.zeros_like(cmask), torch.zeros(len(completions), dtype=torch.bool, device=device))

    # ---- scoring and updating

    def head(self, batch: Batch, model=None):
        """The HeadOutput (hidden states + lm_head, or logits) of the batch's completion positions."""
        return sequence_head(model or self.policy, batch, self.cfg.fused_lm_head)

    def token_logprobs(self, batch: Batch, model=None, temperature: float = 1.0) -> torch.Tensor:
        """log-probs [B, T] of the batch's completion tokens under `model` (the policy by
        default), 0 on padding; with autograd when grad is enabled."""
        return self.head(batch, model).token_logprobs(labels(batch), temperature=temperature,
                                                       backend=self.cfg.backend)

    @torch.no_grad()
    def sequence_logprobs(self, batch: Batch, model=None) -> torch.Tensor:
        """Summed completion log-probs [B] under `model`, without autograd (e.g. reference scores)."""
        return self.token_logprobs(batch, model).sum(-1)

    def optimizer_step(self, loss: torch.Tensor, step: int) -> dict:
        """One AdamW step on `loss` with the trainer's linear lr warm-up and gradient clipping."""
        if self.opt is None:
            raise RuntimeError("this loop updates no parameters (it has no optimiser)")
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.learning_rate * min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
        self.opt.step()
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm)}

    def sft_loss(self, batch: Batch, weighting: str = "none", seq_weights=None, cutoff_prob=None,
                 normalizer=None):
        """ao.sft_loss (token-mean NLL, or its DFT / CHORD-phi / iw weighting) of the batch's
        completion tokens under the policy, with autograd: the SFTOutput."""
        head = self.head(batch)
        kw = {"weighting": weighting, "seq_weights": seq_weights, "cutoff_prob": cutoff_prob,
              "normalizer": normalizer, "backend": self.cfg.backend}
        if head.logits is not None:
            return ao.sft_loss(head.logits, labels(batch), **kw)
        return ao.fused_linear_sft_loss(head.hidden, head.weight, labels(batch), bias=head.bias, softcap=head.softcap,
                                        logit_scale=head.logit_scale, **kw)

    def sft_step(self, batch: Batch, step: int, **kw) -> dict:
        """One optimiser step of sft_loss(batch, **kw)."""
        loss = self.sft_loss(batch, **kw).loss
        return {**self.optimizer_step(loss, step), "nll": float(loss.detach()),
                "sft/tokens": float(batch.completion_mask.sum())}

    def evaluate(self) -> dict:
        """The trainer's held-out evaluation of the policy (greedy accuracy and mean@k)."""
        return evaluation(self.cfg, self.policy, self.task, self.tok)


def labels(batch: Batch) -> torch.Tensor:
    return batch.completion_ids.masked_fill(batch.completion_mask == 0, -100)


@dataclasses.dataclass
class NoOptions:
    pass


class DataLoop:
    """A data-loop method. Subclasses set `Options` (a dataclass whose __post_init__ checks its
    values) and implement `step`; the rest has defaults."""

    Options: type = NoOptions
    trains_parameters = True   # False: no optimiser is built and the policy's weights stay the base's

    def __init__(self, run: Run, options):
        self.run, self.opts = run, options

    def step(self, step: int) -> dict:
        """One step of the method; returns its metrics row ("reward" is the training reward plotted)."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """The held-out evaluation row: the trainer's, plus whatever the method measures itself."""
        return self.run.evaluate()

    def state_dict(self) -> dict:
        """JSON state saved in the checkpoint's state.json (e.g. an iteration counter)."""
        return {}

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors saved beside the checkpoint: {file name: state dict} (e.g. a lagged model copy)."""
        return {}

    def load_state_dict(self, state: dict, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restores state_dict() and tensors() on resume."""


def parse_options(loop_cls: type, kwargs: dict | None, method: str):
    """The loop's Options from --loop_kwargs: unknown names and values of the wrong type are
    errors naming the option; range checks are the Options' own __post_init__."""
    kwargs = dict(kwargs or {})
    fields = {f.name: f for f in dataclasses.fields(loop_cls.Options)}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"method {method!r}: unknown --loop_kwargs {unknown}; its options are {sorted(fields)}")
    hints = typing.get_type_hints(loop_cls.Options)
    for name, value in kwargs.items():
        hint = hints[name]
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
        ok = any(value is None if a is type(None) else
                 (isinstance(value, (int, float)) and not isinstance(value, bool)) if a is float else
                 (isinstance(value, int) and not isinstance(value, bool)) if a is int else
                 isinstance(value, typing.get_origin(a) or a) for a in allowed)
        if not ok:
            raise ValueError(f"method {method!r}: --loop_kwargs {name} must be {hint}, got {value!r}")
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            kwargs[name] = float(value)
    try:
        return loop_cls.Options(**kwargs)
    except ValueError as e:
        raise ValueError(f"method {method!r}: {e}") from None


@contextlib.contextmanager
def learning_rate_of(run, learning_rate: float | None):
    """The run's learning rate set to `learning_rate` (None: left alone) inside the block."""
    if learning_rate is None:
        yield
        return
    run_lr, run.cfg.learning_rate = run.cfg.learning_rate, learning_rate
    try:
        yield
    finally:
        run.cfg.learning_rate = run_lr
