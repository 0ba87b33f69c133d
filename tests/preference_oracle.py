"""Float64 eager oracles for alignops.preference, written from the formulas of docs/methods.md 2.14,
2.22, 2.23, 2.26, 2.37 (SimPO), 2.38 (CPO) and 2.39 (KTO) in their plainest form (log of sigmoid,
log(1 - P), 1 - sigmoid, loops over groups, examples and positions): accurate in float64 for the
moderate inputs the tests feed them."""

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


def _smoothed(x, eps):
    log_sig = lambda t: torch.log(1 / (1 + torch.exp(-t)))  # noqa: E731
    return -(1 - eps) * log_sig(x) - eps * log_sig(-x)


def simpo_loss(sw, sl, lw, ll, beta, gamma, eps=0.0, alpha=0.0):
    """(loss, per-pair losses): mean over pairs of the smoothed -log sigmoid(beta (mean_w - mean_l) - gamma),
    means S / max(L, 1), plus alpha * the chosen token-mean NLL."""
    sw, sl = sw.double(), sl.double()
    lw, ll = lw.double(), ll.double()
    mean_w = sw / torch.where(lw > 0, lw, torch.ones_like(lw))
    mean_l = sl / torch.where(ll > 0, ll, torch.ones_like(ll))
    losses = _smoothed(beta * (mean_w - mean_l) - gamma, eps)
    loss = losses.mean()
    if alpha:
        loss = loss + alpha * (-sw.sum() / lw.sum())
    return loss, losses


def cpo_loss(sw, sl, lw, beta, eps=0.0, alpha=1.0):
    """(loss, per-pair losses): mean of the smoothed -log sigmoid(beta (S_w - S_l)) + alpha * chosen NLL."""
    sw, sl = sw.double(), sl.double()
    losses = _smoothed(beta * (sw - sl), eps)
    loss = losses.mean()
    if alpha:
        loss = loss + alpha * (-sw.sum() / lw.double().sum())
    return loss, losses


def kto_losses(s, s_ref, desirable, beta, z0, w_good=1.0, w_bad=1.0, loss_type="kto"):
    """Per-example KTO losses, one example at a time: lambda (1 - sigmoid(...)) as the paper writes it."""
    out = []
    for i in range(s.shape[0]):
        r = s[i].double() - (0.0 if s_ref is None else s_ref[i].double())
        if loss_type == "kto":
            v = torch.sigmoid(beta * (r - z0)) if desirable[i] else torch.sigmoid(beta * (z0 - r))
            out.append((w_good if desirable[i] else w_bad) * (1 - v))
        else:  # apo_zero_unpaired
            out.append(w_good * (1 - torch.sigmoid(beta * r)) if desirable[i] else w_bad * torch.sigmoid(beta * r))
    return torch.stack(out) if out else s.double()[:0]


def kto_reference_point(policy_kl, ref_kl):
    """z0 = max(0, mean(policy_kl - ref_kl)) (TRL: the mismatched pairs' mean, clamped at 0)."""
    return max(0.0, float((policy_kl.double() - ref_kl.double()).mean()))
