"""Threat models: the ε-ball around each image, the projection onto it, and the check every saved example passes.

Budgets are in [0, 1] image units, as DiffPure and AutoAttack state them (ℓ∞ 8/255, ℓ2 0.5 on CIFAR-10).
"""

import torch

from diffrobust.errors import DiffrobustError

THREATS = ("linf", "l2")
# Float32 rounding of x + δ (and AutoAttack's own projection) can overshoot the ball by a few ulps.
TOLERANCE = 1e-5


class BudgetError(DiffrobustError, ValueError):
    """An adversarial example outside its ε-ball or outside [0, 1]."""


def check_threat(threat):
    if threat not in THREATS:
        raise ValueError(f"unknown threat {threat!r}; choose one of {THREATS}")


def perturbation_norms(x, x_adv, threat):
    """Per-image ‖x_adv - x‖ in the threat's norm (float64 so that the check does not round)."""
    check_threat(threat)
    delta = (x_adv.detach().double() - x.detach().double()).reshape(x.shape[0], -1)
    return delta.abs().amax(dim=1) if threat == "linf" else delta.norm(dim=1)


def project(x_adv, x, threat, eps):
    """The nearest point of the ε-ball around x inside [0, 1] (for ℓ2: scale δ into the ball, then clip, as
    DiffPure's pgd_update)."""
    check_threat(threat)
    if threat == "linf":
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    delta = x_adv - x
    norms = delta.reshape(x.shape[0], -1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    return (x + delta * torch.clamp(eps / norms, max=1.0)).clamp(0, 1)


def check_inside_budget(x, x_adv, threat, eps, *, where="adversarial examples", tolerance=TOLERANCE):
    """Raise BudgetError naming the offending images unless every x_adv lies in its ε-ball and in [0, 1]; return
    the per-image norms."""
    if x.shape != x_adv.shape:
        raise BudgetError(f"{where}: shape {tuple(x_adv.shape)} differs from the clean images' {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all():
        raise BudgetError(f"{where}: non-finite values")
    norms = perturbation_norms(x, x_adv, threat)
    outside = torch.nonzero(norms > eps + tolerance).flatten().tolist()
    flat = x_adv.detach().reshape(x.shape[0], -1)
    out_of_range = torch.nonzero((flat.amin(dim=1) < -tolerance) | (flat.amax(dim=1) > 1 + tolerance)).flatten()
    problems = []
    if outside:
        problems.append(f"{len(outside)} outside the {threat} ball of radius {eps:g} (rows {outside[:10]}, largest "
                        f"norm {float(norms.max()):.6g})")
    if len(out_of_range):
        problems.append(f"{len(out_of_range)} outside [0, 1] (rows {out_of_range.tolist()[:10]})")
    if problems:
        raise BudgetError(f"{where}: " + "; ".join(problems) + ". Nothing was written: an example outside its "
                          "budget is a bug of the attack, not a result.")
    return norms
