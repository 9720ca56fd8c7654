"""Empirical robustness as workflow jobs, for any defense of any paper: adversarial sets made against a defense
(sharded, resumable per batch), scored on any defense (the transfer check), and the table helpers (accuracies with
exact intervals, the gradient-masking checks, cost per image). `stages.diffpure` and `stages.rdc` give the defenses.

A stage's config block (``diffpure``, ``rdc``) names its threats (budget, large budget of the masking check), its
attacks (``attacks.<name>``: AutoAttack or eot_pgd settings) and its checks; two attacks per threat are derived from
``checks.attack``: ``<name>-more`` (its iterations times ``checks.iterations_factor``) and ``<name>-large`` (at the
threat's ``large_eps``). A stage builds its defenses with ``build(defense, threat, settings, models, device) ->
Built``; a model source in ``models`` may be one per threat (``{linf: ..., l2: ...}``, `threat_source`). Every set
is one `.npz` per shard under ``results/<preset>/attacks/<defense>/<attack>/<threat>/``: dataset indices, labels,
float32 adversarial images, per-image outcome (clean and adversarial correctness, the attack's own verdict), images
forwarded and back-propagated through the defense and seconds, and the identity of the settings that made it.

Every reader of a stored set (`evaluate_set`, RDC's sigma sweep, the table loaders `load_sets`) goes through
`read_set`, which runs `verify_set` on each shard: its identity (defense, attack, threat, budget and plan as the
reader's settings give them), its indices and labels against the dataset, and every example finite, in [0, 1] and
inside its budget. The attack job runs the same check on each work batch it resumes from.
"""

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffrobust import data, imagespace, resumable, seeds
from diffrobust.attacks import check_inside_budget, masking, run_attack
from diffrobust.attacks.budget import TOLERANCE, perturbation_norms
from diffrobust.attacks.pgd import predict_averaged
from diffrobust.device import describe as describe_device
from diffrobust.device import resolve_device
from diffrobust.errors import DiffrobustError
from diffrobust.io import DamagedFileError, atomic_path, read_npz
from diffrobust.stages.plan import LARGE, MORE, attack_names, base_attack, num_shards, threat_source  # noqa: F401 (the stage API)

THREAT_IDS = {"linf": 0, "l2": 1}
ATTACK_VERSION = 1
# Seed streams of the jobs (diffrobust.seeds keys under the stage's seed).
STREAM_ATTACK, STREAM_EVALUATE, STREAM_FLIP = 1, 2, 3

log = logging.getLogger(__name__)


class SetError(DiffrobustError, ValueError):
    """A stored adversarial set that does not fit what reads it."""


@dataclass
class Built:
    """A defense ready to attack: the images -> logits `model`, the settings its outputs depend on (`identity`),
    the files it was loaded from (`inputs`, role -> paths) and its diffusion-network calls per forward."""

    model: object
    identity: dict
    inputs: dict = field(default_factory=dict)
    network_calls: int = 0


def attack_plan(settings, attack, threat):
    """(eps, attack settings) of a table attack at a threat: the configured settings with step sizes resolved,
    the iteration counts multiplied for '<name>-more', the budget raised for '<name>-large'."""
    threat_settings = settings["threats"][threat]
    eps = float(threat_settings["eps"])
    base = base_attack(attack)
    if base not in settings["attacks"] or (base != attack and base != settings["checks"]["attack"]):
        raise ValueError(f"unknown attack {attack!r}; the stage has {attack_names(settings)}")
    plan = dict(settings["attacks"][base])
    if attack.endswith(MORE):
        factor = int(settings["checks"]["iterations_factor"])
        key = "steps" if plan["method"] == "eot_pgd" else "n_iter"
        plan[key] = factor * int(plan.get(key) or 100)  # AutoAttack's default is 100 iterations
    if attack.endswith(LARGE):
        eps = float(threat_settings["large_eps"])
    if "relative_step_size" in plan:
        plan["step_size"] = float(plan.pop("relative_step_size")) * eps
    return eps, plan


def evaluation_draws(settings):
    return int(settings["eval_draws"])


def _chunks(count, size):
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def _save_chunk(path, arrays):
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def _dataset_inputs(dataset_dir):
    """The prepared dataset's files, as an identity input: the images a set perturbs are part of what made it."""
    return [Path(dataset_dir) / "splits.npz", Path(dataset_dir) / "meta.json"]


def attack_shard(*, build, defense, attack, threat, shard, settings, subset, dataset_dir, models, out_path,
                 work_dir, device="cpu", progress=True):
    """Make the adversarial set of one shard: `attack` against `defense` (built by the stage's `build`) at
    `threat`; resumable per batch through `work_dir` (a killed job redoes only its unfinished batch); `out_path` is
    written once, when all are done.

    The work folder's identity holds the settings, the shard's dataset indices and the digests of the model and
    dataset files, so another subset, dataset or model discards it (`resumable.claim_folder`). Every finished batch
    stores that identity too, and is checked on resume with `verify_set` (its identity, indices, labels, budget);
    a batch that fails (copied from another run, damaged, tampered) is moved aside and recomputed."""
    dataset = data.load_dataset(dataset_dir)
    split = dataset.eval_split
    indices = shard_indices(subset, dataset.meta.get("num_files", len(split)), shard, settings["shard_size"])
    chosen = split.take(indices)
    eps, plan = attack_plan(settings, attack, threat)
    device = resolve_device(device)
    built = build(defense, threat, settings, models, device)
    model = built.model
    identity_settings = {**built.identity, "attack": attack, "threat": threat,
                         "eps": eps, "plan": plan, "seed": settings["seed"], "batch_size": settings["batch_size"],
                         "eval_draws": evaluation_draws(settings), "indices": [int(i) for i in indices]}
    work_dir = Path(work_dir)
    identity = resumable.claim_folder(work_dir, job="attack", version=ATTACK_VERSION, settings=identity_settings,
                                      inputs={**built.inputs, "dataset": _dataset_inputs(dataset_dir)},
                                      what="adversarial batches")
    identity_text = np.array(json.dumps(identity, sort_keys=True))
    x_all = imagespace.uint8_to_float(torch.from_numpy(chosen.images))
    y_all = torch.from_numpy(chosen.labels).long()
    parts = []
    batches = _chunks(len(indices), int(settings["batch_size"]))
    finished = sum((work_dir / f"batch{start:06d}.npz").is_file() for start, _ in batches)
    if finished:
        log.info("resuming: %d of %d batches already attacked in %s, skipping them", finished, len(batches), work_dir)
    for start, stop in tqdm(batches, desc=f"{attack} on {defense} ({threat})", disable=not progress):
        chunk_path = work_dir / f"batch{start:06d}.npz"
        resumed = _resumed_batch(chunk_path, split=chosen, threat=threat, eps=eps, identity=identity,
                                 indices=indices[start:stop])
        if resumed is not None:
            parts.append(resumed)
            continue
        parts.append(_attack_batch(model, x_all[start:stop], y_all[start:stop], chosen.indices[start:stop],
                                   threat=threat, eps=eps, plan=plan, settings=settings, device=device))
        _save_chunk(chunk_path, {**parts[-1], "identity": identity_text})
    arrays = {key: np.concatenate([part[key] for part in parts]) for key in parts[0] if key != "identity"}
    arrays["identity"] = identity_text
    check_inside_budget(x_all, torch.from_numpy(arrays["x_adv"]), threat, eps, where=str(out_path))
    _save_chunk(out_path, arrays)
    calls = built.network_calls
    return {"images": len(indices), "eps": eps, "plan": plan, "robust_accuracy": float(robust(arrays).mean()),
            "clean_accuracy": float(arrays["clean_correct"].mean()),
            "seconds": float(arrays["seconds"].sum()), "network_calls_per_forward": calls,
            "device": describe_device(device)}


def _resumed_batch(path, *, split, threat, eps, identity, indices):
    """The finished work batch at `path` if it is this run's (`verify_set`: same identity, these indices, the
    dataset's labels, inside the budget); None if there is none, or if it fails (then it is moved aside, with one
    log line, and the caller recomputes it)."""
    if not path.is_file():
        return None
    try:
        arrays = read_npz(path)
        verify_set(arrays, str(path), split=split, threat=threat, eps=eps, expected=identity, indices=indices)
    except (DamagedFileError, SetError) as error:
        resumable.set_aside(path, str(error).removeprefix(f"{path}: "), what="work batch")
        return None
    return arrays


def _attack_batch(model, x, y, indices, *, threat, eps, plan, settings, device):
    """Attack one batch and score it: the attack's own verdict, and a fresh forward of the clean and adversarial
    images (logits averaged over eval_draws), each from its own stream keyed by the batch's first dataset index."""
    first = int(indices[0])
    x, y = x.to(device), y.to(device)
    start = time.perf_counter()
    result = run_attack(model, x, y, threat=threat, eps=eps, settings=plan,
                        generator=seeds.generator(settings["seed"], STREAM_ATTACK, THREAT_IDS[threat], first))
    draws = evaluation_draws(settings)
    evaluate = seeds.generator(settings["seed"], STREAM_EVALUATE, THREAT_IDS[threat], first)
    clean = predict_averaged(model, x, draws, evaluate)
    adversarial = predict_averaged(model, result.x_adv, draws, evaluate)
    seconds = time.perf_counter() - start
    n = len(indices)
    return {"idx": np.asarray(indices, dtype=np.int64), "label": y.cpu().numpy().astype(np.int64),
            "x_adv": result.x_adv.cpu().numpy().astype(np.float32),
            "clean_correct": (clean == y).cpu().numpy(), "attack_robust": result.robust.cpu().numpy(),
            "adv_correct": (adversarial == y).cpu().numpy(),
            "forward_images": np.full(n, result.forward_images / n), "gradient_images": np.full(n,
                                                                                                 result.gradient_images / n),
            "seconds": np.full(n, seconds / n)}


def robust(arrays):
    """Per-image robustness of a stored set: the attack found no misclassified point AND a fresh forward of the
    returned example is correct (for a randomized defense the two can disagree; both must hold)."""
    return arrays["attack_robust"] & arrays["adv_correct"]


def shard_indices(subset, split_size, shard, shard_size):
    """Dataset indices of shard `shard` of a stage's subset (a range, or data seeds' draws concatenated)."""
    indices = data.subset_indices(subset, split_size, name="subset")
    chunk = indices[shard * shard_size:(shard + 1) * shard_size]
    if len(chunk) == 0:
        raise ValueError(f"shard {shard} is empty: the subset has {len(indices)} images and shard_size {shard_size}")
    return chunk


# The arrays every stored set and work batch holds, one row per image (plus "identity", the JSON of what made it).
SET_KEYS = ("idx", "label", "x_adv", "clean_correct", "attack_robust", "adv_correct", "forward_images",
            "gradient_images", "seconds")
REMADE = "delete it and rerun the job that makes it (snakemake makes a missing set again)"


def _stored_identity(arrays):
    value = arrays.get("identity")
    if value is None:
        return None
    try:
        return json.loads(str(value)) if not isinstance(value, dict) else value
    except ValueError:
        return None


def _within(stored, expected):
    """`stored` cut down to the keys of `expected` (recursively), so that the two compare on those keys only."""
    if isinstance(expected, dict):
        stored = stored if isinstance(stored, dict) else {}
        return {key: _within(stored.get(key), value) for key, value in expected.items()}
    return stored


def clean_images(split, idx, labels, where):
    """The clean float images of the dataset indices `idx` of `split`; raises SetError naming `where` when an
    index is not in the split or the stored `labels` are not the dataset's (the set was made on other data)."""
    position = {int(i): k for k, i in enumerate(split.indices)}
    missing = [int(i) for i in idx if int(i) not in position]
    if missing:
        raise SetError(f"{where}: dataset indices {missing[:5]} are not in the dataset's evaluation split; the set "
                       "was made on other data")
    rows = np.array([position[int(i)] for i in idx], dtype=np.int64)
    if not np.array_equal(split.labels[rows], labels):
        raise SetError(f"{where}: labels differ from the dataset's; the set was made on other data")
    return imagespace.uint8_to_float(torch.from_numpy(split.images[rows]))


def verify_set(arrays, where, *, split, threat, eps, expected=None, indices=None):
    """Check that `arrays` (a stored set shard or one work batch, as read) holds what its readers use; raise
    SetError naming `where` and the first problem otherwise. The one check every reader of a set runs:

    - every array of SET_KEYS, one row per image;
    - identity: the stored identity agrees with `expected` on every key `expected` names (a work batch: its run's
      whole identity; a table: the defense, attack, threat, budget and attack plan it shows); the rows are the
      stored identity's dataset indices, and `indices` if given;
    - the indices are in the dataset `split` and the labels are the dataset's;
    - every x_adv is finite, in [0, 1] and inside the `threat` ball of radius `eps` around its clean image.

    Returns the clean images (float, N x C x H x W)."""
    missing = [key for key in SET_KEYS if key not in arrays]
    if missing:
        raise SetError(f"{where}: no {', '.join(missing)} array; not a set written by attack-shard")
    count = len(arrays["idx"])
    ragged = [key for key in SET_KEYS if len(arrays[key]) != count]
    if ragged:
        raise SetError(f"{where}: {', '.join(ragged)} do not have one row per image ({count})")
    stored = _stored_identity(arrays)
    if expected is not None:
        if stored is None:
            raise SetError(f"{where}: no readable identity (written by an older version, or damaged)")
        differing = resumable.differences(_within(stored, expected), resumable.canonical(expected))
        if differing:
            raise SetError(f"{where}: made by another run ({'; '.join(differing[:4])})")
    # a shard holds the images its identity names; a work batch, its slice of them (`indices`)
    wanted = indices if indices is not None else (stored or {}).get("settings", {}).get("indices")
    if wanted is not None and not np.array_equal(np.asarray(arrays["idx"]), np.asarray(wanted)):
        raise SetError(f"{where}: holds the images {np.asarray(arrays['idx'])[:6].tolist()}, not the "
                       f"{np.asarray(wanted)[:6].tolist()} its run attacks")
    x_clean = clean_images(split, arrays["idx"], arrays["label"], where)
    x_adv = torch.from_numpy(np.asarray(arrays["x_adv"]))
    if x_adv.shape != x_clean.shape:
        raise SetError(f"{where}: x_adv has shape {tuple(x_adv.shape)}, the images {tuple(x_clean.shape)}")
    if not torch.isfinite(x_adv).all():
        raise SetError(f"{where}: x_adv holds non-finite values")
    if x_adv.min() < -TOLERANCE or x_adv.max() > 1 + TOLERANCE:
        raise SetError(f"{where}: x_adv outside [0, 1] (values {float(x_adv.min()):.4g} .. {float(x_adv.max()):.4g})")
    norms = perturbation_norms(x_clean, x_adv, threat)
    outside = torch.nonzero(norms > eps + TOLERANCE).flatten().tolist()
    if outside:
        raise SetError(f"{where}: {len(outside)} examples outside the {threat} ball of radius {eps:g} (rows "
                       f"{outside[:10]}, largest norm {float(norms.max()):.6g})")
    return x_clean


def _shared_identity(identity):
    """A shard's identity without what differs between the shards of one set (its indices, its digest)."""
    settings = {key: value for key, value in identity.get("settings", {}).items() if key != "indices"}
    return {**{key: value for key, value in identity.items() if key != "digest"}, "settings": settings}


def read_set(paths, dataset_dir, *, threat, settings, defense=None, attack=None):
    """The shards `paths` of one adversarial set at `threat`, verified (`verify_set`) and concatenated in order.

    `settings` is the stage block of the reader: the set must have been made at the budget and with the attack
    plan those settings give its attack (`attack`, or the one the set names), by `defense` if given, on the
    dataset at `dataset_dir`. Returns the arrays with "identity": the settings the shards share. Raises SetError
    naming the file (and saying to delete and rerun it) for a damaged, foreign or tampered shard."""
    dataset = data.load_dataset(dataset_dir)
    parts = []
    for path in paths:
        try:
            parts.append(read_npz(path))
        except FileNotFoundError:
            raise SetError(f"{path}: not found; run the attack job that makes it") from None
        except DamagedFileError as error:
            raise SetError(f"{error}; {REMADE}") from None
    identities = [_stored_identity(part) or {} for part in parts]
    shared = [_shared_identity(identity) for identity in identities]
    if any(identity != shared[0] for identity in shared):
        raise SetError(f"the shards {', '.join(map(str, paths))} were made with different settings; rerun them")
    attack = attack or shared[0].get("settings", {}).get("attack")
    try:
        eps, plan = attack_plan(settings, attack, threat)
    except (KeyError, ValueError) as error:
        raise SetError(f"{paths[0]}: made by attack {attack!r} at {threat!r}, which the stage's settings do not "
                       f"have ({error})") from None
    expected = {"job": "attack", "settings": {"attack": attack, "threat": threat, "eps": eps, "plan": plan}}
    if defense is not None:
        expected["settings"]["defense"] = defense
    for path, part in zip(paths, parts):
        try:
            verify_set(part, str(path), split=dataset.eval_split, threat=threat, eps=eps, expected=expected)
        except SetError as error:
            raise SetError(f"{error}; {REMADE}") from None
    arrays = {key: np.concatenate([part[key] for part in parts]) for key in parts[0] if key != "identity"}
    arrays["identity"] = shared[0]
    return arrays


def evaluate_set(*, build, defense, threat, set_paths, settings, dataset_dir, models, out_path, device="cpu"):
    """Score `defense` on a stored adversarial set (made against any defense, verified by `read_set`) and measure
    how often its prediction flips between two forwards of the same clean images. Writes idx, label, adv_correct
    (logits averaged over eval_draws), clean_label_a / clean_label_b (two single forwards of the clean images)."""
    stored = read_set(set_paths, dataset_dir, threat=threat, settings=settings)
    x_clean = clean_images(data.load_dataset(dataset_dir).eval_split, stored["idx"], stored["label"], set_paths[0])
    x_adv = torch.from_numpy(stored["x_adv"])
    device = resolve_device(device)
    model = build(defense, threat, settings, models, device).model
    batch = int(settings["batch_size"])
    y = torch.from_numpy(stored["label"]).to(device)
    adversarial = predict_averaged(model, x_adv.to(device), evaluation_draws(settings),
                                   seeds.generator(settings["seed"], STREAM_EVALUATE, THREAT_IDS[threat]), batch)
    flip = seeds.generator(settings["seed"], STREAM_FLIP, THREAT_IDS[threat])
    label_a = predict_averaged(model, x_clean.to(device), 1, flip, batch)
    label_b = predict_averaged(model, x_clean.to(device), 1, flip, batch)
    arrays = {"idx": stored["idx"], "label": stored["label"], "adv_correct": (adversarial == y).cpu().numpy(),
              "clean_label_a": label_a.cpu().numpy(), "clean_label_b": label_b.cpu().numpy()}
    _save_chunk(out_path, arrays)
    return {"images": len(x_clean), "accuracy": float(arrays["adv_correct"].mean()),
            "flip_rate": float((arrays["clean_label_a"] != arrays["clean_label_b"]).mean()),
            "source": stored["identity"]["settings"]}


# ---------------------------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------------------------

def load_sets(results_dir, pairs, shards, threat, *, settings, dataset_dir):
    """{(defense, attack): arrays} of the stored sets `pairs` at `threat` under `results_dir` (results/<preset>),
    each verified by `read_set` against the stage's `settings` and the dataset."""
    return {(defense, attack): read_set([Path(results_dir) / "attacks" / defense / attack / threat / f"shard{k}.npz"
                                         for k in shards], dataset_dir, threat=threat, settings=settings,
                                        defense=defense, attack=attack)
            for defense, attack in pairs}


def cost_per_image(arrays, purifier_calls):
    """Mean cost per image of making a set: gradient evaluations and forwards through the defense, network passes
    (purifier calls per forward, + 1 classifier pass), seconds."""
    forwards, gradients = float(arrays["forward_images"].mean()), float(arrays["gradient_images"].mean())
    return {"gradient_evaluations": gradients, "forwards": forwards,
            "network_passes": forwards * (purifier_calls + 1), "seconds": float(arrays["seconds"].mean())}


def table_rows(sets, threat, settings, pair=("standard", "rand")):
    """Rows of a table at `threat` from loaded sets {(defense, attack): arrays}: clean and robust accuracy with
    exact 95% intervals per configured attack, and for every defense attacked with both attacks of `pair` the
    minimum of their accuracies (what DiffPure reports for standard and rand) and the per-image worst case."""
    rows = []
    for (defense, attack), arrays in sets.items():
        if attack not in settings["attacks"]:
            continue
        rows.append({"defense": defense, "attack": attack, "threat": threat,
                     **{f"clean_{k}": v for k, v in masking.accuracy(arrays["clean_correct"]).items()},
                     **{f"robust_{k}": v for k, v in masking.accuracy(robust(arrays)).items()}})
    for defense in dict.fromkeys(d for d, _ in sets):
        both_sets = [sets.get((defense, name)) for name in pair]
        if any(p is None for p in both_sets):
            continue
        accuracies = [masking.accuracy(robust(p)) for p in both_sets]
        minimum = min(accuracies, key=lambda a: a["accuracy"])
        rows.append({"defense": defense, "attack": f"min({pair[0]}, {pair[1]})", "threat": threat,
                     **{f"robust_{k}": v for k, v in minimum.items()}})
        both = robust(both_sets[0]) & robust(both_sets[1])
        rows.append({"defense": defense, "attack": "worst case per image", "threat": threat,
                     **{f"robust_{k}": v for k, v in masking.accuracy(both).items()}})
    return rows


def masking_checks(sets, transfer, threat, settings, defense):
    """The gradient-masking checks at `threat` (attacks.masking) of `defense` from the loaded sets and the transfer
    evaluation: one row per check, with the number it casts doubt on."""
    check = settings["checks"]["attack"]
    eps_large = settings["threats"][threat]["large_eps"]
    rows = []
    for attack in settings["attacks"]:
        if ("undefended", attack) in sets:
            undefended = sets[("undefended", attack)]
            rows.append(masking.undefended_falls(robust(undefended), undefended["clean_correct"], attack))
    reported, large = sets[(defense, check)], sets[(defense, check + LARGE)]
    rows.append(masking.large_budget_breaks(robust(large), large["clean_correct"], eps_large))
    rows.append(masking.more_iterations_agree(robust(reported), robust(sets[(defense, check + MORE)]),
                                              reported["clean_correct"], settings["checks"]["iterations_factor"]))
    strongest = min((a for a in settings["attacks"] if (defense, a) in sets),
                    key=lambda a: robust(sets[(defense, a)]).mean())
    strongest_set = sets[(defense, strongest)]
    aligned = _align(strongest_set["idx"], transfer["idx"], transfer["adv_correct"])
    rows.append(masking.transfer_not_stronger(robust(strongest_set), aligned, strongest_set["clean_correct"]))
    rows.append(masking.flip_rate(transfer["clean_label_a"], transfer["clean_label_b"]))
    return [{"threat": threat, **row.row()} for row in rows]


def _align(order, idx, values):
    """values (indexed like idx) in the order of `order` (both lists of dataset indices of the same images)."""
    lookup = {int(i): v for i, v in zip(idx, values)}
    if sorted(lookup) != sorted(int(i) for i in order):
        raise SetError("the transfer evaluation and the adaptive set hold different images")
    return np.array([lookup[int(i)] for i in order])


TRANSFER_KEYS = ("idx", "label", "adv_correct", "clean_label_a", "clean_label_b")


def load_transfer(results_dir, defense, attack, threat, *, dataset_dir):
    """The transfer evaluation of `defense` on the set `attack` made against the undefended classifier at `threat`
    (evaluate_set's arrays, under results/<preset>), its images checked against the dataset (`clean_images`)."""
    path = Path(results_dir) / "evaluations" / defense / "from-undefended" / attack / f"{threat}.npz"
    try:
        arrays = read_npz(path)
    except DamagedFileError as error:
        raise SetError(f"{error}; delete it and rerun the evaluate job that makes it") from None
    missing = [key for key in TRANSFER_KEYS if key not in arrays or len(arrays[key]) != len(arrays.get("idx", ()))]
    if missing:
        raise SetError(f"{path}: no (or ragged) {', '.join(missing)}; delete it and rerun the evaluate job")
    clean_images(data.load_dataset(dataset_dir).eval_split, arrays["idx"], arrays["label"], path)
    return arrays


def worst_case(sets, defense, attacks):
    """Per image: robust (`robust`) under every attack of `attacks` that has a stored set on `defense`."""
    runs = [robust(sets[(defense, attack)]) for attack in attacks if (defense, attack) in sets]
    if not runs:
        raise SetError(f"no set of {defense} was made by any of the attacks {list(attacks)}")
    return np.logical_and.reduce(runs)


def clean_correct(sets, defense, attacks):
    """Per image: correctly classified clean by `defense` in some stored set of `attacks` (a randomized defense can
    differ between sets); the images `worst_case` can call robust, the evidence of a claim about it."""
    runs = [sets[(defense, attack)]["clean_correct"] for attack in attacks if (defense, attack) in sets]
    if not runs:
        raise SetError(f"no set of {defense} was made by any of the attacks {list(attacks)}")
    return np.logical_or.reduce(runs)


# ---------------------------------------------------------------------------------------------------------------
# The claims (diffrobust.claims rows shared by DiffPure's and RDC's)
# ---------------------------------------------------------------------------------------------------------------

def masking_claim(paper, defense, threat, check_rows, link):
    """The masking checks of `defense` at `threat` as one claim row: fails when a check failed, inconclusive when
    none failed but one had nothing to check (no image correctly classified clean), holds when every check passed
    (the row names them and the images they rest on, as attacks.masking.summary does in the report)."""
    from diffrobust import claims as c

    verdict = (c.FAILS if masking.failed(check_rows) else c.INCONCLUSIVE if masking.inconclusive(check_rows)
               else c.HOLDS)
    return c.Claim(paper, f"the attacks on {defense} pass the checks against gradient masking ({threat})",
                   c.NOT_KNOWN, "our checks (Carlini et al. 2019, Athalye et al. 2018), not the paper's",
                   masking.summary(check_rows).replace("**", ""), None, None, None, verdict, link)


def paired_claim(paper, claim, better, worse, names, published, provenance, link, *, clean):
    """A row for "`better` beats `worse`" (per-image robustness of two defenses on the same images): the paired
    difference better - worse with its interval (attacks.masking.paired_difference), holds when it is above 0;
    inconclusive when either defense classifies no image correctly clean (`clean`: their per-image clean
    correctness, in the order of `names`)."""
    from diffrobust import claims as c

    diff = masking.paired_difference(worse, better)
    a, b = masking.accuracy(better)["accuracy"], masking.accuracy(worse)["accuracy"]
    ours = (f"{names[0]} {a:.3f} − {names[1]} {b:.3f} = "
            f"{c.interval_text(diff['difference'], diff['ci_low'], diff['ci_high'], signed=True)} "
            f"({diff['images']} images, paired)")
    verdict, ours = c.on_evidence(c.above(diff["ci_low"], diff["ci_high"]), ours, dict(zip(names, clean)))
    return c.Claim(paper, claim, published, provenance, ours, diff["difference"], diff["ci_low"], diff["ci_high"],
                   verdict, link)


def accuracy_claim(paper, claim, correct, entry, link, headline=True, *, clean, defense):
    """A row for a published robust accuracy `entry` (published_values.yaml) against ours (per-image outcomes):
    holds when the published value lies inside our exact 95% interval; inconclusive when `defense` classifies no
    image correctly clean (`clean`: its per-image clean correctness)."""
    from diffrobust import claims as c

    ours = masking.accuracy(correct)
    value = entry["values"]["robust"]
    verdict, text = c.on_evidence(
        c.reproduces(value, ours["ci_low"], ours["ci_high"]),
        f"{c.interval_text(ours['accuracy'], ours['ci_low'], ours['ci_high'])} ({ours['images']} images)",
        {defense: clean})
    return c.Claim(paper, claim, f"{value:.4f}", c.provenance(entry), text, ours["accuracy"], ours["ci_low"],
                   ours["ci_high"], verdict, link, headline)
