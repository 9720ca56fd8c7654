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

from diffrobust import data, imagespace
from diffrobust.attacks.pgd import predict_averaged
from diffrobust.defenses import DiffusionClassifier, LikelihoodMaximizer, PurifiedClassifier, denoiser_for
from diffrobust.device import resolve_device
from diffrobust.io import atomic_path
from diffrobust.models import load_source, source_files
from diffrobust.stages import robustness
from diffrobust.stages.robustness import attack_names, read_set, threat_source

DEFENSES = ("undefended", "adversarial", "dc", "rdc", "dc_multihead", "rdc_multihead")
# The models each defense loads (roles of rdc.models).
ROLES = {"undefended": ("classifier",), "adversarial": ("adversarial",), "dc": ("conditional",),
         "rdc": ("conditional", "unconditional"), "dc_multihead": ("multihead",),
         "rdc_multihead": ("multihead", "unconditional")}


def defense_attacks(settings, defense):
    """Attacks run against `defense`: RDC gets every configured one and the derived checks (it is the defense the
    table is about); the defenses of `all_attacks_on` every configured one; the others `checks.attack` only."""
    if defense == "rdc":
        return attack_names(settings)
    if defense in settings["all_attacks_on"]:
        return list(settings["attacks"])
    return [settings["checks"]["attack"]]


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


def load_table_sets(results_dir, settings, shards, threat):
    """{(defense, attack): arrays} of every stored RDC-table set at `threat`."""
    pairs = [(defense, attack) for defense in settings["defenses"] for attack in defense_attacks(settings, defense)]
    return robustness.load_sets(results_dir, pairs, shards, threat)


def sweep_heads(settings):
    """(head, model role, DC settings key) of the sweep: single-head, and multi-head where the table has it."""
    heads = [("single", "conditional", "dc")]
    if {"dc_multihead", "rdc_multihead"} & set(settings["defenses"]):
        heads.append(("multi", "multihead", "multihead_dc"))
    return heads


def sigma_sweep(*, threat, settings, subset, dataset_dir, models, set_paths, out_path, device="cpu"):
    """The cost claim: accuracy of the single-head and multi-head diffusion classifiers against their number of
    sigma points, clean and on the stored adversarial set `set_paths` (made against ``dc`` with the full grid, so
    the robust column is a transfer to the cheaper classifiers, said so in the report). Writes a TSV with head,
    points, network evaluations per image, clean and adversarial accuracy."""
    stored = read_set(set_paths)
    dataset = data.load_dataset(dataset_dir)
    split = dataset.eval_split
    position = {int(i): k for k, i in enumerate(split.indices)}
    rows_ = [position[int(i)] for i in stored["idx"]]
    x_clean = imagespace.uint8_to_float(torch.from_numpy(split.images[rows_]))
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
    return {"rows": len(lines) - 1, "images": len(rows_), "threat": threat}
