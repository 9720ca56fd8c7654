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
from diffrobust.stages.plan import diffpure_defense_attacks as defense_attacks
from diffrobust.stages.robustness import (LARGE, MORE, SetError, attack_names, attack_plan, cost_per_image,
                                          num_shards, read_set, robust, shard_indices)

DEFENSES = ("undefended", "diffpure")
# The generic pieces are re-exported so that the DiffPure table's readers find everything here.
__all__ = ["DEFENSES", "LARGE", "MORE", "SetError", "attack_names", "attack_plan", "attack_shard", "build",
           "build_defense", "cost_per_image", "defense_attacks", "evaluate_set", "load_table_sets",
           "masking_checks", "num_shards", "purifier_network_calls", "read_set", "robust", "shard_indices",
           "table_rows"]


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


def load_table_sets(results_dir, settings, shards, threat, dataset_dir):
    """{(defense, attack): arrays} of every stored DiffPure set at `threat` under `results_dir`, verified
    (`robustness.read_set`)."""
    pairs = [(defense, attack) for defense in DEFENSES for attack in defense_attacks(settings, defense)]
    return robustness.load_sets(results_dir, pairs, shards, threat, settings=settings, dataset_dir=dataset_dir)


def table_rows(sets, threat, settings):
    """The DiffPure table's rows (robustness.table_rows with DiffPure's min(standard, rand))."""
    return robustness.table_rows(sets, threat, settings, pair=("standard", "rand"))


def masking_checks(sets, transfer, threat, settings):
    """The masking checks of DiffPure at `threat` (robustness.masking_checks)."""
    return robustness.masking_checks(sets, transfer, threat, settings, "diffpure")


# ---------------------------------------------------------------------------------------------------------------
# The claims (the summary report)
# ---------------------------------------------------------------------------------------------------------------

PAPER = "DiffPure"
REPORT = "diffpure_table"
PAIR = ("standard", "rand")  # DiffPure reports the minimum of the two


def reported_entries(reference, settings):
    """The entries of published_values.yaml's DiffPure table that are DiffPure's own numbers (its min(standard,
    rand) and the configured attacks), not later re-evaluations of it."""
    names = {f"min({PAIR[0]}, {PAIR[1]})", *settings["attacks"]}
    return [entry for entry in reference["entries"] if entry["attack"] in names and "robust" in entry["values"]]


def claims(sets, transfers, settings, *, dataset, known):
    """DiffPure's claims as diffrobust.claims.Claim rows, per threat of `settings` (`sets` and `transfers`: {threat:
    loaded sets}, {threat: transfer evaluation}): DiffPure beats the undefended classifier (the per-image worst case
    over standard and rand, paired), its attacks pass the masking checks, and its published numbers at paper scale
    (held when the published value lies inside our interval)."""
    from diffrobust import claims as c

    paper_scale = dataset in known["diffpure_table"]
    reference = known["diffpure_table"].get(dataset) or known["diffpure_table"]["cifar10"]
    accuracy_link = c.anchor(REPORT, "Clean and robust accuracy (ours)")
    checks_link = c.anchor(REPORT, "Checks against gradient masking")
    rows = []
    for threat in settings["threats"]:
        eps = settings["threats"][threat]["eps"]
        worst = {defense: robustness.worst_case(sets[threat], defense, PAIR) for defense in DEFENSES}
        clean = {defense: robustness.clean_correct(sets[threat], defense, PAIR) for defense in DEFENSES}
        rows.append(robustness.paired_claim(
            PAPER, f"DiffPure is robust beyond the undefended classifier ({threat} {eps:g}, worst case per image "
                   "over AutoAttack standard and rand)", worst["diffpure"], worst["undefended"],
            ("DiffPure", "undefended"), c.NOT_KNOWN,
            "claim: DiffPure (Nie et al., ICML'22) defends against adaptive attacks; a difference is not published "
            "(its robust accuracies are the headline rows)", accuracy_link,
            clean=(clean["diffpure"], clean["undefended"])))
        rows.append(robustness.masking_claim(PAPER, "DiffPure", threat, masking_checks(sets[threat], transfers[threat],
                                                                                        threat, settings), checks_link))
    for entry in reported_entries(reference, settings):
        claim = f"DiffPure robust accuracy under {entry['attack']} ({entry['threat']}): {entry['label']}"
        if not paper_scale or entry["threat"] not in settings["threats"]:
            rows.append(c.not_run(PAPER, claim, f"{entry['values']['robust']:.4f}", c.provenance(entry),
                                  "the paper-scale number is for CIFAR-10 or ImageNet (presets cifar10, imagenet)", accuracy_link))
            continue
        attacks = PAIR if entry["attack"].startswith("min(") else (entry["attack"],)
        # min(standard, rand): the attack with the lower accuracy, as DiffPure reports it
        correct = min((robust(sets[entry["threat"]][("diffpure", a)]) for a in attacks), key=lambda r: r.mean())
        clean = robustness.clean_correct(sets[entry["threat"]], "diffpure", attacks)
        rows.append(robustness.accuracy_claim(PAPER, claim, correct, entry, accuracy_link, clean=clean,
                                              defense="DiffPure"))
    return rows


def report_claims(parameters, known):
    """DiffPure's claim rows from its report's notebook parameters (notebooks/diffpure_table.py)."""
    settings, results_dir, dataset_dir = parameters["settings"], parameters["results_dir"], parameters["dataset_dir"]
    sets = {t: load_table_sets(results_dir, settings, parameters["shards"], t, dataset_dir)
            for t in settings["threats"]}
    transfers = {t: robustness.load_transfer(results_dir, "diffpure", parameters["transfer_attack"], t,
                                             dataset_dir=dataset_dir)
                 for t in settings["threats"]}
    return claims(sets, transfers, settings, dataset=parameters["dataset"], known=known)
