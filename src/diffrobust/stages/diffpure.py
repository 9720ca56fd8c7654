"""DiffPure's table as workflow jobs: its defenses (`DEFENSES`: ``undefended``, the classifier alone, and
``diffpure``, DiffPure's purifier then the classifier) for the generic attack jobs of `stages.robustness`.

Attacks are named in the config block ``diffpure.attacks`` (``standard``, ``rand``: AutoAttack; ``bpda_eot``:
DiffPure's BPDA+EOT PGD), with the derived ``<checks.attack>-more`` / ``-large`` of the masking checks.
"""

import functools

from diffrobust import diffusion as dp
from diffrobust.defenses import PurifiedClassifier
from diffrobust.defenses.diffpure import DiffPurePurifier
from diffrobust.models import eps_model, load_source, source_files, time_input
from diffrobust.stages import robustness
from diffrobust.stages.robustness import (LARGE, MORE, SetError, attack_names, attack_plan, cost_per_image,
                                          num_shards, read_set, robust, shard_indices)

DEFENSES = ("undefended", "diffpure")
# The generic pieces are re-exported so that the DiffPure table's readers find everything here.
__all__ = ["DEFENSES", "LARGE", "MORE", "SetError", "attack_names", "attack_plan", "attack_shard", "build",
           "build_defense", "cost_per_image", "defense_attacks", "evaluate_set", "load_table_sets",
           "masking_checks", "num_shards", "purifier_network_calls", "read_set", "robust", "shard_indices",
           "table_rows"]


def defense_attacks(settings, defense):
    """Attacks run against `defense`: all of them against DiffPure; against the undefended classifier the
    configured ones (the 'undefended falls under the same attack' check), not the derived ones."""
    return attack_names(settings) if defense == "diffpure" else list(settings["attacks"])


def build_defense(defense, *, classifier, diffusion=None, t_star=None, purifier=None):
    """The `defense` (DEFENSES) from loaded models: the classifier alone, or DiffPure (`purifier` settings:
    variant, dt, rand_t, t_delta, checkpoint) at t_star, with the diffusion model's unconditional eps."""
    if defense == "undefended":
        return classifier.network
    if defense != "diffpure":
        raise ValueError(f"unknown defense {defense!r}; choose one of {DEFENSES}")
    unconditional = diffusion.null_class is not None  # label-dropout models: the null class
    purify = DiffPurePurifier(eps_model(diffusion, unconditional=unconditional), t_star=t_star,
                              time_input=time_input(diffusion), schedule=diffusion.diffusion, **purifier)
    return PurifiedClassifier(purify, classifier.network)


def build(defense, threat, settings, models, device):
    """A `robustness.Built` DiffPure defense at `threat` from the stage's model sources."""
    classifier = load_source(models["classifier"], device=device)
    if defense == "undefended":
        return robustness.Built(build_defense(defense, classifier=classifier), {"defense": defense},
                                {"classifier": source_files(models["classifier"])})
    diffusion = load_source(models["diffusion"], device=device)
    t_star = settings["threats"][threat]["t_star"]
    model = build_defense(defense, classifier=classifier, diffusion=diffusion, t_star=t_star,
                          purifier=settings["purifier"])
    return robustness.Built(model, {"defense": defense, "t_star": t_star, "purifier": settings["purifier"]},
                            {role: source_files(models[role]) for role in ("classifier", "diffusion")},
                            model.purifier.network_evaluations())


attack_shard = functools.partial(robustness.attack_shard, build=build)
evaluate_set = functools.partial(robustness.evaluate_set, build=build)


def purifier_network_calls(settings, threat):
    """Diffusion-network calls of one DiffPure purification at `threat` (its t* and the purifier settings)."""
    t_star = settings["threats"][threat]["t_star"]
    purifier = settings["purifier"]
    if purifier["variant"] == "sde":
        return dp.vpsde_num_steps(t_star, purifier["dt"])
    return int(round(t_star * dp.VPSDE_N))


def load_table_sets(results_dir, settings, shards, threat):
    """{(defense, attack): arrays} of every stored DiffPure set at `threat` under `results_dir`."""
    pairs = [(defense, attack) for defense in DEFENSES for attack in defense_attacks(settings, defense)]
    return robustness.load_sets(results_dir, pairs, shards, threat)


def table_rows(sets, threat, settings):
    """The DiffPure table's rows (robustness.table_rows with DiffPure's min(standard, rand))."""
    return robustness.table_rows(sets, threat, settings, pair=("standard", "rand"))


def masking_checks(sets, transfer, threat, settings):
    """The masking checks of DiffPure at `threat` (robustness.masking_checks)."""
    return robustness.masking_checks(sets, transfer, threat, settings, "diffpure")
