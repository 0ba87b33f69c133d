"""Sampling with a KV cache, recording the behaviour log-probs of every sampled token."""

from __future__ import annotations

import dataclasses
import inspect

import torch


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


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), P), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, device=device)
        mask[i, P - len(p):] = 1
    return ids, mask


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_p: float = 1.0, generator=None) -> Batch:
    """Samples one completion per prompt. temperature=0 decodes greedily. The recorded log-probs
    are those of softmax(logits / temperature) (the distribution that was sampled; log-softmax
    of the raw logits for greedy decoding), the old policy of the first update."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, attn = left_pad(prompts, pad_id, device)
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
    full_attn = torch.cat([left_pad(prompts, pad_id, device)[1], cmask.long()], 1)
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
