"""Preference loops: DPO / IPO / cDPO / robust DPO and ORPO on pairs built from the policy's own
samples, and Self-Rewarding (the policy judges its own samples, DPO on best vs worst).

A pair is (prompt, chosen, rejected): a correct and an incorrect sample of the same prompt
(`build_pairs`), or for Self-Rewarding the best and worst judged candidates (`best_worst_pairs`).
A pool of pairs is built from `pool_prompts` problems (cfg.num_prompts is not used); its reference
log-probs are computed once, under the policy that sampled it (offline: the base, built once;
online: rebuilt from the current policy every `iteration_steps` steps, which rolls the reference).
Each step draws `batch_pairs` pairs of the pool and takes one optimiser step of ao.dpo_loss /
ao.orpo_loss on summed sequence log-probs. docs/methods.md §2.22-2.24, docs/loops/preference.md.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import torch

import alignops as ao
from alignops.train.loops.base import DataLoop, learning_rate_of
from alignops.train.tasks import final_answer, is_well_formed

Pair = tuple[str, str, str]   # (prompt, chosen, rejected)
MODES = ("online", "offline")
LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")
MAX_SCORE = 5
JUDGES = ("policy", "verifier")


# ---- pair construction (pure)

def _groups(texts: list, group_size: int):
    if group_size < 1 or len(texts) % group_size:
        raise ValueError(f"{len(texts)} samples do not split into groups of {group_size}")
    return range(len(texts) // group_size)


def _dedupe(pairs: list[Pair]) -> list[Pair]:
    return list(dict.fromkeys(pairs))


def build_pairs(prompts: list[str], texts: list[str], rewards: list[float], group_size: int) -> list[Pair]:
    """One pair per prompt: its first correct sample (reward >= 1) against its first incorrect one
    (reward <= 0), in sample order. Rows p * group_size + k are sample k of prompts[p]. A prompt
    whose samples are all correct or all incorrect gives no pair (a tie); identical pairs (the same
    prompt drawn twice) are kept once."""
    if len(texts) != len(rewards) or len(prompts) * group_size != len(texts):
        raise ValueError(f"need len(prompts) * group_size == len(texts) == len(rewards), got "
                         f"{len(prompts)} * {group_size}, {len(texts)}, {len(rewards)}")
    pairs = []
    for p in _groups(texts, group_size):
        rows = range(p * group_size, (p + 1) * group_size)
        chosen = next((texts[i] for i in rows if rewards[i] >= 1.0), None)
        rejected = next((texts[i] for i in rows if rewards[i] <= 0.0), None)
        if chosen is not None and rejected is not None:
            pairs.append((prompts[p], chosen, rejected))
    return _dedupe(pairs)


def best_worst_pairs(prompts: list[str], texts: list[str], scores: list[float | None],
                     group_size: int) -> list[Pair]:
    """Self-Rewarding's pairs: per prompt, the candidate with the highest average judge score
    against the one with the lowest (the first of equals, in sample order). A candidate with no
    parsable judgement (score None) is dropped, and repeats of a text are one candidate (its first
    parsable score counts); a prompt with fewer than two scored candidates, or whose best and worst scores are equal, gives
    no pair."""
    if len(texts) != len(scores) or len(prompts) * group_size != len(texts):
        raise ValueError(f"need len(prompts) * group_size == len(texts) == len(scores), got "
                         f"{len(prompts)} * {group_size}, {len(texts)}, {len(scores)}")
    pairs = []
    for p in _groups(texts, group_size):
        scored = {}
        for i in range(p * group_size, (p + 1) * group_size):
            if scores[i] is not None and texts[i] not in scored:
                scored[texts[i]] = scores[i]
        if len(scored) < 2:
            continue
        best = max(scored, key=scored.get)   # max/min return the first of equals
        worst = min(scored, key=scored.get)
        if scored[best] > scored[worst]:
            pairs.append((prompts[p], best, worst))
    return _dedupe(pairs)


# ---- the judge

def judge_prompt(prompt: str, completion: str) -> str:
    """The judging format, in the task's own alphabet: '*' + prompt + completion + '=' -> a digit 0-5."""
    return f"*{prompt}{completion}="


def parse_score(text: str) -> int | None:
    """The judgement's score: its first character when that is a digit 0-5, else None (unparsable)."""
    return int(text[0]) if text[:1].isdigit() and int(text[0]) <= MAX_SCORE else None


def average_scores(judgements: list[int | None], n: int) -> list[float | None]:
    """Mean of each candidate's n consecutive parsable judgements (None when none parsed)."""
    out = []
    for i in range(0, len(judgements), n):
        parsed = [s for s in judgements[i:i + n] if s is not None]
        out.append(sum(parsed) / len(parsed) if parsed else None)
    return out


def judge_target(task, problem, completion: str) -> int:
    """The score the judge warm-up teaches, from the task's verifier: 5 correct, 0 malformed,
    otherwise 3 / 2 / 1 as the numeric answer is off by <= 2 / <= 10 / more."""
    if task.reward(problem, completion) >= 1.0:
        return MAX_SCORE
    if not is_well_formed(completion):
        return 0
    try:
        off = abs(int(final_answer(completion)) - int(problem.answer))
    except ValueError:
        return 1
    return 3 if off <= 2 else 2 if off <= 10 else 1


class Judge(typing.Protocol):
    """Scores completions 0-5: a list of average scores (None where no judgement parsed). A real
    LLM judge plugs in here (e.g. over alignops.train.loops.llm's chat client)."""

    def score(self, prompts: list[str], completions: list[str]) -> list[float | None]: ...


class PolicyJudge:
    """The policy as its own judge: n_judgements sampled one-token judgements of judge_prompt(...)
    per candidate, averaged (temperature 0: greedy)."""

    def __init__(self, run, n_judgements: int = 3, temperature: float = 0.7, top_p: float = 0.9):
        self.run, self.n, self.temperature, self.top_p = run, n_judgements, temperature, top_p

    def score(self, prompts: list[str], completions: list[str]) -> list[float | None]:
        if not prompts:
            return []
        n = self.n if self.temperature > 0 else 1
        _, texts = self.run.sample([judge_prompt(p, c) for p, c in zip(prompts, completions)], n,
                                   temperature=self.temperature, top_p=self.top_p, max_new_tokens=1)
        return average_scores([parse_score(t) for t in texts], n)


class VerifierJudge:
    """An oracle judge: judge_target from the task's verifier (what the warm-up teaches the policy
    judge), for comparing the loop with a perfect judge. Knows the task's train and held-out problems."""

    def __init__(self, task):
        self.task = task
        self.problems = {p.prompt: p for p in list(task.train) + list(task.heldout)}

    def score(self, prompts: list[str], completions: list[str]) -> list[float | None]:
        return [float(judge_target(self.task, self.problems[p], c)) for p, c in zip(prompts, completions)]


# ---- pools

@dataclasses.dataclass
class Pool:
    pairs: list[Pair]
    built_at: int                               # the step whose policy sampled it (and is its reference)
    sample_reward: float                        # mean verifier reward of the samples it came from
    ref_chosen: torch.Tensor | None = None      # [N] summed reference log-probs (None: reference-free)
    ref_rejected: torch.Tensor | None = None

    def state(self) -> dict:
        return {"pairs": [list(p) for p in self.pairs], "built_at": self.built_at,
                "sample_reward": self.sample_reward}

    def tensors(self) -> dict:
        if self.ref_chosen is None or not self.pairs:
            return {}
        return {"chosen": self.ref_chosen.contiguous(), "rejected": self.ref_rejected.contiguous()}

    @classmethod
    def restore(cls, state: dict, tensors: dict | None) -> "Pool":
        tensors = tensors or {}
        return cls([tuple(p) for p in state["pairs"]], state["built_at"], state["sample_reward"],
                   tensors.get("chosen"), tensors.get("rejected"))


def pair_logprobs(run, pairs: list[Pair], model=None):
    """Summed completion log-probs of chosen and rejected (with autograd when enabled) and their
    token lengths (EOS included), from one teacher-forced batch."""
    prompts = [p for p, _, _ in pairs]
    batch = run.teacher_batch(prompts + prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs])
    logp, lengths, n = run.token_logprobs(batch, model).sum(-1), batch.lengths, len(pairs)
    return logp[:n], logp[n:], lengths[:n], lengths[n:]


def sample_and_reward(run, problems, n: int, **sampling) -> tuple[list[str], list[float]]:
    """n samples per problem (rows consecutive) and their verifier rewards."""
    _, texts = run.sample([p.prompt for p in problems], n, **sampling)
    return texts, [run.task.reward(p, t) for p, t in zip((p for p in problems for _ in range(n)), texts)]


def skipped(pool: Pool) -> dict:
    return {"reward": pool.sample_reward, "loss": 0.0, "grad_norm": 0.0, "pairs": 0.0, "skipped_update": 1.0}


# ---- options

@dataclasses.dataclass
class PreferenceOptions:
    mode: str = "online"                    # online: rebuild the pool (and the reference) every iteration_steps
    iteration_steps: int = 20               # steps per pool in online mode
    pool_prompts: int = 256                 # problems sampled to build a pool
    samples_per_prompt: int | None = None   # None: cfg.num_generations
    batch_pairs: int = 32                   # pairs per optimiser step
    beta: float = 0.1                       # §2.22 / §2.23 (TRL, OpenRLHF)
    eval_prompts: int = 64                  # held-out problems whose pairs evaluate() scores (0: off)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("iteration_steps", "pool_prompts", "batch_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt is not None and self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 (a pair needs two samples), got "
                             f"{self.samples_per_prompt}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be finite and > 0, got {self.beta}")
        if self.eval_prompts < 0:
            raise ValueError(f"eval_prompts must be >= 0, got {self.eval_prompts}")


@dataclasses.dataclass
class DPOOptions(PreferenceOptions):
    loss_type: str = "sigmoid"     # sigmoid (DPO, cDPO with label_smoothing), ipo, robust, hinge
    label_smoothing: float = 0.0   # cDPO / robust DPO's epsilon
    ipo_length_norm: bool = True   # IPO on length-averaged log-ratios (TRL; §2.22)
    rpo_alpha: float = 0.0         # + rpo_alpha x token-mean NLL of the chosen answers (RPO; TRL's rpo_alpha)

    def __post_init__(self):
        super().__post_init__()
        check_dpo(self)


def check_dpo(opts) -> None:
    if opts.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {opts.loss_type!r}")
    eps = opts.label_smoothing
    if opts.loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5] for loss_type 'sigmoid', got {eps}")
    if opts.loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type 'robust', got {eps}")
    if opts.loss_type in ("ipo", "hinge") and eps != 0.0:
        raise ValueError(f"label_smoothing is not defined for loss_type {opts.loss_type!r}, got {eps}")
    if not (math.isfinite(opts.rpo_alpha) and opts.rpo_alpha >= 0):
        raise ValueError(f"rpo_alpha must be finite and >= 0, got {opts.rpo_alpha}")


# ---- loops

class DPOLoop(DataLoop):
    """DPO family on correct-vs-incorrect pairs of the policy's own samples (§2.22)."""

    Options = DPOOptions
    uses_reference = True

    def __init__(self, run, options):
        super().__init__(run, options)
        self.pool: Pool | None = None
        self.pools_built = 0
        # fixed held-out pairs, sampled once by the base; their reference is the base for the whole run,
        # so eval/pref_accuracy and eval/reward_margin measure the movement since the start
        self.eval_pool = self.build_eval_pool() if options.eval_prompts else None

    @property
    def group_size(self) -> int:
        return self.opts.samples_per_prompt or self.run.cfg.num_generations

    def online(self) -> bool:
        return self.opts.mode == "online"

    def with_reference(self, pool: Pool) -> Pool:
        if self.uses_reference and pool.pairs:
            pool.ref_chosen, pool.ref_rejected, _, _ = (x.detach().float() for x in
                                                         _no_grad(pair_logprobs, self.run, pool.pairs))
        return pool

    def build_eval_pool(self) -> Pool:
        problems = self.run.task.heldout[:self.opts.eval_prompts]
        texts, rewards = sample_and_reward(self.run, problems, self.group_size)
        pairs = build_pairs([p.prompt for p in problems], texts, rewards, self.group_size)
        return self.with_reference(Pool(pairs, 0, sum(rewards) / len(rewards)))

    def build_pool(self, step: int) -> tuple[Pool, dict]:
        """A fresh pool from the current policy, and its metrics."""
        run = self.run
        problems = run.task.sample(run.rng, self.opts.pool_prompts)
        texts, rewards = sample_and_reward(run, problems, self.group_size)
        pairs = build_pairs([p.prompt for p in problems], texts, rewards, self.group_size)
        return self.with_reference(Pool(pairs, step, sum(rewards) / len(rewards))), {}

    def pool_due(self, step: int) -> bool:
        return (self.pool is None or not self.pool.pairs
                or (self.online() and step - self.pool.built_at >= self.opts.iteration_steps))

    def pair_loss(self, pool: Pool, rows: list[int]):
        """The method's loss (a PreferenceOutput) on the pool's pairs `rows`, under the policy."""
        opts = self.opts
        pc, pr, lc, lr = pair_logprobs(self.run, [pool.pairs[i] for i in rows])
        out = ao.dpo_loss(pc, pr, pool.ref_chosen[rows], pool.ref_rejected[rows], beta=opts.beta,
                          loss_type=opts.loss_type, label_smoothing=opts.label_smoothing,
                          chosen_lengths=lc, rejected_lengths=lr, ipo_length_norm=opts.ipo_length_norm)
        if opts.rpo_alpha:
            nll = -pc.sum() / lc.sum()
            out.metrics["nll_loss"] = nll.detach()
            out = dataclasses.replace(out, loss=out.loss + opts.rpo_alpha * nll)
        return out

    def step(self, step: int) -> dict:
        run, built = self.run, {}
        if self.pool_due(step):
            self.pool, built = self.build_pool(step)
            self.pools_built += 1
        pool = self.pool
        meta = {"pool/pairs": float(len(pool.pairs)), "pool/age": float(step - pool.built_at),
                "pool/iteration": float(self.pools_built), **built}
        if not pool.pairs:
            return {**skipped(pool), **meta}
        rows = sorted(run.rng.sample(range(len(pool.pairs)), min(self.opts.batch_pairs, len(pool.pairs))))
        out = self.pair_loss(pool, rows)
        return {"reward": pool.sample_reward, **run.optimizer_step(out.loss, step),
                **{k: float(v) for k, v in out.metrics.items()}, "pairs": float(len(rows)),
                "skipped_update": 0.0, **meta}

    def evaluate(self) -> dict:
        row = self.run.evaluate()
        pool = self.eval_pool
        if pool is not None:
            row["eval/pairs"] = float(len(pool.pairs))
            if pool.pairs:
                with torch.no_grad():
                    out = self.pair_loss(pool, list(range(len(pool.pairs))))
                row.update({"eval/pref_accuracy": float(out.metrics["rewards/accuracies"]),
                            "eval/reward_margin": float(out.metrics["rewards/margins"]),
                            "eval/pref_loss": float(out.loss)})
        return row

    def state_dict(self) -> dict:
        return {"pools_built": self.pools_built, "pool": self.pool.state() if self.pool else None,
                "eval_pool": self.eval_pool.state() if self.eval_pool else None}

    def tensors(self) -> dict:
        out = {"pool_ref": self.pool.tensors() if self.pool else {},
               "eval_ref": self.eval_pool.tensors() if self.eval_pool else {}}
        return {k: v for k, v in out.items() if v}

    def load_state_dict(self, state: dict, tensors: dict) -> None:
        self.pools_built = state["pools_built"]
        self.pool = Pool.restore(state["pool"], tensors.get("pool_ref")) if state["pool"] else None
        self.eval_pool = Pool.restore(state["eval_pool"], tensors.get("eval_ref")) if state["eval_pool"] else None


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


@dataclasses.dataclass
class ORPOOptions(PreferenceOptions):
    pass   # beta is ORPO's lambda (TRL's beta), 0.1 (§2.23)


class ORPOLoop(DPOLoop):
    """ORPO (§2.23): NLL of the chosen response + beta x the odds-ratio term; no reference model
    (the pools carry no reference log-probs)."""

    Options = ORPOOptions
    uses_reference = False

    def pair_loss(self, pool: Pool, rows: list[int]):
        pc, pr, lc, lr = pair_logprobs(self.run, [pool.pairs[i] for i in rows])
        return ao.orpo_loss(pc, pr, lc, lr, beta=self.opts.beta)


@dataclasses.dataclass
class SelfRewardingOptions:
    iteration_steps: int = 20             # DPO steps per iteration M_t -> M_t+1 (the reference rolls over)
    pool_prompts: int = 256               # prompts per iteration
    candidates: int = 4                   # N (§2.24)
    candidate_temperature: float = 0.7    # §2.24
    top_p: float = 0.9                    # §2.24 (candidates and judgements)
    n_judgements: int = 3                 # sampled judgements averaged per candidate (§2.24)
    judge_temperature: float = 0.7        # ours: the paper does not give the judgement's temperature
    batch_pairs: int = 32
    beta: float = 0.1                     # §2.24 (reported)
    rpo_alpha: float = 0.0                # + rpo_alpha x NLL of the chosen answers (iterative RPO; 0: the paper's DPO)
    judge_warmup_steps: int = 60          # first steps: SFT on the judging format, labelled by the verifier
    judge_warmup_batch: int = 64          # judged samples per warm-up step
    judge_warmup_learning_rate: float | None = 1e-3   # the base's SFT rate (None: the run's)
    eval_prompts: int = 64
    judge: str = "policy"                 # policy: the model judges itself; verifier: VerifierJudge (an oracle)
    # DPO's fixed settings, read by DPOLoop.pair_loss
    loss_type: typing.ClassVar[str] = "sigmoid"
    label_smoothing: typing.ClassVar[float] = 0.0
    ipo_length_norm: typing.ClassVar[bool] = True
    mode: typing.ClassVar[str] = "online"
    samples_per_prompt: typing.ClassVar[None] = None

    def __post_init__(self):
        for name in ("iteration_steps", "pool_prompts", "n_judgements", "batch_pairs", "judge_warmup_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.candidates < 2:
            raise ValueError(f"candidates must be >= 2 (a pair needs two), got {self.candidates}")
        if self.candidate_temperature <= 0:
            raise ValueError(f"candidate_temperature must be > 0 (greedy candidates are all equal), got "
                             f"{self.candidate_temperature}")
        if self.judge_temperature < 0:
            raise ValueError(f"judge_temperature must be >= 0, got {self.judge_temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be finite and > 0, got {self.beta}")
        check_dpo(self)   # rpo_alpha; the other DPO settings are fixed class values
        if self.judge_warmup_steps < 0 or self.eval_prompts < 0:
            raise ValueError(f"judge_warmup_steps and eval_prompts must be >= 0, got "
                             f"{self.judge_warmup_steps}, {self.eval_prompts}")
        if self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {JUDGES}, got {self.judge!r}")
        if self.judge_warmup_learning_rate is not None and self.judge_warmup_learning_rate <= 0:
            raise ValueError(f"judge_warmup_learning_rate must be > 0 or None, got {self.judge_warmup_learning_rate}")


class SelfRewardingLoop(DPOLoop):
    """Self-Rewarding (§2.24): a judge warm-up, then iterations of N candidates per prompt judged
    0-5 by the policy itself (n_judgements averaged), best-vs-worst pairs, DPO with the reference
    = the model at the iteration's start. `judge` is any Judge (default: PolicyJudge)."""

    Options = SelfRewardingOptions

    def __init__(self, run, options, judge: Judge | None = None):
        missing = sorted(set("*=012345") - set(run.tok.alphabet))
        if missing:
            raise ValueError(f"self_rewarding's judge format needs the characters {missing}, which the task's "
                             f"alphabet {run.tok.alphabet!r} lacks")
        super().__init__(run, options)
        self.judge = judge or (VerifierJudge(run.task) if options.judge == "verifier" else
                               PolicyJudge(run, options.n_judgements, options.judge_temperature, options.top_p))

    @property
    def group_size(self) -> int:
        return self.opts.candidates

    def build_eval_pool(self) -> Pool:
        pool = super().build_eval_pool()
        # held-out judging examples: the eval samples with the verifier's verdict
        problems = self.run.task.heldout[:self.opts.eval_prompts]
        self.judge_eval = []
        for temperature in (0.0, self.run.cfg.temperature):   # greedy answers are correct more often
            texts, rewards = sample_and_reward(self.run, problems, 1, temperature=temperature)
            self.judge_eval += [(p.prompt, t, r >= 1.0) for p, t, r in zip(problems, texts, rewards)]
        return pool

    def build_pool(self, step: int) -> tuple[Pool, dict]:
        run, opts, K = self.run, self.opts, self.opts.candidates
        problems = run.task.sample(run.rng, opts.pool_prompts)
        texts, rewards = sample_and_reward(run, problems, K, temperature=opts.candidate_temperature, top_p=opts.top_p)
        prompts = [p.prompt for p in problems for _ in range(K)]
        scores = self.judge.score(prompts, texts)
        pairs = best_worst_pairs([p.prompt for p in problems], texts, scores, K)
        verdict = {(pr, t): r for pr, t, r in zip(prompts, texts, rewards)}
        parsed = [s for s in scores if s is not None]
        metrics = {"judge/parsable": len(parsed) / len(scores), "judge/mean_score": sum(parsed) / max(1, len(parsed)),
                   "pairs/chosen_correct": sum(verdict[(p, c)] for p, c, _ in pairs) / max(1, len(pairs)),
                   "pairs/rejected_correct": sum(verdict[(p, r)] for p, _, r in pairs) / max(1, len(pairs))}
        return self.with_reference(Pool(pairs, step, sum(rewards) / len(rewards))), metrics

    def warmup_step(self, step: int) -> dict:
        """One SFT step on the paper's seed mix: evaluation examples (each problem's greedy answer and
        one sample, with the verifier's target score) and instruction examples (the expert answers the
        base was trained on). Without the latter the one-digit judge targets overwrite the answering:
        held-out accuracy fell from 31 % to 0.1 % within 20 steps, also when the policy's own greedy
        answers were replayed instead."""
        run, opts = self.run, self.opts
        problems = run.task.sample(run.rng, opts.judge_warmup_batch)
        greedy, greedy_rewards = sample_and_reward(run, problems, 1, temperature=0.0)
        sampled, sampled_rewards = sample_and_reward(run, problems, 1)
        judged = [(p, t) for p, t in zip(problems, greedy)] + [(p, t) for p, t in zip(problems, sampled)]
        prompts = [judge_prompt(p.prompt, t) for p, t in judged] + [p.prompt for p in problems]
        with_steps = run.task.with_steps()
        targets = ([str(judge_target(run.task, p, t)) for p, t in judged]
                   + [p.expert_completion(with_steps) for p in problems])
        batch = run.teacher_batch(prompts, targets)
        with learning_rate_of(run, opts.judge_warmup_learning_rate):
            update = run.sft_step(batch, step)
        positives = sum(t == str(MAX_SCORE) for t in targets[:len(judged)])
        return {"reward": sum(sampled_rewards) / len(sampled_rewards), **update, "judge/warmup": 1.0,
                "judge/warmup_positive_share": positives / len(judged),
                "judge/warmup_greedy_reward": sum(greedy_rewards) / len(greedy_rewards)}

    def step(self, step: int) -> dict:
        if step < self.opts.judge_warmup_steps:
            return self.warmup_step(step)
        return {**super().step(step), "judge/warmup": 0.0}

    def evaluate(self) -> dict:
        row = super().evaluate()
        if self.opts.eval_prompts:
            greedy = PolicyJudge(self.run, 1, temperature=0.0)   # deterministic: draws no sampling seeds
            scores = greedy.score([p for p, _, _ in self.judge_eval], [t for _, t, _ in self.judge_eval])
            # judged correct = average score 5 (rounded); unparsable counts as a disagreement
            verdicts = [s is not None and s >= MAX_SCORE - 0.5 for s in scores]
            truth = [correct for _, _, correct in self.judge_eval]
            agree = [s is not None and v == t for s, v, t in zip(scores, verdicts, truth)]
            row["eval/judge_accuracy"] = sum(agree) / len(agree)
            # the mean of the accuracies on correct and on incorrect samples: 0.5 for a judge that
            # always says the same, whatever the share of correct samples
            rates = [sum(a for a, t in zip(agree, truth) if t == side) / n
                     for side in (True, False) if (n := sum(t == side for t in truth))]
            row["eval/judge_balanced_accuracy"] = sum(rates) / len(rates)
            row["eval/judge_parsable"] = sum(s is not None for s in scores) / len(scores)
        return row

    def state_dict(self) -> dict:
        return {**super().state_dict(), "judge_eval": [list(x) for x in getattr(self, "judge_eval", [])]}

    def load_state_dict(self, state: dict, tensors: dict) -> None:
        super().load_state_dict(state, tensors)
        self.judge_eval = [tuple(x) for x in state["judge_eval"]]
