"""Trainer configuration. The flag rule (docs/glossary.md): an option is named as in alignops's API, or as
in TRL's GRPOConfig where a TRL user would type it (epsilon, beta, loss_type, num_generations, ...); verl
and OpenRLHF names are accepted as aliases where they mean the same thing (and where a verl name's
values mean something else, as kl_loss_type's do, they are translated).
Every method is a named preset (alignops.train.presets) that sets fields, each of which can still
be overridden on the command line; `validate` checks the result before anything is built."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from alignops.policy.math import VERL_KL_LOSS_TYPES, kl_estimator_from_verl


@dataclasses.dataclass
class TrainConfig:
    # what to train
    method: str = "grpo"
    task: str = "add"                      # built-in task name or a path to a prompts+answers .jsonl
    model: str | None = None               # local HF checkpoint dir; None: a tiny random-init model
    arch: str = "llama"                    # tiny model style: llama | qwen2
    hidden_size: int = 128                 # tiny model width
    num_layers: int = 3                    # tiny model depth
    init_from: str | None = "runs/base"    # SFT base checkpoint to start from ("none": random init)
    ref_model: str | None = "init"         # reference policy: "init" (frozen start policy), a path, or "none"
    output_dir: str | None = None          # default runs/<method>
    seed: int = 0
    backend: str | None = None             # alignops backend (None: automatic)
    fused_lm_head: bool = True             # losses from hidden states + lm_head (ao.fused_linear_*); false: logits
    device: str = "cpu"

    # rollouts
    num_prompts: int = 16                  # prompts per step
    num_generations: int = 8               # samples per prompt (group size)
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 6
    reward_funcs: str = "accuracy"         # comma-separated: accuracy, format, arithmetic_work, module:function
    reward_weights: str | None = None      # comma-separated weights (default: all 1)
    dynamic_sampling: bool = False         # DAPO: keep only groups whose rewards differ, refill
    max_num_gen_batches: int = 10          # dynamic sampling / resampling: generation rounds per step
    min_valid_group_fraction: float = 0.0  # GPG threshold resampling beta_th (0: off)
    overlong_buffer_len: int = 0           # DAPO overlong shaping L_cache (0: off)
    overlong_penalty_factor: float = 1.0
    mask_truncated_completions: bool = False  # overlong filtering: truncated rows leave the loss
    truncation_reward: float | None = None    # DLER: reward of a truncated completion (None: as scored)

    # optimisation
    learning_rate: float = 3e-5
    warmup_steps: int = 20                 # linear learning-rate warm-up (Adam's first steps are sign steps)
    weight_decay: float = 0.0
    max_steps: int = 200
    time_budget_s: float | None = None     # stop after this many seconds of training
    num_iterations: int = 1                # PPO epochs over each rollout batch
    num_mini_batches: int = 1              # optimiser steps per epoch
    gradient_accumulation_steps: int = 1   # micro-batches per optimiser step (same update)
    max_grad_norm: float = 1.0

    # critic (PPO family)
    critic_learning_rate: float = 1e-3
    cliprange_value: float | None = 0.2    # value clip c_v (None: plain MSE)
    gamma: float = 1.0
    lam: float = 0.95                      # GAE lambda of the actor's advantages
    critic_lam: float | None = None        # lambda of the value targets (VC-PPO/VAPO decoupled GAE: 1.0)
    lam_alpha: float | None = None         # VAPO length-adaptive lambda = 1 - 1/(alpha L) (None: off)
    whiten_advantages: bool = True
    value_pretrain_steps: int = 0          # VC-PPO/VAPO: critic-only steps on Monte-Carlo targets first

    # the loss (TRL's names where TRL has the concept, else the API's; the API's names in comments)
    loss_method: str = "grpo"              # alignops per-token loss: ppo, grpo, dapo, cispo, gspo, ...
    epsilon: float | None = None           # clip_low (None: the loss method's registry default)
    epsilon_high: float | None = None      # clip_high (None: the method's default, else = epsilon)
    clip_ratio_c: float | None = None      # dual-clip constant c > 1 for A < 0 (None: off)
    beta: float = 0.0                      # kl_coef of the KL loss against the reference model
    kl_estimator: str = "k3"
    kl_in_reward: bool = False             # beta weighs k1(old, ref) in the token rewards, not a loss
    kl_ctrl: str = "fixed"                 # fixed | adaptive (Ziegler et al.; for KL in reward)
    kl_target: float = 0.1
    kl_horizon: int = 10000
    nll_coef: float = 0.0                  # VAPO: + nll_coef * NLL of the correct completions
    entropy_coef: float = 0.0              # entropy bonus -entropy_coef * Agg(H)
    agg: str = "token-mean"                # aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum | ...
    loss_type: str | None = None           # TRL's loss_type (grpo, bnpo, dapo, dr_grpo, cispo, sapo): sets agg
                                           # (and loss_method for cispo, sapo); None: not given
    loss_kwargs: dict = dataclasses.field(default_factory=dict)  # method-specific knobs

    # advantages
    advantage: str = "grpo"                # grpo | rloo | reinforce | ...
    scale_rewards: str = "group"           # group | batch | none
    advantage_kwargs: dict = dataclasses.field(default_factory=dict)

    # data-loop methods (alignops/train/loops): the loop's Options, e.g. {"mode": "offline"}
    loop_kwargs: dict = dataclasses.field(default_factory=dict)

    # evaluation and logging
    eval_every: int = 20
    eval_size: int = 1000
    eval_samples: int = 4                  # also report mean@k: k samples per problem at `temperature` (0: off)
    save_every: int = 0                    # 0: only at the end
    resume: bool = False
    progress: bool = True

    def resolved_output_dir(self) -> str:
        return self.output_dir or f"runs/{self.method}"


# verl / OpenRLHF names, and the API's where the flag is TRL's, -> TrainConfig fields (same meaning only)
ALIASES = {
    "clip_ratio": "epsilon", "clip_ratio_low": "epsilon", "eps_clip": "epsilon", "clip_low": "epsilon",
    "clip_ratio_high": "epsilon_high", "clip_high": "epsilon_high",
    "dual_clip": "clip_ratio_c",
    "kl_loss_coef": "beta", "kl_coef": "beta", "init_kl_coef": "beta",
    "entropy_coeff": "entropy_coef",
    "loss_agg_mode": "agg",
    "rollout_n": "num_generations", "n_samples_per_prompt": "num_generations", "group_size": "num_generations",
    "response_length": "max_completion_length", "generate_max_len": "max_completion_length",
    "lr": "learning_rate", "actor_learning_rate": "learning_rate", "lr_warmup_steps": "warmup_steps",
    "ppo_epochs": "num_iterations", "grad_clip": "max_grad_norm",
    "total_training_steps": "max_steps",
    "critic_lr": "critic_learning_rate", "value_clip": "cliprange_value",
    "lambd": "lam", "gae_lambda": "lam", "critic_warmup": "value_pretrain_steps",
    "use_kl_in_reward": "kl_in_reward", "target_kl": "kl_target", "horizon": "kl_horizon",
    "filter_groups": "dynamic_sampling", "min_inverse_alpha": "min_valid_group_fraction",
    "positive_loss_coeff": "nll_coef", "lm_loss_coef": "nll_coef",
    "train_batch_size": "num_prompts", "rollout_batch_size": "num_prompts",
}

# verl's actor.kl_loss_type -> alignops kl_estimator (verl 0.9.1, verl.trainer.ppo.core_algos.kl_penalty).
# verl computes "k3" and "low_var_kl" alike: k3 with u = ref_logp - logp clamped to [-20, 20] and the value
# to [-10, 10], which is alignops's low_var_kl (alignops's k3 is the exact, unclamped expm1(u) - u). A "+"
# suffix keeps the value and takes k2's gradient (straight-through); on k2 itself that changes nothing.
# verl names whose values differ from alignops's: option -> (TrainConfig field, value translation)
VALUE_ALIASES = {"kl_loss_type": ("kl_estimator", kl_estimator_from_verl)}

# TRL's loss_type (TRL 1.16 GRPOConfig), with TRL's meaning: the aggregation, and the per-token loss where it is
# not TRL's clipped surrogate (None: --loss_method, the preset's clip variant, stays).
TRL_LOSS_TYPES = {"grpo": (None, "seq-mean-token-mean"), "bnpo": (None, "token-mean"), "dapo": (None, "token-mean"),
                  "dr_grpo": (None, "seq-mean-token-sum-norm"), "cispo": ("cispo", "token-mean"),
                  "sapo": ("sapo", "seq-mean-token-mean")}

# options that were renamed: old -> (new, why). Each raises a TypeError naming the new one (docs/glossary.md).
OLD_OPTIONS = {
    "delta": ("clip_ratio_c", "TRL's GRPOConfig.delta is the two-sided ratio cap of INTELLECT-2 "
                              "(it caps A > 0 tokens too when delta < 1 + epsilon_high), not the dual clip"),
}


def old_option_error(old: str, new: str, why: str = "") -> TypeError:
    return TypeError(f"--{old} is an old option name: it is now --{new} (docs/glossary.md)"
                     + (f"; {why}" if why else ""))


def canonical(name: str) -> str:
    name = name.replace("-", "_")
    return ALIASES.get(name, name)


def _parse_value(field: dataclasses.Field, text: str):
    hint = typing.get_type_hints(TrainConfig)[field.name]
    if text.lower() in ("none", "null") and "None" in str(hint):
        return None
    base = typing.get_args(hint)[0] if typing.get_origin(hint) in (typing.Union, type(int | None)) else hint
    if base is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"--{field.name} expects true/false, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    if base is dict:
        import json  # noqa: PLC0415
        return json.loads(text)
    return base(text)


def apply_loss_type(cfg: TrainConfig, value, given: dict) -> None:
    """--loss_type with TRL's meaning: the aggregation (and the per-token loss of cispo and sapo). An
    aggregation string is the old meaning of --loss_type: it raises naming --agg."""
    from alignops.layout import AGG_MODES  # noqa: PLC0415

    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        cfg.loss_type = None
        return
    if value in AGG_MODES:
        raise TypeError(f"--loss_type {value} is the old meaning of --loss_type: the aggregation is now --agg "
                        f"(--agg {value}); --loss_type takes TRL's loss types {sorted(TRL_LOSS_TYPES)} "
                        "(docs/glossary.md)")
    if value not in TRL_LOSS_TYPES:
        raise ValueError(f"--loss_type {value!r} is not one of TRL's loss types the trainer runs "
                         f"{sorted(TRL_LOSS_TYPES)}; for an aggregation use --agg, for a per-token loss --loss_method")
    method, agg = TRL_LOSS_TYPES[value]
    if "agg" in given and given["agg"] != agg:
        raise ValueError(f"--loss_type {value} aggregates with {agg!r} (TRL's meaning) but --agg {given['agg']!r} "
                         "was given too; give one")
    if method is not None and "loss_method" in given and given["loss_method"] != method:
        raise ValueError(f"--loss_type {value} is TRL's {method} loss but --loss_method {given['loss_method']!r} "
                         "was given too; give one")
    cfg.loss_type, cfg.agg = value, agg
    if method is not None:
        cfg.loss_method = method


def apply_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key in overrides:
        old = key.replace("-", "_")
        if old in OLD_OPTIONS:
            raise old_option_error(old, *OLD_OPTIONS[old])
    for alias, (name, _) in VALUE_ALIASES.items():  # verl's kl_loss_type k3 and kl_estimator k3 differ: one of them
        keys = [k for k in overrides if k.replace("-", "_") == alias or canonical(k) == name]
        if len(keys) > 1:
            raise ValueError(f"{', '.join('--' + k for k in keys)} all set {name}; give one")
    given = {canonical(k): v for k, v in overrides.items() if canonical(k) in ("agg", "loss_method")}
    loss_type = None
    for key, value in overrides.items():
        alias = key.replace("-", "_")
        if canonical(key) == "loss_type":
            loss_type = (value,)  # applied last: it sets agg (and loss_method), checked against them
            continue
        if alias in VALUE_ALIASES:
            name, translate = VALUE_ALIASES[alias]
            setattr(cfg, name, translate(value))
            continue
        name = canonical(key)
        if name not in fields:
            raise ValueError(f"unknown option --{key}; see --help for the options")
        if isinstance(value, str):
            value = _parse_value(fields[name], value)
        setattr(cfg, name, value)
    if loss_type is not None:
        apply_loss_type(cfg, loss_type[0], given)
    return cfg


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("trainer options (the API's names, or TRL's GRPOConfig names where TRL has "
                                      "the option; verl/OpenRLHF aliases accepted; docs/glossary.md)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "method":
            continue
        aliases = sorted(a for a, t in ALIASES.items() if t == f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"default: {default}" + (f"; aliases: {', '.join('--' + a for a in aliases)}" if aliases else "")
        group.add_argument(f"--{f.name}", *[f"--{a}" for a in aliases], dest=f.name, default=argparse.SUPPRESS,
                           help=help_text, metavar=type(default).__name__.upper() if default is not None else "X")
    # the old names keep their own dest, so that apply_overrides raises naming the new one
    for old, (new, _) in OLD_OPTIONS.items():
        group.add_argument(f"--{old}", dest=old, default=argparse.SUPPRESS, metavar="X",
                           help=f"old name of --{new} (raises; docs/glossary.md)")
    # verl's kl_loss_type keeps its own dest: its values are translated (apply_overrides)
    group.add_argument("--kl_loss_type", dest="kl_loss_type", default=argparse.SUPPRESS, metavar="STR",
                       help="verl's name and values for --kl_estimator: " + ", ".join(
                           f"{k} -> {v}" for k, v in VERL_KL_LOSS_TYPES.items()))


def needs_reference(cfg: TrainConfig, preset) -> bool:
    return cfg.beta > 0 or preset.reference


def validate(cfg: TrainConfig, preset) -> None:
    """The options of a run are consistent with each other and with its preset."""
    from alignops.train.advantages import ADVANTAGES, CRITIC_ADVANTAGES, TOKEN_REWARD_ADVANTAGES  # noqa: PLC0415

    if preset.loop is not None:
        return validate_loop(cfg, preset)
    if cfg.loop_kwargs:
        raise ValueError(f"--loop_kwargs sets the options of a data-loop method; {preset.name!r} is not one")
    if cfg.advantage not in ADVANTAGES:
        raise ValueError(f"--advantage {cfg.advantage!r} is not one of {sorted(ADVANTAGES)}")
    if (preset.group_method or cfg.dynamic_sampling or cfg.min_valid_group_fraction > 0) and cfg.num_generations < 2:
        raise ValueError(f"method {preset.name!r} compares samples within a group: "
                         f"num_generations must be >= 2, got {cfg.num_generations}")
    if cfg.beta < 0 or cfg.entropy_coef < 0 or cfg.nll_coef < 0:
        raise ValueError(f"beta, entropy_coef and nll_coef must be >= 0, got {cfg.beta}, "
                         f"{cfg.entropy_coef}, {cfg.nll_coef}")
    rows = cfg.num_prompts * cfg.num_generations
    if rows % (cfg.num_mini_batches * cfg.gradient_accumulation_steps):
        raise ValueError("num_prompts * num_generations must divide into num_mini_batches x "
                         "gradient_accumulation_steps micro-batches")
    if preset.whole_groups and (rows // (cfg.num_mini_batches * cfg.gradient_accumulation_steps)) % cfg.num_generations:
        raise ValueError(f"method {preset.name!r} needs whole groups in every micro-batch: num_prompts must be a "
                         "multiple of num_mini_batches x gradient_accumulation_steps")
    critic = cfg.advantage in CRITIC_ADVANTAGES
    for knob, on in (("value_pretrain_steps", cfg.value_pretrain_steps > 0), ("critic_lam", cfg.critic_lam is not None),
                     ("lam_alpha", cfg.lam_alpha is not None)):
        if on and not critic:
            raise ValueError(f"--{knob} needs a critic: use it with --advantage gae (ppo, vc_ppo, vapo, orz, "
                             f"cppo_hit), not {cfg.advantage!r}")
    if cfg.kl_in_reward and cfg.advantage not in TOKEN_REWARD_ADVANTAGES:
        raise ValueError(f"--kl_in_reward puts the KL in token rewards, which --advantage {cfg.advantage!r} does "
                         f"not read; use one of {TOKEN_REWARD_ADVANTAGES} or the KL loss (--beta alone)")
    if cfg.dynamic_sampling and cfg.min_valid_group_fraction > 0:
        raise ValueError("dynamic_sampling and min_valid_group_fraction are two group-resampling policies; "
                         "choose one")
    if not 0.0 <= cfg.min_valid_group_fraction <= 1.0:
        raise ValueError(f"min_valid_group_fraction must lie in [0, 1], got {cfg.min_valid_group_fraction}")
    if cfg.kl_ctrl not in ("fixed", "adaptive"):
        raise ValueError(f"kl_ctrl must be 'fixed' or 'adaptive', got {cfg.kl_ctrl!r}")
    if cfg.overlong_buffer_len < 0 or cfg.overlong_buffer_len > cfg.max_completion_length:
        raise ValueError(f"overlong_buffer_len must lie in [0, max_completion_length="
                         f"{cfg.max_completion_length}], got {cfg.overlong_buffer_len}")
    if needs_reference(cfg, preset) and cfg.ref_model in (None, "none"):
        raise ValueError(f"method {preset.name!r} needs a reference model (beta={cfg.beta}, "
                         f"kl_in_reward={cfg.kl_in_reward}) but --ref_model is none")


def validate_loop(cfg: TrainConfig, preset) -> None:
    """A data-loop method's checks: its --loop_kwargs (the loop's Options) and the shared knobs it reads."""
    from alignops.train.loops.base import parse_options  # noqa: PLC0415

    parse_options(preset.resolve_loop(), cfg.loop_kwargs, preset.name)
    for name in ("num_prompts", "max_steps", "max_completion_length", "eval_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if preset.group_method and cfg.num_generations < 2:
        raise ValueError(f"method {preset.name!r} compares samples of a prompt: num_generations must be >= 2, "
                         f"got {cfg.num_generations}")
    if cfg.learning_rate < 0 or cfg.temperature < 0:
        raise ValueError(f"learning_rate and temperature must be >= 0, got {cfg.learning_rate}, {cfg.temperature}")


def validate_distributed(cfg: TrainConfig, preset, world_size: int) -> None:
    """The options that a run split over `world_size` ranks supports: each rank holds
    num_prompts / world_size whole groups, and nothing may need the whole batch in one process."""
    if world_size <= 1:
        return
    if cfg.num_prompts % world_size:
        raise ValueError(f"num_prompts={cfg.num_prompts} must be a multiple of the world size ({world_size}): "
                         "each rank holds an equal share of whole groups")
    if cfg.dynamic_sampling or cfg.min_valid_group_fraction > 0:
        raise ValueError(f"method {preset.name!r}: dynamic_sampling / min_valid_group_fraction choose and refill "
                         f"groups from the whole batch, which is split over {world_size} ranks; run it in one "
                         "process or pass --dynamic_sampling false --min_valid_group_fraction 0")
    if cfg.advantage == "cppo_xmu":
        raise ValueError(f"--advantage cppo_xmu prunes completions and refills the batch with more prompts, so the "
                         f"ranks' shares would differ in size; it does not run on {world_size} ranks")
    if cfg.loss_method == "bapo" and (cfg.gradient_accumulation_steps != 1 or cfg.num_mini_batches != 1):
        raise ValueError("loss_method 'bapo' searches its clipping bounds on each loss call's tokens; on several "
                         "ranks that is the global batch only with gradient_accumulation_steps=1 and "
                         "num_mini_batches=1")
