"""The SFT warm-up: the shared starting policy ("base model") of every method, trained on the
task's expert completions until its held-out greedy accuracy enters a target band.

    from alignops.train.config import TrainConfig
    from alignops.train.warmup import sft_warmup

    info = sft_warmup(TrainConfig(), target_accuracy=(0.3, 0.5), out_dir="runs/base")
    info["outcome"], info["steps"], info["probe_accuracy"], info["heldout_accuracy"]

Why a band and not a step count: the model learns the task in a jump, and where the jump falls
moves with the CPU's floating-point rounding (the same code and seed reached 49 % after 1200
steps on one machine, 98 % on another), so a fixed step count gives a base that means something
different on every machine. What RL needs is the same kind of base everywhere: imperfect, so
that sampled groups hold both right and wrong answers. The learning rate is constant after a
short linear warm-up: a base annealed to lr 0 sits in a sharp minimum that the first useful RL
step throws it out of, while a constant-lr base lets RL build on it.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Callable

import torch

import alignops as ao
from alignops.train import checkpoint as ckpt
from alignops.train.config import TrainConfig
from alignops.train.evaluate import evaluate
from alignops.train.metrics import progress
from alignops.train.trainer import setup

# outcome of the band search, recorded in state.json and returned
IN_BAND = "in_band"                # stopped at the first evaluation inside the band
JUMPED_OVER = "jumped_over_band"   # one step went from below to above it: the last base below is kept
CAP_BELOW = "cap_below_band"       # max_steps reached below the band: the last step's base is kept
TIME_BUDGET = "time_budget"        # time_budget_s ran out before the band was reached
FIXED_STEPS = "fixed_steps"        # target_accuracy=None: exactly max_steps steps


def sft_warmup(cfg: TrainConfig, target_accuracy: tuple[float, float] | None = (0.3, 0.5), max_steps: int = 3000,
               min_steps: int = 200, eval_every: int = 10, probe_size: int = 200, batch_size: int = 64,
               lr: float = 1e-3, warmup_steps: int = 50, time_budget_s: float | None = None,
               out_dir: str = "runs/base",
               probe_accuracy: Callable[[torch.nn.Module, int], float] | None = None, kind: str = "sft_base",
               extra: dict | None = None) -> dict:
    """Trains the base and writes it to `out_dir`, its record to state.json (returned).

    From `min_steps` on, every `eval_every` steps, greedy accuracy on the first `probe_size`
    held-out problems (`probe_accuracy(policy, step)` replaces that evaluation, e.g. in tests)
    is compared with `target_accuracy` = (low, high), both inclusive; training stops at the first
    evaluation inside. When an evaluation lands above the band, training rewinds to the last
    evaluation below it (weights, optimiser and data order, held in memory; the start if there was
    none) and replays from there evaluating after every step (min_steps no longer applies), so it
    stops at the first step inside the band. If a single
    step jumps from below to above, the base below is kept (outcome `jumped_over_band`): a base
    below the band still leaves RL something to show, one above it may leave nothing.

    The record: `outcome` (`in_band`, `jumped_over_band`, `cap_below_band`, `time_budget`,
    `fixed_steps`), `steps`, `probe_accuracy` (at the kept step; None without evaluation),
    `probe_size`, `heldout_accuracy` (the full held-out set, cfg.eval_size problems),
    `target_accuracy`, `lr`, `warmup_steps`, `batch_size`, `evaluations` ([step, probe accuracy]
    pairs in the order they ran), `seconds`, and the task, arch and seed; `kind` ("sft_base", or
    the distillation teacher's "sft_teacher") and `extra` (more fields) are recorded as given."""
    if target_accuracy is not None:
        if len(target_accuracy) != 2 or not 0.0 <= target_accuracy[0] <= target_accuracy[1] <= 1.0:
            raise ValueError(f"target_accuracy must be (low, high) with 0 <= low <= high <= 1, or None; "
                             f"got {target_accuracy!r}")
        target_accuracy = (float(target_accuracy[0]), float(target_accuracy[1]))
    for name, value, least in (("max_steps", max_steps, 1), ("min_steps", min_steps, 0), ("eval_every", eval_every, 1),
                               ("probe_size", probe_size, 1), ("batch_size", batch_size, 1),
                               ("warmup_steps", warmup_steps, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ValueError(f"time_budget_s must be > 0 or None, got {time_budget_s!r}")

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    task, tok, policy = setup(cfg)
    if probe_accuracy is None:
        def probe_accuracy(model, step):
            return evaluate(model, task, tok, probe_size, cfg.max_completion_length)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    with_steps = task.with_steps()

    def train_step(step):
        for g in opt.param_groups:  # from the step counter, so a replay after a rewind gets the same rates
            g["lr"] = lr * min(1.0, (step + 1) / warmup_steps)
        problems = task.sample(rng, batch_size)
        seqs = [tok.encode(p.prompt, bos=True) + tok.encode(p.expert_completion(with_steps), eos=True)
                for p in problems]
        plen = [len(tok.encode(p.prompt, bos=True)) for p in problems]
        L = max(map(len, seqs))
        ids = torch.full((batch_size, L), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, L), -100, dtype=torch.long)
        for i, (s, p) in enumerate(zip(seqs, plen)):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, p - 1:len(s) - 1] = torch.tensor(s[p:])  # predict the completion only
        ids, labels = ids.to(cfg.device), labels.to(cfg.device)
        logits = policy(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits
        logp = ao.token_logprobs(logits, labels, backend=cfg.backend)
        loss = -logp.sum() / (labels != -100).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def snapshot(step, acc):
        return {"step": step, "acc": acc, "model": copy.deepcopy(policy.state_dict()),
                "opt": copy.deepcopy(opt.state_dict()), "rng": rng.getstate()}

    def restore(snap):
        policy.load_state_dict(snap["model"])
        opt.load_state_dict(snap["opt"])
        rng.setstate(snap["rng"])
        return snap["step"]

    t0 = time.time()
    bar = progress(range(max_steps), cfg.progress, desc="sft warm-up")
    evaluations: list[list] = []
    below = snapshot(0, None) if target_accuracy is not None else None  # the last evaluated base below the band
    outcome, kept_acc, step, refining = None, None, 0, False  # refining: replaying from `below`, every step evaluated
    while outcome is None:
        loss = train_step(step)
        step += 1
        if cfg.progress:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", probe="-" if kept_acc is None else f"{kept_acc:.3f}")
        if target_accuracy is None:
            outcome = FIXED_STEPS if step >= max_steps else None
        elif refining or step >= min_steps and (step % eval_every == 0 or step == max_steps):
            acc = float(probe_accuracy(policy, step))
            evaluations.append([step, round(acc, 6)])
            kept_acc = acc
            if target_accuracy[0] <= acc <= target_accuracy[1]:
                outcome = IN_BAND
            elif acc > target_accuracy[1]:
                if refining or below["step"] == step - 1:  # one step from below to above: nothing to refine
                    step, kept_acc, outcome = restore(below), below["acc"], JUMPED_OVER
                else:
                    step, kept_acc, refining = restore(below), below["acc"], True
                    if cfg.progress:
                        bar.n = step
                        bar.set_postfix(rewind=step)
            else:
                below = snapshot(step, acc)
        if outcome is None and step >= max_steps:
            outcome = CAP_BELOW
        if outcome is None and time_budget_s and time.time() - t0 > time_budget_s:
            outcome = TIME_BUDGET
    if cfg.progress:
        bar.close()

    heldout = evaluate(policy, task, tok, cfg.eval_size, cfg.max_completion_length)
    info = {"kind": kind, "outcome": outcome, "steps": step, "probe_accuracy": kept_acc,
            "probe_size": probe_size, "heldout_accuracy": heldout,
            "target_accuracy": list(target_accuracy) if target_accuracy is not None else None,
            "lr": lr, "warmup_steps": warmup_steps, "batch_size": batch_size, "schedule": "linear warm-up, constant",
            "evaluations": evaluations, "seconds": round(time.time() - t0, 1),
            "task": cfg.task, "arch": cfg.arch, "seed": cfg.seed, **(extra or {})}
    ckpt.save_checkpoint(out_dir, policy, state=info, tokenizer=tok)
    return info


def describe(info: dict) -> str:
    """One line on what a base is: its steps, accuracy and how the warm-up ended (for the demo and
    the learning table). A base from before the band search has no outcome: its steps say it all."""
    acc = f"held-out {100 * info['heldout_accuracy']:.1f}%"
    if "outcome" not in info:
        return f"{info.get('steps')} SFT steps, {acc}"
    lr = f"lr {info['lr']:g} constant"
    if info["target_accuracy"] is None:
        return f"{info['steps']} SFT steps ({lr}), {acc}" + (" (time budget)" if info["outcome"] == TIME_BUDGET else "")
    low, high = (100 * x for x in info["target_accuracy"])
    probe = "" if info["probe_accuracy"] is None else \
        f"probe {100 * info['probe_accuracy']:.1f}% on {info['probe_size']} problems, "
    what = {IN_BAND: "probe inside the band", JUMPED_OVER: "one step jumped over the band: the base below it",
            CAP_BELOW: "below the band at the step cap", TIME_BUDGET: "below the band when the time ran out"}
    return (f"{info['steps']} SFT steps ({lr}), {probe}{acc}; target band {low:.0f}-{high:.0f}%: "
            f"{what[info['outcome']]}")
