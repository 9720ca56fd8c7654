"""RDC's table as workflow jobs: its defenses for the generic attack jobs of `stages.robustness`, and the sweep of
the number of sigma points (the paper's cost claim).

Defenses (`DEFENSES`), all images -> logits:
- ``undefended``: the classifier alone; ``adversarial``: the adversarially trained classifier (mini: PGD training
  in the DAG; CIFAR-10: RobustBench's WRN-70-16 trained for the attack's threat model, ``rdc.models.adversarial``
  names one checkpoint per threat);
- ``dc``: the diffusion classifier (`defenses.DiffusionClassifier`, config ``rdc.dc``) of the class-conditional
  model; ``rdc``: likelihood maximization (`defenses.LikelihoodMaximizer`, ``rdc.lm``) with the unconditional model,
  then ``dc``; the attacks see LM in the gradient mode of their settings (``bpda``: the official choice; ``full``:
  through LM's unrolled Adam);
- ``dc_multihead`` / ``rdc_multihead``: the same with the multi-head network (``rdc.multihead_dc``: one pass gives
  every class).

Every defense here is deterministic for a given seed (the official RDC re-seeds per call too), so AutoAttack's
randomness check does not fire and EOT adds nothing.
"""

import functools

import numpy as np
import torch

from diffrobust import data
from diffrobust.attacks.pgd import predict_averaged
from diffrobust.defenses import DiffusionClassifier, LikelihoodMaximizer, PurifiedClassifier, denoiser_for
from diffrobust.device import resolve_device
from diffrobust.io import atomic_path
from diffrobust.models import load_source, source_files
from diffrobust.stages import robustness
from diffrobust.stages.plan import RDC_ROLES as ROLES
from diffrobust.stages.plan import rdc_defense_attacks as defense_attacks
from diffrobust.stages.plan import sweep_heads
from diffrobust.stages.robustness import read_set, threat_source

DEFENSES = ("undefended", "adversarial", "dc", "rdc", "dc_multihead", "rdc_multihead")
# The models each defense loads (roles of rdc.models).
def diffusion_classifier(loaded, dc_settings):
    """A DiffusionClassifier of a loaded class-conditional (or multi-head) model with the `rdc.dc` settings."""
    return DiffusionClassifier(denoiser_for(loaded), **dc_settings)


def build(defense, threat, settings, models, device):
    """A `robustness.Built` RDC-table defense from the stage's model sources."""
    if defense not in ROLES:
        raise ValueError(f"unknown RDC defense {defense!r}; choose one of {DEFENSES}")
    roles = ROLES[defense]
    sources = {role: threat_source(models[role], threat) for role in roles}
    inputs = {role: source_files(sources[role]) for role in roles}
    if defense in ("undefended", "adversarial"):
        network = load_source(sources[roles[0]], device=device).network
        return robustness.Built(network, {"defense": defense}, inputs)
    multihead = defense.endswith("multihead")
    dc_settings = settings["multihead_dc" if multihead else "dc"]
    dc = diffusion_classifier(load_source(sources[roles[0]], device=device), dc_settings).to(device)
    identity = {"defense": defense, "dc": dc_settings}
    calls = dc.network_evaluations()
    if defense.startswith("rdc"):
        unconditional = load_source(sources["unconditional"], device=device)
        lm = LikelihoodMaximizer(denoiser_for(unconditional, unconditional=True), **settings["lm"])
        identity["lm"] = settings["lm"]
        calls += lm.network_evaluations()
        return robustness.Built(PurifiedClassifier(lm, dc), identity, inputs, calls)
    return robustness.Built(dc, identity, inputs, calls)


attack_shard = functools.partial(robustness.attack_shard, build=build)
evaluate_set = functools.partial(robustness.evaluate_set, build=build)


def load_table_sets(results_dir, settings, shards, threat, dataset_dir):
    """{(defense, attack): arrays} of every stored RDC-table set at `threat`, verified (`robustness.read_set`)."""
    pairs = [(defense, attack) for defense in settings["defenses"] for attack in defense_attacks(settings, defense)]
    return robustness.load_sets(results_dir, pairs, shards, threat, settings=settings, dataset_dir=dataset_dir)


def sigma_sweep(*, threat, settings, subset, dataset_dir, models, set_paths, out_path, device="cpu"):
    """The cost claim: accuracy of the single-head and multi-head diffusion classifiers against their number of
    sigma points, clean and on the stored adversarial set `set_paths` (made against ``dc`` with the full grid, so
    the robust column is a transfer to the cheaper classifiers, said so in the report). Writes a TSV with head,
    points, network evaluations per image, clean and adversarial accuracy."""
    stored = read_set(set_paths, dataset_dir, threat=threat, settings=settings, defense="dc",
                      attack=settings["checks"]["attack"])
    x_clean = robustness.clean_images(data.load_dataset(dataset_dir).eval_split, stored["idx"], stored["label"],
                                      set_paths[0])
    y = torch.from_numpy(stored["label"])
    device = resolve_device(device)
    x_clean, x_adv, y = x_clean.to(device), torch.from_numpy(stored["x_adv"]).to(device), y.to(device)
    lines = ["head\tpoints\tnetwork_evaluations\tclean_accuracy\tadversarial_accuracy"]
    batch = int(settings["batch_size"])
    for head, role, key in sweep_heads(settings):
        loaded = load_source(threat_source(models[role], threat), device=device)
        for points in settings["sweep"]["points"]:
            dc_settings = dict(settings[key])
            if dc_settings.get("sigma_grid", "edm") == "vp":
                dc_settings["timesteps"] = np.linspace(0, loaded.diffusion.num_levels - 1, points).round().astype(int).tolist()
            else:
                dc_settings["sigma_steps"] = points + 1
            dc = diffusion_classifier(loaded, dc_settings).to(device)
            clean = (predict_averaged(dc, x_clean, 1, None, batch) == y).float().mean().item()
            adversarial = (predict_averaged(dc, x_adv, 1, None, batch) == y).float().mean().item()
            lines.append(f"{head}\t{points}\t{dc.network_evaluations()}\t{clean:.6f}\t{adversarial:.6f}")
    with atomic_path(out_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return {"rows": len(lines) - 1, "images": len(y), "threat": threat}


# ---------------------------------------------------------------------------------------------------------------
# The claims (the RDC table and the summary report)
# ---------------------------------------------------------------------------------------------------------------

PAPER = "RDC"
REPORT = "rdc_table"
ORDER = ("rdc", "diffpure", "undefended")  # the ordering the paper claims: RDC >= DiffPure >= undefended
DIFFPURE_PAIR = ("standard", "rand")  # DiffPure's row: per image, robust under both (its table's worst case)


def _per_defense(per_image, sets, settings, diffpure_sets):
    """{defense: per_image(sets, defense, attacks)} for the table's defenses (every attack run on them) and, where
    DiffPure ran at the same budget (`diffpure_sets` given), DiffPure (standard and rand)."""
    result = {defense: per_image(sets, defense, settings["attacks"]) for defense in settings["defenses"]}
    if diffpure_sets is not None:
        result["diffpure"] = per_image(diffpure_sets, "diffpure", DIFFPURE_PAIR)
    return result


def worst_cases(sets, settings, diffpure_sets=None):
    """{defense: per-image robustness under every attack run on it} at one threat, for the table's defenses and,
    where DiffPure ran at the same budget (`diffpure_sets` given), DiffPure under both standard and rand."""
    return _per_defense(robustness.worst_case, sets, settings, diffpure_sets)


def clean_cases(sets, settings, diffpure_sets=None):
    """{defense: per-image clean correctness} of the same defenses as `worst_cases` (robustness.clean_correct): the
    evidence a claim about their robust accuracy rests on."""
    return _per_defense(robustness.clean_correct, sets, settings, diffpure_sets)


def ordering(accuracies):
    """Whether RDC >= DiffPure >= undefended holds on the worst-case accuracies {defense: accuracy} (point values,
    as the report states it: the DiffPure row is on other images, so the comparison is not paired); None when one is
    missing (DiffPure ran at another budget)."""
    values = [accuracies.get(defense) for defense in ORDER]
    if None in values:
        return None
    return values[0] >= values[1] >= values[2]


def ordering_verdict(accuracies, clean):
    """(verdict, reason) of RDC >= DiffPure >= undefended from the worst-case accuracies {defense: accuracy} and
    the defenses' per-image clean correctness {defense: bools} (`clean_cases`): not run where DiffPure ran at
    another budget, inconclusive (the reason says why) where one of them classifies no image correctly clean (0 = 0
    = 0 is no evidence), else holds or fails (`ordering`)."""
    from diffrobust import claims as c

    holds = ordering(accuracies)
    if holds is None:
        return c.NOT_RUN, "DiffPure ran at another budget"
    reason = c.no_evidence({d: clean[d] for d in ORDER})
    return (c.INCONCLUSIVE, reason) if reason else (c.HOLDS if holds else c.FAILS, "")


def _published_robust(reference, defense, threat):
    return next((e for e in reference["entries"] if e["defense"] == defense and e["threat"] == threat
                 and "robust" in e["values"]), None)


def claims(sets, transfers, settings, *, diffpure_sets, dataset, known):
    """RDC's claims as diffrobust.claims.Claim rows per threat (`sets`, `transfers`, `diffpure_sets`: {threat: ...},
    diffpure_sets[threat] None where DiffPure ran at another budget): the ordering RDC >= DiffPure >= undefended (as
    the report states it), RDC beats the adversarially trained classifier (paired), the masking checks on RDC, and
    RDC's robust accuracy at paper scale (held when the published value lies inside our interval)."""
    from diffrobust import claims as c
    from diffrobust.attacks import masking

    paper_scale = dataset in known["rdc_table"]
    reference = known["rdc_table"].get(dataset) or known["rdc_table"]["cifar10"]
    margin = known["headlines"]["rdc_margin"]
    links = {"order": c.anchor(REPORT, "The ordering the paper claims: RDC ≥ DiffPure ≥ undefended (worst case over "
                                       "the attacks run)"),
             "table": c.anchor(REPORT, "Clean and robust accuracy (ours)"),
             "checks": c.anchor(REPORT, "Checks against gradient masking (on RDC)")}
    rows = []
    for threat in settings["threats"]:
        eps = settings["threats"][threat]["eps"]
        worst = worst_cases(sets[threat], settings, diffpure_sets[threat])
        clean = clean_cases(sets[threat], settings, diffpure_sets[threat])
        accuracy = {defense: masking.accuracy(correct) for defense, correct in worst.items()}
        verdict, reason = ordering_verdict({defense: a["accuracy"] for defense, a in accuracy.items()}, clean)
        published = {d: _published_robust(reference, d, threat) for d in ORDER} if paper_scale else {}
        ours = (", ".join(f"{d} " + c.interval_text(accuracy[d]["accuracy"], accuracy[d]["ci_low"],
                                                    accuracy[d]["ci_high"]) for d in ORDER if d in accuracy)
                + " (point values compared: DiffPure's images are its own)")
        if verdict == c.INCONCLUSIVE:
            ours += f"; inconclusive: {reason}"
        rows.append(c.Claim(
            PAPER,
            f"RDC ≥ DiffPure ≥ undefended in robust accuracy ({threat} {eps:g}, worst case over the attacks run)",
            ", ".join(f"{d} {e['values']['robust']:.4f}" if e else f"{d} {c.NOT_KNOWN}" for d, e in published.items())
            or f"{c.NOT_KNOWN} for {dataset}",
            "; ".join(f"{d}: {c.provenance(e)}" for d, e in published.items() if e)
            or "the paper evaluates CIFAR-10 (rdc_table.cifar10 in config/published_values.yaml)",
            ours, None, None, None, verdict, links["order"]))
        if "adversarial" in worst:
            known_margin = paper_scale and threat == margin["threat"] and dataset == margin["dataset"]
            rows.append(robustness.paired_claim(
                PAPER, f"RDC beats the adversarially trained classifier ({threat} {eps:g}, worst case)",
                worst["rdc"], worst["adversarial"], ("RDC", "adversarial"),
                f"+{margin['value']:.4f}" if known_margin else f"{c.NOT_KNOWN} for {dataset} {threat}",
                f"{margin['statement']}, {margin['dataset']} ({c.provenance(margin)})",
                links["table"], clean=(clean["rdc"], clean["adversarial"])))
        checks = robustness.masking_checks(sets[threat], transfers[threat], threat, settings, "rdc")
        rows.append(robustness.masking_claim(PAPER, "RDC", threat, checks, links["checks"]))
    for threat in settings["threats"]:
        entry = _published_robust(known["rdc_table"]["cifar10"], "rdc", threat)
        if entry is None:
            continue
        claim = f"RDC robust accuracy ({threat}): {entry['label']}"
        if not paper_scale:
            rows.append(c.not_run(PAPER, claim, f"{entry['values']['robust']:.4f}", c.provenance(entry),
                                  "the paper-scale number is for CIFAR-10 (preset cifar10)", links["table"]))
            continue
        worst = robustness.worst_case(sets[threat], "rdc", settings["attacks"])
        clean = robustness.clean_correct(sets[threat], "rdc", settings["attacks"])
        rows.append(robustness.accuracy_claim(PAPER, claim, worst, entry, links["table"], clean=clean, defense="RDC"))
    return rows


def report_claims(parameters, known):
    """RDC's claim rows from its report's notebook parameters (notebooks/rdc_table.py)."""
    from diffrobust.stages import diffpure

    settings, results_dir = parameters["settings"], parameters["results_dir"]
    dp_settings, dataset_dir = parameters["diffpure_settings"], parameters["dataset_dir"]
    sets, transfers, dp_sets = {}, {}, {}
    for threat, block in settings["threats"].items():
        sets[threat] = load_table_sets(results_dir, settings, parameters["shards"], threat, dataset_dir)
        transfers[threat] = robustness.load_transfer(results_dir, "rdc", parameters["transfer_attack"], threat,
                                                     dataset_dir=dataset_dir)
        same_budget = dp_settings["threats"].get(threat, {}).get("eps") == block["eps"]
        dp_sets[threat] = (diffpure.load_table_sets(results_dir, dp_settings, parameters["diffpure_shards"], threat,
                                                    dataset_dir) if same_budget else None)
    return claims(sets, transfers, settings, diffpure_sets=dp_sets, dataset=parameters["dataset"], known=known)
