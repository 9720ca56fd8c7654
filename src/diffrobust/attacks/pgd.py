"""PGD with EOT, and DiffPure's BPDA+EOT protocol (`bpda_eot/bpda_eot_attack.py`, from Hill et al.'s ebm-defense).

DiffPure's protocol, for a randomized defense: at each of `steps` + 1 evaluations the loss is the cross-entropy of
the logits averaged over `eot_attack_reps` purifications (EOT on the logits), and the gradient is taken through the
purifier with BPDA (the caller passes the defense in gradient mode "bpda"). An image counts as broken at a step
when the `eot_attack_reps`-average misclassifies it AND a verification with `eot_defense_reps` purifications
(logits averaged) misclassifies it too; the first such iterate is its adversarial example, and images still
defended at the end keep the last iterate. Steps are signed-gradient (ℓ∞) or normalised-gradient (ℓ2) of size
`step_size`, projected back onto the ball, without a random start (as the official attack).

`pgd` is the plain PGD of Madry et al. (a uniform random start in the ball, `steps` steps of the same kind on the
summed cross-entropy, the last iterate returned): the attack of PGD adversarial training (`training`) and a cheap
white-box check of a deterministic classifier.
"""

import torch
import torch.nn.functional as F

from diffrobust.attacks.budget import check_threat, project
from diffrobust.attacks.gradients import EOTLogits, logits


def _step(x_adv, grad, x, threat, eps, step_size):
    if threat == "linf":
        moved = x_adv + step_size * grad.sign()
    else:
        norms = grad.reshape(grad.shape[0], -1).norm(dim=1).clamp_min(1e-10).view(-1, *([1] * (grad.dim() - 1)))
        moved = x_adv + step_size * grad / norms
    return project(moved, x, threat, eps)


def uniform_in_ball(x, threat, eps, generator=None):
    """A uniform draw from the ε-ball around each image (ℓ∞: every pixel offset uniform in [-eps, eps]; ℓ2: uniform
    in the ball, a Gaussian direction at radius eps·U^(1/d)), projected into [0, 1]. Drawn on the generator's device
    (the CPU for None) and moved to x's."""
    check_threat(threat)
    where = torch.device("cpu") if generator is None else generator.device
    if threat == "linf":
        delta = (torch.rand(x.shape, generator=generator, device=where) * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=where)
        norms = direction.reshape(x.shape[0], -1).norm(dim=1).clamp_min(1e-12)
        radius = eps * torch.rand(x.shape[0], generator=generator, device=where) ** (1.0 / x[0].numel())
        delta = direction * (radius / norms).view(-1, *([1] * (x.dim() - 1)))
    return project(x + delta.to(x.device, x.dtype), x, threat, eps)


def pgd(network, x, y, *, threat, eps, steps, step_size, random_start=True, generator=None):
    """Madry et al.'s PGD against a deterministic images -> logits `network`: from a uniform random start in the
    ball (`uniform_in_ball`; x itself when random_start is False), `steps` ascent steps of size `step_size` on
    the cross-entropy summed over the batch (signed gradient for ℓ∞, normalised for ℓ2), each projected onto the
    ball and [0, 1] (`budget.project`). Returns the last iterate, detached. Only the input gradient is taken: the
    network's parameter gradients are left as they were, and its mode (train / eval) is the caller's."""
    check_threat(threat)
    x = x.detach()
    x_adv = uniform_in_ball(x, threat, eps, generator) if random_start else x.clone()
    for _ in range(int(steps)):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(network(x_adv), y, reduction="sum"), x_adv)
        x_adv = _step(x_adv.detach(), grad, x, threat, eps, step_size)
    return x_adv.detach()


def _averaged_logits_and_grad(defense, x, y, reps, generator):
    """(logits averaged over reps draws, gradient of CE(averaged logits, y) summed over the batch)."""
    x_var = x.detach().clone().requires_grad_(True)
    out = EOTLogits(defense, reps)(x_var, generator)
    (grad,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), x_var)
    return out.detach(), grad


def _verified_correct(defense, x, y, correct, defended, reps, generator):
    """DiffPure's eot_defense_verification: a still-defended image that the attack-side average misclassifies is
    re-judged by the logits averaged over `reps` purifications (only those images are re-run)."""
    suspects = torch.nonzero(~correct & defended).flatten()
    verified = correct.clone()
    if reps and len(suspects):
        with torch.no_grad():
            out = EOTLogits(defense, reps)(x[suspects], generator)
        verified[suspects] = out.argmax(dim=1) == y[suspects]
    return verified


def eot_pgd(defense, x, y, *, threat, eps, steps, step_size, eot_attack_reps, eot_defense_reps, generator=None):
    """DiffPure's BPDA+EOT PGD (module docstring). `defense(x, generator)` -> logits, already in its gradient mode.

    Returns (x_adv, defended): the adversarial images and a bool per image, True when no iterate broke it."""
    check_threat(threat)
    defended = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    best = x.detach().clone()
    x_adv = x.detach().clone()
    for step in range(int(steps) + 1):
        needs_grad = step < steps
        if needs_grad:
            out, grad = _averaged_logits_and_grad(defense, x_adv, y, eot_attack_reps, generator)
        else:
            with torch.no_grad():
                out = EOTLogits(defense, eot_attack_reps)(x_adv, generator)
        correct = _verified_correct(defense, x_adv, y, out.argmax(dim=1) == y, defended, eot_defense_reps,
                                    generator)
        newly_broken = defended & ~correct
        best[newly_broken] = x_adv[newly_broken]
        defended &= correct
        if not defended.any():
            break
        if needs_grad:
            x_adv = _step(x_adv, grad, x, threat, eps, step_size).detach()
    best[defended] = x_adv[defended]
    return best, defended


def predict_averaged(defense, x, draws, generator=None, batch_size=None):
    """Labels from the defense's logits averaged over `draws` draws (draws = 1: one forward), without gradients."""
    batch_size = batch_size or x.shape[0]
    labels = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start:start + batch_size]
            out = EOTLogits(defense, draws)(chunk, generator) if draws > 1 else logits(defense, chunk, generator)
            labels.append(out.argmax(dim=1))
    return torch.cat(labels)
