"""The RL loop, top to bottom: rollout -> rewards -> advantages -> epochs x mini-batches of the
policy loss -> AdamW -> metrics. Methods differ only through their preset (presets.py): the config
fields it sets, the advantage estimator they name (advantages.py) and, for three of them, their
own loss (losses.py). The same loop runs on one process or on each rank of a torchrun job (ddp.py),
where N ranks take exactly the steps one process takes on the same global batch."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time

import torch
from safetensors.torch import load_file

import alignops as ao
from alignops.train import checkpoint as ckpt
from alignops.train import ddp
from alignops.train.advantages import Context, Prepared, compute_advantages, needs_critic
from alignops.train.config import TrainConfig, needs_reference, validate, validate_distributed
from alignops.train.critic import build_critic, critic_step, pretrain_critic
from alignops.train.evaluate import evaluation
from alignops.train.losses import step_normalizers
from alignops.train.metrics import MetricLog, plot_curves, progress, rollout_metrics
from alignops.train.model import build_policy, frozen_copy
from alignops.train.presets import get_preset
from alignops.train.rewards import RewardModel
from alignops.train.rollout import GroupSeeds, Scorer, collect_rollouts, lm_head, sequence_head
from alignops.train.tasks import make_task
from alignops.train.tokenizer import CharTokenizer


def setup(cfg: TrainConfig):
    """The task, its tokenizer and the policy (random init, or cfg.model)."""
    task = make_task(cfg.task)
    tok = CharTokenizer(task.alphabet)
    policy = build_policy(tok.vocab_size, cfg.model, cfg.arch, seed=cfg.seed, hidden=cfg.hidden_size,
                          layers=cfg.num_layers, heads=max(1, cfg.hidden_size // 32)).to(cfg.device)
    return task, tok, policy


def setup_from_base(cfg: TrainConfig):
    """setup(cfg) with the policy loaded from the SFT base cfg.init_from (unless cfg.model or none)."""
    task, tok, policy = setup(cfg)
    if cfg.fused_lm_head:
        lm_head(policy)  # an output layer the fused path cannot read fails here, before any step
    if cfg.init_from and cfg.init_from != "none" and not cfg.model:
        if not ckpt.is_checkpoint(cfg.init_from):
            raise ValueError(f"no base checkpoint at {cfg.init_from!r}: run `python -m alignops.train sft` "
                             f"first, or pass --init_from none")
        ckpt.load_model_weights(cfg.init_from, policy)
    return task, tok, policy


def reference_model(cfg, policy, preset):
    if not needs_reference(cfg, preset):
        return None
    if cfg.ref_model in (None, "none"):
        raise ValueError(f"method {cfg.method!r} with these options needs a reference model "
                         f"(beta={cfg.beta}, kl_in_reward={cfg.kl_in_reward}); --ref_model is none")
    if cfg.ref_model == "init":
        return frozen_copy(policy)
    if ckpt.is_checkpoint(cfg.ref_model):  # an alignops checkpoint of the policy's architecture
        ref = frozen_copy(policy)
        ckpt.load_model_weights(cfg.ref_model, ref)
        return ref
    return frozen_copy(build_policy(0, cfg.ref_model).to(cfg.device))  # a Hugging Face checkpoint


def train(cfg: TrainConfig) -> dict:
    """Trains cfg.method for max_steps (or time_budget_s of training) and returns the before/after
    held-out accuracies with the metric log; writes <output_dir>/metrics.jsonl, curves.png and the
    checkpoint. Under torchrun each rank trains its share of the groups (ddp.py): every rank
    returns the same result, rank 0 alone writes the files."""
    preset = get_preset(cfg.method)
    validate(cfg, preset)
    if preset.loop is not None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"method {cfg.method!r} is a data loop (alignops/train/loops), which runs in one "
                             "process; run it without torchrun")
        return train_loop(cfg, preset)
    ranks, device = ddp.init(cfg.device)
    try:
        validate_distributed(cfg, preset, ranks.world_size)
        if device != cfg.device:
            cfg = dataclasses.replace(cfg, device=device)
        result = _train(cfg, preset, ranks)
    except BaseException:
        ddp.shutdown(ranks, wait=False)  # the other ranks may be inside a collective this one never joins
        raise
    ddp.shutdown(ranks)
    return result


def _train(cfg: TrainConfig, preset, ranks: ddp.Ranks) -> dict:
    reward_model = RewardModel(cfg.reward_funcs, cfg.reward_weights)
    out_dir = cfg.resolved_output_dir()
    if ranks.is_main:
        os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng, seeds = random.Random(cfg.seed), GroupSeeds(cfg.seed, cfg.device)
    groups = ddp.group_range(cfg.num_prompts, ranks)

    # the models: the policy (from the SFT base), the frozen reference, the critic; their optimisers
    task, tok, policy = setup_from_base(cfg)
    ddp.broadcast_parameters(policy, ranks)
    ref = reference_model(cfg, policy, preset)
    critic = build_critic(policy) if needs_critic(cfg) else None
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_learning_rate) if critic else None
    kl_ctl = (ao.AdaptiveKLController(cfg.beta, cfg.kl_target, cfg.kl_horizon) if cfg.kl_ctrl == "adaptive"
              else ao.FixedKLController(cfg.beta))
    estimator_state: dict = {}  # kept across steps (REINFORCE's EMA baseline); checkpoints call it "preset"
    log = MetricLog(os.path.join(out_dir, "metrics.jsonl"), cfg.resume, write=ranks.is_main)
    ddp.barrier(ranks)  # every rank has read the log before rank 0 rewrites it
    start, elapsed = 0, 0.0

    def collect():
        return collect_rollouts(cfg, task, tok, policy, reward_model, rng, seeds, groups)

    def evaluate_on_main():  # rank 0 decodes the held-out set; every rank logs the same row
        return ddp.broadcast(evaluation(cfg, policy, task, tok) if ranks.is_main else None, ranks)

    def save(step):
        if not ranks.is_main:
            return
        state = {"step": step, "elapsed_s": elapsed, "rng": ckpt.rng_state(None, rng),
                 "sampling_rounds": seeds.rounds, "preset": estimator_state, "kl_coef": kl_ctl.value,
                 "config": dict(vars(cfg))}
        extra = {}
        if critic is not None:
            tensors, state["critic_optimizer"] = ckpt.optimizer_tensors(critic_opt)
            extra = {"critic.safetensors": critic.state_dict(), "critic_optim.safetensors": tensors}
        # one save, all files: a crash leaves the previous checkpoint or this one (checkpoint.py)
        ckpt.save_checkpoint(os.path.join(out_dir, ckpt.CHECKPOINT_SUBDIR), policy, opt, tokenizer=tok, state=state,
                             extra_tensors=extra)

    # resume from the run's checkpoint (<out_dir>/checkpoint, or out_dir itself), an interrupted save
    # repaired (by rank 0 alone: the repair renames and deletes): every file below comes from that one
    # committed checkpoint, which every rank loads
    where = ddp.broadcast(ckpt.locate(out_dir) if cfg.resume and ranks.is_main else None, ranks)
    if where is not None:
        state = ckpt.load_json(os.path.join(where, "state.json"))
        ckpt.load_model_weights(where, policy)
        ckpt.load_optimizer(opt, load_file(os.path.join(where, "optim.safetensors")), state["optimizer"])
        if critic is not None:
            critic.load_state_dict(load_file(os.path.join(where, "critic.safetensors")))
            ckpt.load_optimizer(critic_opt, load_file(os.path.join(where, "critic_optim.safetensors")),
                                state["critic_optimizer"])
        ckpt.set_rng_state(state["rng"], None, rng)
        seeds.rounds = state.get("sampling_rounds", 0)
        estimator_state.update(state.get("preset", {}))
        kl_ctl.value = state.get("kl_coef", kl_ctl.value)
        start, elapsed = state["step"], state["elapsed_s"]
        log.truncate(start)
    else:  # a fresh run (or a resume killed before its first save): evaluate the start
        log.truncate(-1)
        row = {"step": 0, **evaluate_on_main()}
        if critic is not None and cfg.value_pretrain_steps:
            t0 = time.time()
            row.update(pretrain_critic(cfg, critic, critic_opt, collect, ranks))
            elapsed += time.time() - t0
            row["time_s"] = elapsed
        log.add(row)

    bar = progress(range(start, cfg.max_steps), cfg.progress and ranks.is_main, desc=cfg.method, initial=start,
                   total=cfg.max_steps, time_budget_s=cfg.time_budget_s or None, elapsed_s=lambda: elapsed)
    shown: dict = {}  # the latest held-out accuracy, shown until the next evaluation
    step = start
    for step in bar:
        t0 = time.time()
        for g in opt.param_groups:  # from the step counter, so a resumed run gets the same rates
            g["lr"] = cfg.learning_rate * min(1.0, (step + 1) / max(1, cfg.warmup_steps))

        # rollout -> rewards: num_prompts groups of num_generations completions (this rank's share), scored
        rollout = collect()

        # -> advantages, from the rollout and the models' per-token scores of it
        scorer = Scorer(cfg, policy, ref, critic)
        ctx = Context(policy, tok, task, kl_ctl.value, collect, reward_model, estimator_state, ranks.group)
        prep = compute_advantages(cfg, rollout, scorer, ctx)

        # -> update: the policy (and the critic) on the step's batch
        metrics = policy_update(cfg, preset, policy, opt, prep, scorer, critic, critic_opt, ranks)
        if cfg.kl_in_reward:
            metrics["kl_coef"] = kl_ctl.value
            # the estimators' "kl" is the global batch's mean (process_group), the same on every rank
            kl_ctl.update(float(prep.metrics.get("kl", 0.0)),
                          n_steps=int(prep.batch.input_ids.shape[0]) * ranks.world_size)
        elapsed += time.time() - t0

        # -> log, evaluate, save
        row = {"step": step + 1, **rollout_metrics(rollout, cfg.num_generations, ranks), "time_s": elapsed,
               **ddp.mean_over_ranks(rollout.metrics, ranks), **ddp.mean_over_ranks(prep.metrics, ranks), **metrics}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            row.update(evaluate_on_main())
        log.add(row)
        if cfg.progress and ranks.is_main:
            show_progress(bar, row, shown)
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save(step + 1)
        # rank 0's clock decides, so every rank stops after the same step
        if cfg.time_budget_s and ddp.broadcast(elapsed >= cfg.time_budget_s, ranks):
            step += 1
            break
    else:
        step = cfg.max_steps

    if "eval/accuracy" not in log.rows[-1]:
        log.add({"step": step, **evaluate_on_main()})
    save(step)
    if ranks.is_main:
        plot_curves(log.rows, os.path.join(out_dir, "curves.png"), cfg.method)
    return _result(cfg, log, step, elapsed)


def show_progress(bar, row: dict, shown: dict) -> None:
    """The step's reward and the latest held-out greedy accuracy (evaluated every eval_every steps)."""
    if "eval/accuracy" in row:
        shown["held_out"] = f"{float(row['eval/accuracy']):.3f}"
    bar.set_postfix(reward=f"{float(row['reward']):.2f}", held_out=shown.get("held_out", "-"))


def _result(cfg, log: MetricLog, step: int, elapsed: float) -> dict:
    evals = [r for r in log.rows if "eval/accuracy" in r]
    sampled = f"eval/mean@{cfg.eval_samples}"
    return {"method": cfg.method, "steps": step, "seconds": round(elapsed, 1),
            "accuracy_before": evals[0]["eval/accuracy"], "accuracy_after": evals[-1]["eval/accuracy"],
            "sampled_before": evals[0].get(sampled), "sampled_after": evals[-1].get(sampled),
            "final_eval": evals[-1], "log": log.rows}


def train_loop(cfg: TrainConfig, preset) -> dict:
    """The trainer for a data-loop method (alignops/train/loops): the same base, budget, progress
    bar, evaluation, metric log, checkpoints and curves as the RL loop, with the method's own step."""
    from alignops.train.loops import base as loops  # noqa: PLC0415

    loop_cls = preset.resolve_loop()
    options = loops.parse_options(loop_cls, cfg.loop_kwargs, cfg.method)
    out_dir = cfg.resolved_output_dir()
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    task, tok, policy = setup_from_base(cfg)
    opt = (torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
           if loop_cls.trains_parameters else None)
    run = loops.Run(cfg, task, tok, policy, opt, random.Random(cfg.seed), GroupSeeds(cfg.seed, cfg.device),
                    RewardModel(cfg.reward_funcs, cfg.reward_weights), out_dir)
    loop = loop_cls(run, options)
    log = MetricLog(os.path.join(out_dir, "metrics.jsonl"), cfg.resume)
    start, elapsed = 0, 0.0

    def save(step):
        state = {"step": step, "elapsed_s": elapsed, "rng": ckpt.rng_state(None, run.rng),
                 "sampling_rounds": run.seeds.rounds, "loop": loop.state_dict(), "config": dict(vars(cfg))}
        tensors = loop.tensors()
        state["loop_tensors"] = sorted(tensors)
        ckpt.save_checkpoint(os.path.join(out_dir, ckpt.CHECKPOINT_SUBDIR), policy, opt, tokenizer=tok, state=state,
                             extra_tensors={f"loop_{k}.safetensors": v for k, v in tensors.items()})

    where = ckpt.locate(out_dir) if cfg.resume else None
    if where is not None:
        state = ckpt.load_json(os.path.join(where, "state.json"))
        ckpt.load_model_weights(where, policy)
        if opt is not None:
            ckpt.load_optimizer(opt, load_file(os.path.join(where, "optim.safetensors")), state["optimizer"])
        ckpt.set_rng_state(state["rng"], None, run.rng)
        run.seeds.rounds = state["sampling_rounds"]
        loop.load_state_dict(state["loop"], {k: load_file(os.path.join(where, f"loop_{k}.safetensors"))
                                             for k in state["loop_tensors"]})
        start, elapsed = state["step"], state["elapsed_s"]
        log.truncate(start)
    else:
        log.truncate(-1)
        log.add({"step": 0, **loop.evaluate()})

    bar = progress(range(start, cfg.max_steps), cfg.progress, desc=cfg.method, initial=start, total=cfg.max_steps,
                   time_budget_s=cfg.time_budget_s or None, elapsed_s=lambda: elapsed)
    shown: dict = {}  # the latest held-out accuracy, shown until the next evaluation
    step = start
    for step in bar:
        t0 = time.time()
        metrics = loop.step(step)
        elapsed += time.time() - t0
        row = {"step": step + 1, "time_s": elapsed, **metrics}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            row.update(loop.evaluate())
        log.add(row)
        if cfg.progress and "reward" in row:
            show_progress(bar, row, shown)
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save(step + 1)
        if cfg.time_budget_s and elapsed >= cfg.time_budget_s:
            step += 1
            break
    else:
        step = cfg.max_steps
    if "eval/accuracy" not in log.rows[-1]:
        log.add({"step": step, **loop.evaluate()})
    save(step)
    plot_curves(log.rows, os.path.join(out_dir, "curves.png"), cfg.method)
    return _result(cfg, log, step, elapsed)


# metrics of a micro-batch's loss that are its share of the step's loss (divided by the step's global
# normaliser): summed over micro-batches and ranks; the others are token means, weighted by tokens
SUMMED_METRICS = frozenset({"loss", "pg_loss", "nll_loss", "kr_loss", "vf_loss"})


def accumulate(metrics: dict, token_weight, sums: dict, maxima: dict) -> None:
    """Adds one micro-batch's metrics: shares of the step's loss summed, maxima (`.../max`) kept
    as maxima, token means weighted by the micro-batch's share of the step's tokens."""
    for k, v in metrics.items():
        v = float(v)
        if k.rsplit("/", 1)[-1] == "max":
            maxima[k] = max(maxima.get(k, -math.inf), v)
        else:
            sums[k] = sums.get(k, 0.0) + v * (1.0 if k in SUMMED_METRICS else float(token_weight))


def global_normalizers(cfg, data: dict, rows: torch.Tensor, ranks: ddp.Ranks) -> tuple[dict, torch.Tensor]:
    """(step_normalizers of the mini-batch, its masked-in token count), both summed over the ranks'
    shares `rows` in one all-reduce: the denominators of the whole global mini-batch."""
    local = step_normalizers(cfg, {k: v[rows] for k, v in data.items()})
    names = sorted(local)
    packed = torch.stack([local[k].reshape(()).to(torch.float64) for k in names]
                         + [data["mask"][rows].sum().to(torch.float64)])
    total = ddp.all_sum(packed, ranks)
    dtype = local["pg"].dtype
    return {k: total[i].to(dtype) for i, k in enumerate(names)}, total[-1]


def policy_update(cfg, preset, policy, opt, prep: Prepared, scorer: Scorer, critic=None, critic_opt=None,
                  ranks: ddp.Ranks = ddp.ALONE) -> dict:
    """num_iterations epochs x num_mini_batches optimiser steps, each accumulated over
    gradient_accumulation_steps micro-batches with the mini-batch's global normaliser, so
    micro-batching gives the same update as one big batch. The critic (PPO family) takes its
    step on the same mini-batch, with its own optimiser. Under DDP the mini-batches are drawn
    from the global batch; each rank backpropagates the rows it holds, the gradients are summed
    over the ranks and every rank takes the same step."""
    batch = prep.batch
    B = batch.input_ids.shape[0]  # this rank's rows: global rows [rank * B, (rank + 1) * B)
    first = ranks.rank * B
    on_policy = cfg.num_iterations == 1 and cfg.num_mini_batches == 1
    data = dict(prep.data)
    data["labels"] = batch.completion_ids.masked_fill(batch.completion_mask == 0, -100)
    data["mask"] = batch.completion_mask
    if cfg.mask_truncated_completions:
        data["mask"] = batch.completion_mask * (~batch.truncated)[:, None]
    if not on_policy or preset.old_logp:
        data["old_logp"] = scorer.old_logp(batch)
    if scorer.ref is not None and needs_reference(cfg, preset):
        data["ref_logp"] = scorer.ref_logp(batch)
    if critic is not None:
        data["old_values"] = scorer.values(batch)
    overrides = dict(prep.loss_overrides)
    if ranks.distributed and cfg.loss_method == "bapo":
        overrides["process_group"] = ranks.group  # the bounds searched on the global mini-batch's tokens
    sums: dict[str, float] = {}
    n_updates = 0

    def add(metrics):
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)

    for _ in range(cfg.num_iterations):
        for mb in minibatches(cfg, preset, B * ranks.world_size, batch.input_ids.device):
            mine = mb[(mb >= first) & (mb < first + B)] - first
            norms, tokens = global_normalizers(cfg, data, mine, ranks)
            opt.zero_grad(set_to_none=True)
            step_sums, step_max = {}, {}
            for micro in micro_batches(mine, cfg.gradient_accumulation_steps,
                                       cfg.num_generations if preset.whole_groups else 1):
                d = {k: v[micro] for k, v in data.items()}
                head = sequence_head(policy, batch.select(micro), cfg.fused_lm_head)
                out = preset.loss(cfg, head, d, norms, overrides)
                out.loss.backward()
                accumulate({**out.metrics, "loss": out.loss.detach()}, d["mask"].sum() / tokens.clamp_min(1),
                           step_sums, step_max)
            step_sums, step_max = ddp.reduce_metrics(step_sums, step_max, ranks)
            add(step_sums)
            add(step_max)
            ddp.sum_gradients(policy.parameters(), ranks)
            add({"grad_norm": torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)})
            opt.step()
            if critic is not None:
                add(critic_step(cfg, critic, critic_opt, batch, data, mine, ranks))
            n_updates += 1
    return {k: v / n_updates for k, v in sums.items()}


def micro_batches(rows: torch.Tensor, n: int, unit: int = 1) -> list[torch.Tensor]:
    """`rows` (a rank's share of a mini-batch) in at most n non-empty micro-batches of whole units
    (`unit` consecutive rows: a group, for methods that compare a group's rows). Alone a
    mini-batch splits into exactly n; a rank's share may hold fewer units than n, or none."""
    if len(rows) % unit:
        raise ValueError(f"{len(rows)} rows do not form whole groups of {unit}")
    return [m.reshape(-1) for m in rows.reshape(-1, unit).chunk(n) if m.numel()]


def minibatches(cfg, preset, B: int, device) -> list[torch.Tensor]:
    """Row indices of each mini-batch; methods that compare a group's rows (GVPO) keep groups whole."""
    if cfg.num_mini_batches == 1:
        return [torch.arange(B, device=device)]
    if preset.whole_groups:
        G = cfg.num_generations
        groups = torch.randperm(B // G, device=device)
        order = (groups[:, None] * G + torch.arange(G, device=device)).reshape(-1)
    else:
        order = torch.randperm(B, device=device)
    return list(order.chunk(cfg.num_mini_batches))
