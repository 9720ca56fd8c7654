"""AutoAttack (Croce & Hein) through `pyautoattack` (PyPI), on any project defense.

Versions, as the library (and the papers) name them:
- ``standard``: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000 queries); 1 restart each.
- ``rand``: APGD-CE + APGD-DLR with EOT 20, 1 restart (DiffPure's protocol for randomized defenses).
- ``custom``: the `attacks` list with APGD's defaults (5 restarts, 100 iterations, EOT 1) — RDC's APGD-DLR run.

Overrides (None keeps the version's value): n_iter, n_restarts, eot_iter (APGD), n_target_classes (APGD-T and
FAB-T), n_queries (Square). The mini preset uses them to fit a CPU budget; the paper presets leave them unset.

APGD fixes its step-size schedule (the checkpoints where the step may halve: `n_iter_2`, `n_iter_min`, `size_decr`)
from `n_iter` in its constructor, so an n_iter override goes through `set_apgd_iterations`, which recomputes them
(without it, 200 iterations ran the 100-iteration schedule: checkpoints (22, 6, 3) instead of (44, 12, 6)).

The library's own resume (`state_path`) is broken (attacks_rdc_pdm.md §3), so jobs checkpoint per batch
themselves (stages.diffpure). The defense's randomness comes from the generator bound into `BoundDefense`, never from
torch's global RNG (the library reseeds that on every call).
"""

import logging

import torch

from diffrobust.attacks.budget import check_threat

VERSIONS = ("standard", "rand", "custom")
NORMS = {"linf": "Linf", "l2": "L2"}
OVERRIDES = ("n_iter", "n_restarts", "eot_iter", "n_target_classes", "n_queries")


def build(model, *, threat, eps, version, attacks=None, seed=0, device="cpu", n_iter=None, n_restarts=None,
          eot_iter=None, n_target_classes=None, n_queries=None):
    """A configured pyautoattack.AutoAttack for ``model(x) -> logits``."""
    from pyautoattack import AutoAttack

    check_threat(threat)
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; choose one of {VERSIONS}")
    if (version == "custom") != (attacks is not None):
        raise ValueError("AutoAttack: `attacks` is given exactly for version 'custom' (e.g. attacks: [apgd-dlr])")
    adversary = AutoAttack(model, attacks=list(attacks) if attacks else None, device=device, eps=float(eps),
                           norm=NORMS[threat], seed=int(seed), version=version)
    for apgd in (adversary.apgd, adversary.apgd_targeted):
        if n_iter is not None:
            set_apgd_iterations(apgd, n_iter)
        if eot_iter is not None:
            apgd.eot_iter = int(eot_iter)
    if n_restarts is not None:
        adversary.apgd.n_restarts = int(n_restarts)
    if n_iter is not None:
        adversary.fab.n_iter = int(n_iter)
    if n_target_classes is not None:
        adversary.apgd_targeted.n_target_classes = int(n_target_classes)
        adversary.fab.n_target_classes = int(n_target_classes)
    if n_queries is not None:
        adversary.square.n_queries = int(n_queries)
    guard_square_empty_batches(adversary.square)
    return adversary


def guard_square_empty_batches(square):
    """pyautoattack 0.2.0's L2/L1 Square crashes when its initialisation already fooled every point of the batch:
    the first query step selects no point, `lp_norm`/`normalize` reshape an empty tensor (`view(0, -1)`), and the
    model is queried with no image. Give the attack norms that accept an empty batch and a model call that answers one
    with no logits, so the step does nothing, as it does for L-inf."""
    norm, predict = square.norm, square.predict
    classes = {}

    def per_image(x):
        flat = x.flatten(1)
        total = {"Linf": lambda: flat.abs().amax(1), "L2": lambda: (flat ** 2).sum(-1).sqrt(),
                 "L1": lambda: flat.abs().sum(-1)}[norm]()
        return total.view(-1, *([1] * (x.dim() - 1)))

    def predict_or_empty(x):
        if x.shape[0] == 0 and "count" in classes:
            return x.new_zeros((0, classes["count"]))
        logits = predict(x)
        classes["count"] = logits.shape[1]
        return logits

    square.lp_norm = per_image
    square.normalize = lambda x: x / (per_image(x) + 1e-12)
    square.predict = predict_or_empty


def apgd_schedule(n_iter):
    """APGD's step-size checkpoints for `n_iter` iterations, as pyautoattack's APGDAttack.__init__ derives them:
    (n_iter_2, n_iter_min, size_decr) = the first checkpoint's distance, the smallest distance, and its decrement
    (0.22, 0.06 and 0.03 of n_iter, truncated, at least 1; Croce & Hein 2020, §3.2)."""
    n_iter = int(n_iter)
    return max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)


def set_apgd_iterations(apgd, n_iter):
    """Give a built APGD attack `n_iter` iterations and the schedule the library would have built for them:
    `n_iter_orig` too (the L1 large-eps schedule splits it)."""
    apgd.n_iter = apgd.n_iter_orig = int(n_iter)
    apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr = apgd_schedule(n_iter)


def run(model, x, y, *, threat, eps, version, attacks=None, seed=0, batch_size=None, logger=None, **overrides):
    """AutoAttack on (x, y): (x_adv, robust), robust = the prediction on x_adv during the attack was y (AutoAttack
    keeps the clean image where no attack succeeded, as its own evaluation does)."""
    unknown = set(overrides) - set(OVERRIDES)
    if unknown:
        raise ValueError(f"unknown AutoAttack settings {sorted(unknown)}; known: {list(OVERRIDES)}")
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    if num_classes <= adversary_targets(version, overrides):
        # APGD-T and FAB-T target the 9 runners-up; with fewer classes the library indexes past the end
        overrides["n_target_classes"] = num_classes - 1
    adversary = build(model, threat=threat, eps=eps, version=version, attacks=attacks, seed=seed,
                      device=x.device, **overrides)
    adversary.logger = logger or logging.getLogger("auto-attack")
    x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size or x.shape[0])
    return x_adv.detach(), (y_adv == y)


def adversary_targets(version, overrides):
    """Target classes APGD-T / FAB-T will use: the override, else the version's (9 for standard)."""
    return overrides.get("n_target_classes") or 9


def seed_from(generator):
    """An integer seed for the library's own draws (random starts, Square's proposals) from the job's generator."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
