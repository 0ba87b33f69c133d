"""Rollouts: sampling with a KV cache (recording the behaviour log-probs of every sampled token),
the step's groups scored by the reward functions (with dynamic sampling and overlong shaping), and
the per-token quantities of a rollout batch under each model (policy, reference, critic)."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import struct

import torch

import alignops as ao


def _cache_name(model) -> str:
    """transformers >= 5.2x renamed `past_key_values` to `cache` (the GPU machine has an older one)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclasses.dataclass
class Batch:
    """Prompts left-padded to P, completions right-padded to T: sequence = [prompt | completion]."""

    input_ids: torch.Tensor        # [B, P + T]
    attention_mask: torch.Tensor   # [B, P + T], 0 on padding
    prompt_len: int                # P
    completion_ids: torch.Tensor   # [B, T]
    completion_mask: torch.Tensor  # [B, T] float, 1 up to and including EOS
    behaviour_logp: torch.Tensor   # [B, T] float32, log-prob under the sampling distribution
    truncated: torch.Tensor        # [B] bool: no EOS within max_completion_length

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def select(self, rows) -> "Batch":
        return Batch(self.input_ids[rows], self.attention_mask[rows], self.prompt_len,
                     self.completion_ids[rows], self.completion_mask[rows], self.behaviour_logp[rows],
                     self.truncated[rows])


def left_pad(prompts: list[list[int]], pad_id: int, device,
             length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to `length` (default: the longest prompt)."""
    P = max(len(p) for p in prompts) if length is None else length
    if any(len(p) > P for p in prompts):
        raise ValueError(f"prompt_len={P} is shorter than the longest prompt ({max(len(p) for p in prompts)} tokens)")
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), P), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, device=device)
        mask[i, P - len(p):] = 1
    return ids, mask


class GroupSeeds:
    """One sampling generator per group: the groups of the k-th generation round of a run draw
    from generators seeded by (seed, k, global group index), so a group's completions depend
    neither on the rank that samples it nor on the other groups of its batch, and one process
    samples exactly what N ranks sample between them. `rounds` is saved in checkpoints."""

    def __init__(self, seed: int, device="cpu", rounds: int = 0):
        self.seed, self.device, self.rounds = seed, device, rounds

    def next_round(self, groups: range) -> list[torch.Generator]:
        k, self.rounds = self.rounds, self.rounds + 1
        return [torch.Generator(device=self.device).manual_seed(self.group_seed(k, g)) for g in groups]

    def group_seed(self, round_index: int, group: int) -> int:
        digest = hashlib.blake2b(struct.pack("<3q", self.seed, round_index, group), digest_size=8).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)


def _multinomial(probs: torch.Tensor, generator) -> torch.Tensor:
    """One draw per row; `generator` is one torch.Generator for all rows, or a list of them, one
    per equal block of consecutive rows (a group each)."""
    if not isinstance(generator, (list, tuple)):
        return torch.multinomial(probs, 1, generator=generator)
    if probs.shape[0] % len(generator):
        raise ValueError(f"{probs.shape[0]} rows do not split into {len(generator)} equal groups of generators")
    blocks = probs.split(probs.shape[0] // len(generator))
    return torch.cat([torch.multinomial(b, 1, generator=g) for b, g in zip(blocks, generator)])


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        choice = _multinomial(sorted_p, generator)
        return order.gather(-1, choice).squeeze(-1)
    return _multinomial(probs, generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_p: float = 1.0, generator=None, prompt_len: int | None = None) -> Batch:
    """Samples one completion per prompt. temperature=0 decodes greedily. The recorded log-probs
    are those of softmax(logits / temperature) (the distribution that was sampled; log-softmax
    of the raw logits for greedy decoding), the old policy of the first update. `generator`: one
    torch.Generator, or one per equal block of consecutive prompts (GroupSeeds.next_round);
    `prompt_len`: pad the prompts to this length (the global batch's, so every rank's forward
    sees the same shapes per row)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, attn = left_pad(prompts, pad_id, device, prompt_len)
    B, P = ids.shape
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    cache_kw = _cache_name(model)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    past, logits = out[cache_kw], out.logits[:, -1].float()
    tokens, logps = [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = pos[:, -1] + 1
    for _ in range(max_new_tokens):
        tok = _sample(logits, temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        lp = torch.log_softmax(logits / (temperature or 1.0), -1).gather(-1, tok[:, None]).squeeze(-1)
        tokens.append(tok)
        logps.append(torch.where(done, torch.zeros_like(lp), lp))
        was_done, done = done, done | (tok == eos_id)
        if bool(done.all()):
            break
        attn = torch.cat([attn, (~was_done).long()[:, None]], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                    use_cache=True, **{cache_kw: past})
        past, logits = out[cache_kw], out.logits[:, -1].float()
        next_pos = next_pos + 1
    model.train(was_training)
    completion = torch.stack(tokens, 1)
    is_eos = completion == eos_id
    # 1 up to and including the first EOS (everything sampled when there is none).
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    cmask = (~after_eos).float()
    truncated = ~is_eos.any(-1)
    full_ids = torch.cat([ids, torch.where(after_eos, torch.full_like(completion, pad_id), completion)], 1)
    full_attn = torch.cat([left_pad(prompts, pad_id, device, P)[1], cmask.long()], 1)
    return Batch(full_ids, full_attn, P, completion.masked_fill(after_eos, pad_id), cmask,
                 torch.stack(logps, 1) * cmask, truncated)


def concat_batches(batches: list[Batch], pad_id: int) -> Batch:
    """Stacks batches from several generate() calls (dynamic sampling): prompts re-left-padded
    to the longest prompt, completions right-padded to the longest completion."""
    if len(batches) == 1:
        return batches[0]
    P = max(b.prompt_len for b in batches)
    T = max(b.completion_ids.shape[1] for b in batches)

    def pad(x, left, right, value):
        return torch.nn.functional.pad(x, (left, right), value=value)

    parts = []
    for b in batches:
        lp, rp = P - b.prompt_len, T - b.completion_ids.shape[1]
        prompt_ids, completion_ids = b.input_ids[:, :b.prompt_len], b.input_ids[:, b.prompt_len:]
        prompt_attn, completion_attn = b.attention_mask[:, :b.prompt_len], b.attention_mask[:, b.prompt_len:]
        parts.append(Batch(torch.cat([pad(prompt_ids, lp, 0, pad_id), pad(completion_ids, 0, rp, pad_id)], 1),
                           torch.cat([pad(prompt_attn, lp, 0, 0), pad(completion_attn, 0, rp, 0)], 1),
                           P, pad(b.completion_ids, 0, rp, pad_id), pad(b.completion_mask, 0, rp, 0.0),
                           pad(b.behaviour_logp, 0, rp, 0.0), b.truncated))
    cat = lambda name: torch.cat([getattr(b, name) for b in parts])  # noqa: E731
    return Batch(cat("input_ids"), cat("attention_mask"), P, cat("completion_ids"), cat("completion_mask"),
                 cat("behaviour_logp"), cat("truncated"))


# --------------------------------------------------------------------------------------------
# one step's rollout: sampled groups and their rewards


@dataclasses.dataclass
class Rollout:
    """One step's sampled groups: each prompt repeated num_generations times, consecutively."""

    problems: list
    batch: Batch
    texts: list[str]
    rewards: torch.Tensor   # [B] the reward functions' total (metrics, group filtering)
    correct: torch.Tensor   # [B] bool: the task's verifier accepts the completion
    metrics: dict = dataclasses.field(default_factory=dict)
    scores: torch.Tensor | None = None  # [B] what the advantages see: rewards + overlong shaping

    def select(self, rows: torch.Tensor) -> "Rollout":
        idx = rows.tolist()
        return Rollout([self.problems[i] for i in idx], self.batch.select(rows), [self.texts[i] for i in idx],
                       self.rewards[rows], self.correct[rows], dict(self.metrics),
                       None if self.scores is None else self.scores[rows])


def score_completions(cfg, task, reward_model, problems, texts, truncated: torch.Tensor):
    """(rewards [B], correct [B] bool, metrics): the reward functions' weighted total, with the
    truncation reward where set; `correct` is the task verifier's verdict (reused from the
    `accuracy` reward function when it is one of them, so the verifier runs once)."""
    per_function = reward_model.score(task, problems, texts)
    totals, metrics = reward_model.combine(per_function)
    verdicts = per_function.get("accuracy") or [task.reward(p, t) for p, t in zip(problems, texts)]
    rewards = torch.tensor(totals, dtype=torch.float32, device=truncated.device)
    if cfg.truncation_reward is not None:
        rewards = torch.where(truncated, torch.full_like(rewards, cfg.truncation_reward), rewards)
    return rewards, torch.tensor([v > 0 for v in verdicts], device=truncated.device), metrics


def sample_groups(cfg, task, tok, policy, reward_model, rng, generator, groups: range | None = None) -> Rollout:
    """One generation round: num_prompts problems drawn from `rng` (every rank draws the same
    global list), of which this process samples the groups `groups` (all by default), each
    prompt num_generations times. `generator`: a GroupSeeds (a generator per group) or one
    torch.Generator for the whole batch."""
    problems = task.sample(rng, cfg.num_prompts)
    groups = range(cfg.num_prompts) if groups is None else groups
    encoded = [tok.encode(p.prompt, bos=True) for p in problems]
    if isinstance(generator, GroupSeeds):
        generator = generator.next_round(groups)
    group = [problems[g] for g in groups for _ in range(cfg.num_generations)]
    batch = generate(policy, [encoded[g] for g in groups for _ in range(cfg.num_generations)],
                     max_new_tokens=cfg.max_completion_length, eos_id=tok.eos_token_id,
                     pad_id=tok.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p,
                     generator=generator, prompt_len=max(len(e) for e in encoded))
    texts = [tok.decode(ids) for ids in batch.completion_ids]
    rewards, correct, metrics = score_completions(cfg, task, reward_model, group, texts, batch.truncated)
    return Rollout(group, batch, texts, rewards, correct, metrics)


def _cat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    return Rollout([p for r in parts for p in r.problems], concat_batches([r.batch for r in parts], pad_id),
                   [t for r in parts for t in r.texts], torch.cat([r.rewards for r in parts]),
                   torch.cat([r.correct for r in parts]), dict(parts[0].metrics))


def collect_rollouts(cfg, task, tok, policy, reward_model, rng, generator, groups: range | None = None) -> Rollout:
    """One generation round (of the groups `groups`, all by default: sample_groups); or, with
    dynamic sampling (DAPO, DLER), rounds until num_prompts groups whose rewards differ are
    collected (exactly num_prompts kept); or, with threshold resampling (GPG's beta_th), rounds
    until that share of the batch is such groups, the rest filled with the others. Overlong shaping
    is added to the scores after filtering (filters judge rewards). The filters see the whole
    batch, so they need all the groups in this process."""
    G = cfg.num_generations
    filtering = cfg.dynamic_sampling or cfg.min_valid_group_fraction > 0
    if filtering and groups is not None and len(groups) != cfg.num_prompts:
        raise ValueError("dynamic sampling and threshold resampling choose groups from the whole batch; "
                         "they cannot run on a share of the groups")
    parts = [sample_groups(cfg, task, tok, policy, reward_model, rng, generator, groups)]
    if filtering:
        need = cfg.num_prompts if cfg.dynamic_sampling else math.ceil(cfg.min_valid_group_fraction * cfg.num_prompts)
        valid, invalid = [], []
        while True:
            r = parts[-1].rewards.view(-1, G)
            varied = (r.max(-1).values > r.min(-1).values).tolist()
            base = (len(parts) - 1) * cfg.num_prompts
            for g, ok in enumerate(varied):
                (valid if ok else invalid).append(base + g)
            if len(valid) >= need:
                break
            if 0 < cfg.max_num_gen_batches <= len(parts):
                if cfg.dynamic_sampling:
                    raise RuntimeError(
                        f"dynamic sampling found {len(valid)} of {cfg.num_prompts} groups with differing rewards "
                        f"in {len(parts)} generation rounds (max_num_gen_batches): the policy solves every "
                        "prompt or none; raise max_num_gen_batches or turn dynamic_sampling off")
                break
            parts.append(sample_groups(cfg, task, tok, policy, reward_model, rng, generator))
        keep = valid[:cfg.num_prompts]
        if not cfg.dynamic_sampling:
            keep += invalid[:cfg.num_prompts - len(keep)]
        rows = torch.tensor([g * G + j for g in keep for j in range(G)])
        generated = len(parts) * cfg.num_prompts
        rollout = _cat_rollouts(parts, tok.pad_token_id).select(rows.to(parts[0].rewards.device))
        rollout.metrics.update({"sampling/gen_rounds": len(parts),
                                "sampling/filtered_groups_frac": 1 - len(valid) / generated})
    else:
        rollout = parts[0]
    rollout.scores = rollout.rewards
    if cfg.overlong_buffer_len > 0:
        rollout.scores = rollout.rewards + ao.dapo_overlong_penalty(
            rollout.batch.lengths, cfg.max_completion_length, cfg.overlong_buffer_len,
            cfg.overlong_penalty_factor).to(rollout.rewards.device)
    return rollout


# --------------------------------------------------------------------------------------------
# per-token quantities of a rollout batch under each model


def sequence_logits(model, batch: Batch) -> torch.Tensor:
    """Logits that predict the completion tokens: [B, T, V], a strided view (no copy)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids(), use_cache=False)
    return out.logits[:, batch.prompt_len - 1:-1]


@dataclasses.dataclass(frozen=True)
class HeadOutput:
    """What predicts a batch's completion tokens: the logits [B, T, V] (fused_lm_head=False), or
    the decoder's last hidden states [B, T, H] with the lm_head (weight [V, H], bias, the logit
    transform its forward applies), from which alignops.fused_linear_* compute the same log-probs
    and losses without the [B * T, V] logits. The losses read either through the two methods."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    softcap: float | None = None
    logit_scale: float | None = None

    def token_logprobs(self, labels, *, temperature: float, backend=None, compute_entropy: bool = False):
        """ao.token_logprobs of the logits: logp [B, T] (and the entropy), with autograd."""
        if self.logits is not None:
            return ao.token_logprobs(self.logits, labels, temperature=temperature, compute_entropy=compute_entropy,
                                     backend=backend)
        return ao.fused_linear_token_logprobs(self.hidden, self.weight, labels, self.bias, temperature=temperature,
                                              compute_entropy=compute_entropy, softcap=self.softcap,
                                              logit_scale=self.logit_scale, backend=backend)

    def policy_loss(self, labels, old_logp, advantages, mask, *, terminal: bool = False,
                    **kwargs) -> ao.PolicyLossOutput:
        """ao.fused_policy_loss of the logits (every keyword is its). terminal=True: the loss is only
        backpropagated (its caller's loss.backward()), so the hidden-states path takes its
        gradients during forward (grad_in_forward: one GEMM fewer for token-local methods, the
        same values); the logits path is unchanged."""
        if self.logits is not None:
            return ao.fused_policy_loss(self.logits, labels, old_logp, advantages, mask, **kwargs)
        return ao.fused_linear_policy_loss(self.hidden, self.weight, labels, old_logp, advantages, mask,
                                           bias=self.bias, softcap=self.softcap, logit_scale=self.logit_scale,
                                           grad_in_forward=terminal, **kwargs)


def lm_head(model) -> dict:
    """The output layer as HeadOutput's fields: weight and bias of the model's nn.Linear head (the
    embedding's own parameter when tied, so its gradient accumulates there), and the logit
    transform of the HF forward: Gemma-2/3's final soft-capping, Cohere's logit_scale, Granite's
    1 / logits_scaling. A head of any other form needs fused_lm_head=False."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"fused_lm_head needs an nn.Linear output layer, got {type(head).__name__}; "
                         "pass --fused_lm_head false")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(config, "logit_scale", None)
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
        scale = (1.0 if scale is None else scale) / config.logits_scaling
    return {"weight": head.weight, "bias": head.bias, "softcap": getattr(config, "final_logit_softcapping", None),
            "logit_scale": scale}


def sequence_head(model, batch: Batch, fused_lm_head: bool) -> HeadOutput:
    """The HeadOutput of the completion positions: sequence_logits', or the decoder's last hidden
    states (final norm included) at the same positions, [B, T, H], with the model's lm_head."""
    if not fused_lm_head:
        return HeadOutput(logits=sequence_logits(model, batch))
    out = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids(), use_cache=False)
    return HeadOutput(hidden=out.last_hidden_state[:, batch.prompt_len - 1:-1], **lm_head(model))


@torch.no_grad()
def completion_logprobs(model, batch: Batch, temperature: float, backend=None, fused_lm_head: bool = False):
    """log-probs [B, T] of the completion tokens under `model` (0 on padding), without autograd."""
    labels = batch.completion_ids.masked_fill(batch.completion_mask == 0, -100)
    return sequence_head(model, batch, fused_lm_head).token_logprobs(labels, temperature=temperature, backend=backend)


def completion_values(critic, batch: Batch) -> torch.Tensor:
    """V of the state before each completion token: [B, T], aligned like sequence_logits."""
    v = critic(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids())
    return v[:, batch.prompt_len - 1:-1]


class Scorer:
    """Per-token quantities of a rollout batch before the update, each computed at most once:
    the rollout policy's log-probs, the reference's, and the critic's values."""

    def __init__(self, cfg, policy, ref, critic):
        self.cfg, self.policy, self.ref, self.critic = cfg, policy, ref, critic
        self._cache: dict = {}

    def _get(self, key, batch, fn):
        k = (key, id(batch))
        if k not in self._cache:
            self._cache[k] = (batch, fn())  # keeps batch alive so id() stays unique
        return self._cache[k][1]

    def old_logp(self, batch: Batch) -> torch.Tensor:
        return self._get("old", batch, lambda: completion_logprobs(self.policy, batch, self.cfg.temperature,
                                                                   self.cfg.backend, self.cfg.fused_lm_head))

    def ref_logp(self, batch: Batch) -> torch.Tensor:
        if self.ref is None:
            raise ValueError("this method needs a reference model (--ref_model)")
        return self._get("ref", batch, lambda: completion_logprobs(self.ref, batch, self.cfg.temperature,
                                                                   self.cfg.backend, self.cfg.fused_lm_head))

    def values(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return self._get("values", batch, lambda: completion_values(self.critic, batch))
