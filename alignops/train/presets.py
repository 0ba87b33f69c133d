"""Method presets: each method of the survey is (advantage estimator, per-token loss, aggregation)
plus a trainer data policy (docs/methods.md R5, §3.1). A preset is data: the TrainConfig fields it
sets (the command line can still override any of them), a few facts the trainer checks, and at most
one hook, its own micro-batch loss (losses.py). Add a method by adding one entry to PRESETS (and,
when its advantage is new, one estimator to advantages.ADVANTAGES; when its loss is not a
policy_loss method, one loss function in losses.py)."""

from __future__ import annotations

import dataclasses
import json
import importlib
from typing import Callable

from alignops.train import losses
from alignops.train.config import TrainConfig, apply_overrides


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict                          # TrainConfig fields the method sets
    group_method: bool = True             # compares samples within a group: num_generations >= 2
    whole_groups: bool = False            # every mini-batch holds whole groups (GVPO)
    reference: bool = False               # needs the reference model even without a KL term (CPPO-HIT)
    old_logp: bool = False                # needs the rollout policy's log-probs even on-policy (GVPO)
    loss: Callable = losses.fused_loss    # the micro-batch loss (losses.py)
    loop: str | None = None               # a data-loop method: "module:Class" in alignops/train/loops

    def resolve_loop(self):
        module, cls = self.loop.split(":")
        return getattr(importlib.import_module(f"alignops.train.loops.{module}"), cls)


_PPO_CRITIC = {"advantage": "gae", "gamma": 1.0, "lam": 0.95, "whiten_advantages": True, "cliprange_value": 0.2}

PRESETS: dict[str, Preset] = {p.name: p for p in [
    # --- critic-based
    Preset("ppo", "PPO: critic + GAE(1, 0.95) + whitening, clipped value loss, dual clip 3, k1 KL in the "
                  "reward with the adaptive controller",
           {**_PPO_CRITIC, "loss_method": "ppo", "agg": "token-mean", "clip_ratio_c": 3.0, "beta": 0.01,
            "kl_in_reward": True, "kl_ctrl": "adaptive", "kl_target": 0.05, "kl_horizon": 10000},
           group_method=False),
    Preset("vc_ppo", "VC-PPO: value pretraining, decoupled GAE (critic lambda 1, actor 0.95), clip-higher",
           {**_PPO_CRITIC, "critic_lam": 1.0, "value_pretrain_steps": 50, "loss_method": "ppo",
            "epsilon": 0.2, "epsilon_high": 0.28, "agg": "token-mean", "beta": 0.0}, group_method=False),
    # lam_alpha: the paper's 0.05 makes lambda = 1 - 1/(alpha L) <= 0 for L <= 20 tokens, i.e. one-step TD
    # on a fresh critic for every completion of the built-in task (L <= 6); 1.0 keeps lambda in [0, 0.83]
    Preset("vapo", "VAPO: value pretraining, decoupled + length-adaptive GAE (alpha 1 for the short task; the "
                   "paper's 0.05 assumes long answers), clip-higher, token-mean, + 0.1 NLL on correct completions",
           {**_PPO_CRITIC, "critic_lam": 1.0, "lam_alpha": 1.0, "value_pretrain_steps": 50,
            "loss_method": "ppo", "epsilon": 0.2, "epsilon_high": 0.28, "agg": "token-mean",
            "beta": 0.0, "nll_coef": 0.1}, loss=losses.vapo_loss),
    Preset("orz", "Open-Reasoner-Zero: PPO with GAE(1, 1) + whitening, no KL, value clip 0.2, "
                  "seq-mean-token-mean", {**_PPO_CRITIC, "lam": 1.0, "loss_method": "ppo", "epsilon": 0.2,
                                          "agg": "seq-mean-token-mean", "beta": 0.0}, group_method=False),
    Preset("cppo_hit", "CPPO (continual PPO): sample-typed alpha_i on the PPO surrogate and beta_i on a "
                       "(logp - logp_prev)^2 retention term (our weight table)",
           {**_PPO_CRITIC, "advantage": "cppo_hit", "loss_method": "ppo", "agg": "token-mean",
            "beta": 0.0}, group_method=False, reference=True, loss=losses.cppo_hit_loss),
    # --- critic-free, REINFORCE family
    Preset("reinforce", "REINFORCE with an EMA reward baseline, -A*logp, seq-mean-token-sum",
           {"loss_method": "reinforce", "advantage": "ema_baseline", "agg": "seq-mean-token-sum",
            "beta": 0.0}, group_method=False),
    Preset("reinforce_pp", "REINFORCE++: k1 KL in the token rewards (0.01), returns, global whitening, PPO clip",
           {"loss_method": "ppo", "advantage": "reinforce_pp", "agg": "token-mean", "beta": 0.01,
            "kl_in_reward": True}, group_method=False),
    Preset("reinforce_pp_baseline", "REINFORCE++-baseline: group-mean baseline, global token whitening, PPO clip",
           {"loss_method": "ppo", "advantage": "reinforce_pp_baseline", "agg": "token-mean", "beta": 0.0}),
    Preset("remax", "ReMax: baseline = reward of the greedy decode, PPO clip (verl)",
           {"loss_method": "ppo", "advantage": "remax", "agg": "token-mean", "beta": 0.0}, group_method=False),
    Preset("rloo", "RLOO: leave-one-out baseline, token-level PPO clip",
           {"loss_method": "ppo", "advantage": "rloo", "agg": "token-mean", "beta": 0.0}),
    # --- GRPO family
    Preset("grpo", "GRPO (DeepSeekMath): group-normalised advantages, PPO clip, k3 KL loss, "
                   "sequence-mean of token-means",
           {"loss_method": "grpo", "advantage": "grpo", "scale_rewards": "group",
            "agg": "seq-mean-token-mean", "beta": 0.04}),
    Preset("dr_grpo", "Dr.GRPO: no std division, constant normaliser B x max_len, no KL",
           {"loss_method": "grpo", "advantage": "grpo", "scale_rewards": "none",
            "agg": "seq-mean-token-sum-norm", "beta": 0.0}),
    Preset("dapo", "DAPO: clip-higher 0.2/0.28, token-mean, no KL, dynamic sampling with refill, overlong shaping",
           {"loss_method": "grpo", "advantage": "grpo", "epsilon": 0.2, "epsilon_high": 0.28,
            "agg": "token-mean", "beta": 0.0, "dynamic_sampling": True, "max_num_gen_batches": 10,
            "overlong_buffer_len": 2, "overlong_penalty_factor": 1.0}),
    Preset("simplerl", "SimpleRL-Zoo: GRPO with low_var_kl 1e-3 and entropy bonus 1e-3, token-mean",
           {"loss_method": "grpo", "advantage": "grpo", "agg": "token-mean", "beta": 1e-3,
            "kl_estimator": "low_var_kl", "entropy_coef": 1e-3}),
    Preset("gspo", "GSPO: sequence-level (geometric-mean) ratio clipped at 3e-4/4e-4",
           {"loss_method": "gspo", "advantage": "grpo", "agg": "seq-mean-token-mean", "beta": 0.0}),
    Preset("gpg", "GPG: plain policy gradient with alpha-corrected group advantages, token-mean, threshold "
                  "resampling beta_th 0.6",
           {"loss_method": "gpg", "advantage": "gpg", "agg": "token-mean", "beta": 0.0,
            "min_valid_group_fraction": 0.6, "max_num_gen_batches": 3}),
    Preset("gppo", "GPPO: gradient-preserving clip (beta1 = beta2 = 1), 0.2/0.28, token-mean",
           {"loss_method": "gppo", "advantage": "grpo", "agg": "token-mean", "beta": 0.0}),
    Preset("cispo", "CISPO: REINFORCE weighted by the clipped, detached IS ratio (verl: high 0.2, no low)",
           {"loss_method": "cispo", "advantage": "grpo", "agg": "token-mean", "beta": 0.0}),
    Preset("ecpo", "ECPO: early-clipped old policy for negative advantages (delta 0.1)",
           {"loss_method": "ecpo", "advantage": "grpo", "agg": "seq-mean-token-mean", "beta": 0.0}),
    Preset("bapo", "BAPO: adaptive clipping bounds searched per update (paper mode)",
           {"loss_method": "bapo", "advantage": "grpo", "agg": "token-mean", "beta": 0.0}),
    Preset("cppo_xmu", "CPPO (completion pruning): GRPO advantages on the full group, keep the top half by |A|, "
                       "refill with more prompts",
           {"loss_method": "grpo", "advantage": "cppo_xmu", "agg": "seq-mean-token-mean", "beta": 0.04,
            "advantage_kwargs": {"pruning_rate": 0.5}, "max_num_gen_batches": 4}),
    Preset("seed_grpo", "SEED-GRPO: Dr.GRPO advantage scaled by 1 - alpha*SE/log G (answers clustered by "
                        "exact match; alpha 0.5 is ours)",
           {"loss_method": "grpo", "advantage": "seed_grpo", "agg": "token-mean", "beta": 0.0}),
    Preset("gvpo", "GVPO: group MSE between centred implicit rewards beta(S - S_old) and centred rewards, "
                   "beta 0.1", {"loss_method": "grpo", "advantage": "grpo", "scale_rewards": "none",
                                "beta": 0.0, "loss_kwargs": {"gvpo_beta": 0.1}},
           whole_groups=True, old_logp=True, loss=losses.gvpo_loss),
    Preset("awpo", "AWPO: outcome advantages mixed with a judge's reasoning reward (rule-based arithmetic_work) "
                   "through the variance gate; clip radius from the gate",
           {"loss_method": "ppo", "advantage": "awpo", "agg": "token-mean", "beta": 0.0}),
    Preset("dler", "DLER: truncation reward 0, group-centred + batch-normalised advantages, clip-higher 0.28, "
                   "dynamic sampling",
           {"loss_method": "ppo", "advantage": "dler", "epsilon": 0.2, "epsilon_high": 0.28,
            "agg": "token-mean", "beta": 0.0, "truncation_reward": 0.0, "dynamic_sampling": True,
            "max_num_gen_batches": 10}),
    # --- data loops (alignops/train/loops): what the model trains on changes more than the loss
    Preset("dpo", "DPO (sigmoid, beta 0.1) on pairs of a correct and an incorrect sample of the same prompt, "
                  "reference log-probs computed once; online (pairs re-sampled each iteration) or offline",
           {"learning_rate": 1e-5}, loop="preference:DPOLoop"),
    Preset("ipo", "IPO: DPO's squared loss on length-averaged log-ratios (tau = beta = 0.1)",
           {"learning_rate": 1e-5, "loop_kwargs": {"loss_type": "ipo"}}, loop="preference:DPOLoop"),
    Preset("cdpo", "cDPO: DPO with label smoothing 0.1 (conservative to noisy labels)",
           {"learning_rate": 1e-5, "loop_kwargs": {"label_smoothing": 0.1}}, loop="preference:DPOLoop"),
    Preset("robust_dpo", "robust DPO: the unbiased noisy-label loss, epsilon 0.1",
           {"learning_rate": 1e-5, "loop_kwargs": {"loss_type": "robust", "label_smoothing": 0.1}},
           loop="preference:DPOLoop"),
    Preset("orpo", "ORPO: NLL of the chosen answer + 0.1 x odds-ratio term, no reference model",
           {"learning_rate": 1e-4}, loop="preference:ORPOLoop"),
    Preset("self_rewarding", "Self-Rewarding: the policy scores its own samples 0-5 (3 judgements averaged) in a "
                             "judge format it is taught, best vs worst pairs, DPO, the reference rolled over",
           {"learning_rate": 1e-5}, loop="preference:SelfRewardingLoop"),
    Preset("raft", "RAFT: best of K samples per prompt (local or global ranking, reward threshold), SFT on them",
           {"learning_rate": 1e-4}, loop="sft:RAFTLoop"),
    Preset("dft", "DFT: SFT on the task's expert answers, each token's NLL weighted by its detached probability",
           {"learning_rate": 1e-4}, loop="sft:DFTLoop"),
    Preset("iw_sft", "iw-SFT: SFT on the policy's correct samples weighted by q/pi_ref (lagged q, clipped)",
           {"learning_rate": 1e-4}, loop="sft:IWSFTLoop"),
    Preset("chord_mu", "CHORD-mu: GRPO batches mixed with expert answers, (1 - mu) GRPO + mu SFT, mu 0.9 -> 0.05",
           {"learning_rate": 1e-4, "loop_kwargs": {"variant": "mu"}}, loop="chord:CHORDLoop"),
    Preset("chord_phi", "CHORD-phi: GRPO + 0.1 x expert SFT weighted per token by p(1 - p)",
           {"learning_rate": 1e-4, "loop_kwargs": {"variant": "phi"}}, loop="chord:CHORDLoop"),
    Preset("srl", "SRL: prompts = problem + the first k-1 expert steps; reward = difflib similarity of the "
                  "written step to the expert's (-1 malformed); GRPO with the std filter",
           {"learning_rate": 1e-4}, loop="srl:SRLLoop"),
    Preset("reflect_retry_reward", "Reflect, Retry, Reward: on a failed first attempt the model reflects and "
                                   "retries; GRPO rewards the second attempt, the loss covers the reflection only",
           {"learning_rate": 3e-5, "loop_kwargs": {"format_warmup_steps": 150}}, loop="reflect:ReflectRetryLoop"),
    Preset("training_free_grpo", "Training-free GRPO: no parameter update; an experience library in the prompt, "
                                 "updated by summarise -> semantic advantage -> ADD/UPDATE/DELETE/NONE with "
                                 "deterministic conflict resolution; critic = the policy (default), a scripted "
                                 "critic, or an OpenAI-compatible server",
           {}, loop="training_free:TrainingFreeGRPOLoop"),
    Preset("rahf", "RAHF: a preference-aware model (Dual by default, or SCIT), hidden-state differences "
                   "good - bad, a peft LoRA fitted to implant them (alpha 1)",
           {"learning_rate": 3e-4, "loop_kwargs": {"variant": "dual", "alpha": 1.0, "stage1_steps": 30}},
           group_method=False, loop="rahf:RAHFLoop"),
    # --- distillation (alignops/train/loops/distill.py)
    Preset("on_policy_distill", "On-policy distillation (GKD lambda 1): the student samples, a larger SFT teacher "
                                "(256 x 4 layers, trained to 90 % probe accuracy once, cached in runs/teacher) "
                                "scores every sampled token; per-token reverse KL(student || teacher) over the full "
                                "vocabulary from both lm_heads (fused); forward_kl / jsd (beta) selectable",
           {"learning_rate": 1e-4}, group_method=False, loop="distill:OnPolicyDistillLoop"),
]}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def make_config(method: str, overrides: dict | None = None) -> TrainConfig:
    preset = get_preset(method)
    cfg = TrainConfig(method=method)
    apply_overrides(cfg, {k: (dict(v) if isinstance(v, dict) else v) for k, v in preset.config.items()})
    overrides = dict(overrides or {})
    if "loop_kwargs" in overrides:  # merged into the preset's, so --loop_kwargs '{"mode": ...}' keeps its variant
        extra = overrides.pop("loop_kwargs")
        extra = json.loads(extra) if isinstance(extra, str) else dict(extra or {})
        if not isinstance(extra, dict):
            raise ValueError(f"--loop_kwargs must be a JSON object, got {extra!r}")
        cfg.loop_kwargs = {**cfg.loop_kwargs, **extra}
    apply_overrides(cfg, overrides)
    return cfg
