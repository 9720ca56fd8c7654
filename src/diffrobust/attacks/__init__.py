"""Evaluation attacks, gradient modes and protective perturbations: the interface every attack of the project takes.

Nothing is implemented yet (the DiffPure / RDC and Pixel-is-a-Barrier issues build it); this is the contract they
build to, so that every attack works on every defense of the project.

One entry point::

    attack(defense, x01, y, *, threat, eps, settings, generator) -> x_adv01

- ``defense``: any images -> logits module of the project (a classifier, or a defense composed with
  `defenses.PurifiedClassifier`), possibly randomized (it then takes a ``generator``) and possibly with
  non-differentiable parts. Purifiers leave autograd to the caller, so gradients flow through them unless a
  gradient mode says otherwise.
- ``x01``: images in [0, 1] (N, C, H, W), the same image space as every file boundary of the project; ``y``: labels.
- ``threat``: ``"linf"`` or ``"l2"``; ``eps``: the budget in [0, 1] image units.
- ``settings``: the attack's own, named as the papers name them: AutoAttack's version (``standard``, ``rand``,
  ``custom`` with its attack list), iterations, restarts, step size, EOT draws, and the gradient mode of the
  purifier inside the defense: ``full`` (backpropagate through the purification), ``bpda`` (identity backward
  through the purifier), either combined with EOT (the gradient averaged over draws of the defense's randomness).
- ``generator``: a CPU ``torch.Generator`` for every random draw (random starts, EOT, the defense's own randomness),
  so that an attack is reproducible on any device.
- Returns adversarial images in [0, 1]; every returned example lies inside its ε-ball around ``x01`` (checked before
  anything is written: an example outside the ball or outside [0, 1] is an error, never a result).

Protective perturbations (Pixel is a Barrier) use the same shape with an objective instead of labels.
"""

THREATS = ("linf", "l2")
GRADIENT_MODES = ("full", "bpda")
