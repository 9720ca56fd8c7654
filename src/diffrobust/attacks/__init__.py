"""Evaluation attacks and gradient modes: one entry point for every defense of the project.

    attack(defense, x01, y, *, threat, eps, settings, generator) -> x_adv01

- ``defense``: any images -> logits module of the project (a classifier, or a defense composed with
  `defenses.PurifiedClassifier`), possibly randomized (it then takes a ``generator``) and possibly with
  non-differentiable parts. Purifiers leave autograd to the caller, so gradients flow through them unless the
  gradient mode says otherwise.
- ``x01``: images in [0, 1] (N, C, H, W), the image space of every file boundary of the project; ``y``: labels.
- ``threat``: ``"linf"`` or ``"l2"``; ``eps``: the budget in [0, 1] image units.
- ``settings``: the attack's own, named as the papers name them (`ATTACK_METHODS` below): ``method``
  (``autoattack`` with its ``version`` standard / rand / custom and ``attacks`` list, or ``eot_pgd``, DiffPure's
  BPDA+EOT protocol with ``steps``, ``step_size``, ``eot_attack_reps``, ``eot_defense_reps``), and the
  ``gradient_mode`` of the purifier inside the defense: ``full`` (backpropagate through the purification) or
  ``bpda`` (identity backward through the purifier); EOT (averaging over draws of the defense's randomness)
  combines with both (AutoAttack's ``eot_iter``, eot_pgd's ``eot_attack_reps``).
- ``generator``: a CPU ``torch.Generator`` for every random draw (the defense's randomness and the attack's own
  seed), so that an attack is reproducible on any device.
- Returns adversarial images in [0, 1]; every one lies inside its ε-ball around ``x01`` (`budget.check_inside_budget`
  runs before anything is returned: an example outside its ball or outside [0, 1] is an error, never a result).

`run_attack` is the same call returning an `AttackResult` with the cost (images forwarded and back-propagated
through the defense, seconds). Modules: `budget` (threats, projection, the check), `gradients` (gradient modes, EOT,
the wrapper libraries see), `autoattack` (pyautoattack), `pgd` (DiffPure's BPDA+EOT PGD), `masking` (the checks
against gradient masking that every evaluation reports).

Protective perturbations (Pixel is a Barrier) will use the same shape with an objective instead of labels.
"""

import time
from dataclasses import dataclass

import torch

from diffrobust.attacks import autoattack, pgd
from diffrobust.attacks.budget import THREATS, BudgetError, check_inside_budget, check_threat
from diffrobust.attacks.gradients import GRADIENT_MODES, BoundDefense, with_gradient_mode

ATTACK_METHODS = ("autoattack", "eot_pgd")


@dataclass
class AttackResult:
    """x_adv: adversarial images in [0, 1]; robust: bool per image, True when the attack found no misclassified
    point (as judged during the attack); forward_images / gradient_images: images passed forward / backward
    through the defense (an EOT draw counts once); seconds: wall time."""

    x_adv: torch.Tensor
    robust: torch.Tensor
    forward_images: int
    gradient_images: int
    seconds: float


def _autoattack(bound, x, y, threat, eps, settings, generator):
    options = {key: settings[key] for key in autoattack.OVERRIDES if settings.get(key) is not None}
    return autoattack.run(bound, x, y, threat=threat, eps=eps, version=settings["version"],
                          attacks=settings.get("attacks"), seed=autoattack.seed_from(generator),
                          batch_size=settings.get("batch_size"), **options)


def _eot_pgd(bound, x, y, threat, eps, settings, generator):
    return pgd.eot_pgd(bound, x, y, threat=threat, eps=eps, steps=settings["steps"], step_size=settings["step_size"],
                       eot_attack_reps=settings["eot_attack_reps"], eot_defense_reps=settings["eot_defense_reps"],
                       generator=generator)


RUNNERS = {"autoattack": _autoattack, "eot_pgd": _eot_pgd}


def run_attack(defense, x01, y, *, threat, eps, settings, generator=None):
    """`attack` with its cost: an AttackResult (see the module docstring for the arguments)."""
    check_threat(threat)
    method = settings.get("method")
    if method not in RUNNERS:
        raise ValueError(f"unknown attack method {method!r}; choose one of {ATTACK_METHODS}")
    bound = BoundDefense(with_gradient_mode(defense, settings.get("gradient_mode", "full")), generator)
    start = time.perf_counter()
    x_adv, robust = RUNNERS[method](bound, x01, y, threat, eps, settings, generator)
    seconds = time.perf_counter() - start
    check_inside_budget(x01, x_adv, threat, eps, where=f"{method} ({threat}, eps {eps:g})")
    return AttackResult(x_adv.detach(), robust.detach(), bound.forward_images, bound.gradient_images, seconds)


def attack(defense, x01, y, *, threat, eps, settings, generator=None):
    """Adversarial images in [0, 1] for `defense` (module docstring)."""
    return run_attack(defense, x01, y, threat=threat, eps=eps, settings=settings, generator=generator).x_adv


__all__ = ["ATTACK_METHODS", "AttackResult", "BudgetError", "GRADIENT_MODES", "THREATS", "attack",
           "check_inside_budget", "run_attack"]
