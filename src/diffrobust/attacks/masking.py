"""Checks against gradient masking, run and reported with every evaluation (Carlini et al. 2019, "On evaluating
adversarial robustness"; Athalye et al. 2018): an attack that fails them measures its own weakness, not the defense.

Each check takes per-image outcomes (bool arrays, True = still correct) and returns a `Check` row: its value, the
threshold it is judged against, whether it passed, and which reported number it casts doubt on when it fails.
Intervals are exact (Clopper–Pearson) 95% intervals over images; differences on the same images are paired.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np

from diffrobust.certify import clopper_pearson_interval

UNDEFENDED_MAX = 0.05   # "the undefended classifier falls to about 0%"
LARGE_BUDGET_MAX = 0.10  # "a large budget drives the defense to about 0%"


@dataclass
class Check:
    name: str
    what: str
    value: float
    threshold: str
    passed: bool | None   # None: inconclusive, nothing to check (no image correctly classified clean)
    rests_on: str         # the images the check rests on, e.g. "3 of 4 images correctly classified clean"
    casts_doubt_on: str

    def row(self):
        return asdict(self)


def accuracy(correct, confidence=0.95):
    """{'accuracy', 'ci_low', 'ci_high', 'images'} of a bool array, with the exact binomial interval."""
    correct = np.asarray(correct, dtype=bool)
    k, n = int(correct.sum()), int(correct.size)
    if n == 0:
        raise ValueError("no images")
    low, high = clopper_pearson_interval(k, n, confidence)
    return {"accuracy": k / n, "ci_low": low, "ci_high": high, "images": n}


def paired_difference(a, b, confidence=0.95):
    """Mean of b - a over the same images, with a normal interval on the per-image differences:
    {'difference', 'ci_low', 'ci_high', 'images'} (the interval is nan for one image, zero-width when all agree)."""
    from scipy.stats import norm  # here, not at the top: every attack job imports this module, few call this

    a, b = (np.asarray(v, dtype=float) for v in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes of different lengths ({a.size} and {b.size})")
    diff = b - a
    n = diff.size
    half = norm.ppf(0.5 + confidence / 2) * diff.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return {"difference": float(diff.mean()), "ci_low": float(diff.mean() - half),
            "ci_high": float(diff.mean() + half), "images": n}


def rests_on(clean_correct):
    """"3 of 4 images correctly classified clean": the images an accuracy check can say anything about (an image
    the classifier gets wrong clean is "not robust" whatever the attack does)."""
    clean_correct = np.asarray(clean_correct, dtype=bool)
    return f"{int(clean_correct.sum())} of {clean_correct.size} images correctly classified clean"


def _judged(passed, clean_correct):
    """A check's verdict: `passed`, or None (inconclusive) when no image is correctly classified clean: the check
    then compares accuracies that are 0 whatever the attack, so it would pass (or fail) on no evidence."""
    return bool(passed) if np.any(clean_correct) else None


def undefended_falls(undefended_correct, clean_correct, attack=None):
    """The undefended classifier under `attack` (named in the check, one check per attack run on it) must fall;
    `clean_correct`: its clean correctness on the same images."""
    value = accuracy(undefended_correct)["accuracy"]
    return Check("undefended classifier falls" + (f" under {attack}" if attack else ""),
                 f"accuracy of the undefended classifier under {attack or 'the same attack'}", value,
                 f"<= {UNDEFENDED_MAX:.0%}", _judged(value <= UNDEFENDED_MAX, clean_correct),
                 rests_on(clean_correct), "every robust accuracy (the attack may be too weak even without a defense)")


def large_budget_breaks(large_correct, clean_correct, eps_large):
    """The defense at the large budget must fall; `clean_correct`: its clean correctness on the same images."""
    value = accuracy(large_correct)["accuracy"]
    return Check("large budget breaks the defense", f"accuracy of the defense at eps {eps_large:g}", value,
                 f"<= {LARGE_BUDGET_MAX:.0%}", _judged(value <= LARGE_BUDGET_MAX, clean_correct),
                 rests_on(clean_correct), "the robust accuracy at the nominal budget (gradients may be masked)")


def more_iterations_agree(correct, correct_more, clean_correct, factor=2):
    """Accuracy under `factor` times the iterations must not fall outside the interval of the reported one: if it
    falls, the reported attack had not converged; if it rises, the attack is too noisy to trust. `clean_correct`:
    the defense's clean correctness on the same images."""
    reported, more = accuracy(correct), accuracy(correct_more)["accuracy"]
    passed = reported["ci_low"] <= more <= reported["ci_high"]
    return Check(f"{factor}x iterations agree", f"accuracy with {factor}x the iterations (reported "
                 f"{reported['accuracy']:.3f}, interval [{reported['ci_low']:.3f}, {reported['ci_high']:.3f}])",
                 more, "inside the reported interval", _judged(passed, clean_correct), rests_on(clean_correct),
                 "the robust accuracy of this attack (not converged)")


def transfer_not_stronger(adaptive_correct, transfer_correct, clean_correct):
    """A transfer attack (examples made against the undefended classifier) must not beat the adaptive attack
    beyond the paired interval: if it does, the adaptive attack's gradients are worse than no gradients.
    `clean_correct`: the defense's clean correctness on the same images."""
    diff = paired_difference(adaptive_correct, transfer_correct)  # transfer - adaptive
    passed = not diff["ci_high"] < 0
    return Check("transfer not stronger", "accuracy under transfer minus accuracy under the adaptive attack "
                 f"(paired interval [{diff['ci_low']:.3f}, {diff['ci_high']:.3f}])", diff["difference"],
                 "interval not entirely below 0", _judged(passed, clean_correct), rests_on(clean_correct),
                 "the adaptive robust accuracy (gradients may be masked)")


def flip_rate(labels_a, labels_b):
    """How often the defense's prediction differs between two forwards of the same inputs (its randomness); an
    informational row: a high rate means single-forward evaluations are noisy."""
    a, b = np.asarray(labels_a), np.asarray(labels_b)
    value = float((a != b).mean())
    return Check("prediction flips between two forwards", "fraction of clean images whose label changes between "
                 "two forwards (the defense's randomness)", value, "reported", True,
                 f"{a.size} images (right or wrong)", "single-forward evaluations (AutoAttack judges success by one "
                 "forward)")


def failed(rows):
    """The rows (`Check.row()`) of the checks that failed (not those with nothing to check)."""
    return [r for r in rows if r["passed"] is False]


def inconclusive(rows):
    """The rows (`Check.row()`) of the checks with nothing to check (no image correctly classified clean)."""
    return [r for r in rows if r["passed"] is None]


def summary(rows):
    """One line for a report (rows as `Check.row()` gives them, with a `threat`): each failed check, its value, what
    was wanted, the images it rests on and the number it casts doubt on; each check with nothing to check (no image
    correctly classified clean); or, when every check passed, the images they rest on."""
    def name(r):
        return f"{r.get('threat', '')} {r['name']}".strip()

    parts = []
    if failed(rows):
        parts.append("**Failed:** " + "; ".join(f"{name(r)} ({r['value']:.3f}, wanted {r['threshold']}, on "
                                              f"{r['rests_on']}): casts doubt on {r['casts_doubt_on']}"
                                              for r in failed(rows)))
    if inconclusive(rows):
        parts.append("**Inconclusive, nothing to check:** " + "; ".join(f"{name(r)} (on {r['rests_on']})"
                                                                      for r in inconclusive(rows)))
    if parts:
        return " ".join(parts)
    judged = [r for r in rows if r["threshold"] != "reported"]  # the informational rows judge nothing
    groups = {}
    for r in judged:
        groups.setdefault(r["rests_on"], []).append(name(r))
    if len(groups) <= 1:
        return "**All checks passed**" + "".join(f", each on {rests}" for rests in groups) + "."
    return "**All checks passed**, on " + "; ".join(f"{rests} ({', '.join(names)})"
                                                    for rests, names in groups.items()) + "."


def table(rows):
    """The checks as a report shows them: a DataFrame indexed by threat and check, values to 3 decimals, `passed`
    as yes / no / "nothing to check" and the images each rests on."""
    import pandas as pd

    frame = pd.DataFrame(rows)[["threat", "name", "value", "threshold", "passed", "rests_on", "what",
                                "casts_doubt_on"]]
    frame["value"] = frame["value"].map(lambda v: f"{v:.3f}")
    frame["passed"] = frame["passed"].map({True: "yes", False: "no", None: "nothing to check"})
    return frame.set_index(["threat", "name"])
