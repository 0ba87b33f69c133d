"""Float64 eager oracles for alignops.preference, written from the formulas of docs/methods.md 2.14,
2.22, 2.23 and 2.26 in their plainest form (log of sigmoid, log(1 - P), loops over groups and
positions): accurate in float64 for the moderate inputs the tests feed them."""

from __future__ import annotations

import torch


def dpo_losses(pc, pr, rc, rr, beta, loss_type, eps=0.0, lc=None, lr=None):
    pc, pr, rc, rr = (t.double() for t in (pc, pr, rc, rr))
    cr, rj = pc - rc, pr - rr
    if lc is not None:
        cr, rj = cr / lc.double().clamp_min(1), rj / lr.double().clamp_min(1)
    h = cr - rj
    log_sig = lambda x: torch.log(1 / (1 + torch.exp(-x)))  # noqa: E731
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sig(beta * h) - eps * log_sig(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * log_sig(beta * h) + eps * log_sig(-beta * h)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.clamp(1 - beta * h, min=0)
    raise ValueError(loss_type)


def log_sigmoid_wide(x):
    """log sigmoid(x) for any float64 x: min(x, 0) - log(1 + e^-|x|) (no overflow at |x| = 2000)."""
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-x.abs()))


def dpo_losses_wide(pc, pr, rc, rr, beta, loss_type, eps=0.0):
    """dpo_losses for margins far outside the moderate range (beta h = -2000), same formulas."""
    pc, pr, rc, rr = (t.double() for t in (pc, pr, rc, rr))
    x = beta * ((pc - rc) - (pr - rr))
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid_wide(x) - eps * log_sigmoid_wide(-x)
    if loss_type == "robust":
        return (-(1 - eps) * log_sigmoid_wide(x) + eps * log_sigmoid_wide(-x)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.clamp(1 - x, min=0)
    raise ValueError(loss_type)


def orpo_loss(sw, sl, lw, ll, beta):
    """Response-only NLL (token mean over chosen responses) - beta * mean log sigmoid(log odds)."""
    sw, sl, lw, ll = sw.double(), sl.double(), lw.double(), ll.double()
    pw, pl = torch.exp(sw / lw), torch.exp(sl / ll)
    z = torch.log(pw / (1 - pw)) - torch.log(pl / (1 - pl))
    odds = torch.log(torch.sigmoid(z))
    nll = -sw.sum() / lw.sum()
    return nll - beta * odds.mean(), z


def gvpo_loss(s, s_anchor, rewards, group_ids, beta):
    """Mean over groups of 1/(k-1) * 1/2 * sum((centred implicit) - (centred reward))^2."""
    s, s_anchor, rewards = s.double(), s_anchor.double(), rewards.double()
    losses = []
    for g in sorted(set(group_ids.tolist())):
        rows = [i for i, x in enumerate(group_ids.tolist()) if x == g]
        implicit = beta * (s[rows] - s_anchor[rows])
        r = rewards[rows]
        k = len(rows)
        d = (implicit - implicit.mean()) - (r - r.mean())
        losses.append(0.5 * (d ** 2).sum() / (k - 1))
    return torch.stack(losses).mean()


def rahf_loss(lora_layers, base_layers, dir_layers, mask, alpha, count_padding=False):
    per_layer = []
    for h, b, v in zip(lora_layers, base_layers, dir_layers):
        total, count = h.new_zeros((), dtype=torch.float64), 0
        for i in range(h.shape[0]):
            for t in range(h.shape[1]):
                if mask is None or mask[i, t]:
                    diff = h[i, t].double() - (b[i, t].double() + alpha * v[i, t].double())
                    total = total + torch.sqrt((diff ** 2).sum())
                    count += 1
        if count_padding:
            count = h.shape[0] * h.shape[1]
        per_layer.append(total / count if count else total * 0)
    return torch.stack(per_layer).mean()
