"""Checks against gradient masking, run and reported with every evaluation (Carlini et al. 2019, "On evaluating
adversarial robustness"; Athalye et al. 2018): an attack that fails them measures its own weakness, not the defense.

Each check takes per-image outcomes (bool arrays, True = still correct) and returns a `Check` row: its value, the
threshold it is judged against, whether it passed, and which reported number it casts doubt on when it fails.
Intervals are exact (Clopper–Pearson) 95% intervals over images; differences on the same images are paired.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm

from diffrobust.certify import clopper_pearson_interval

UNDEFENDED_MAX = 0.05   # "the undefended classifier falls to about 0%"
LARGE_BUDGET_MAX = 0.10  # "a large budget drives the defense to about 0%"


@dataclass
class Check:
    name: str
    what: str
    value: float
    threshold: str
    passed: bool
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
    a, b = (np.asarray(v, dtype=float) for v in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes of different lengths ({a.size} and {b.size})")
    diff = b - a
    n = diff.size
    half = norm.ppf(0.5 + confidence / 2) * diff.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return {"difference": float(diff.mean()), "ci_low": float(diff.mean() - half),
            "ci_high": float(diff.mean() + half), "images": n}


def undefended_falls(undefended_correct, attack=None):
    """The undefended classifier under `attack` (named in the check, one check per attack run on it) must fall."""
    value = accuracy(undefended_correct)["accuracy"]
    return Check("undefended classifier falls" + (f" under {attack}" if attack else ""),
                 f"accuracy of the undefended classifier under {attack or 'the same attack'}", value,
                 f"<= {UNDEFENDED_MAX:.0%}", value <= UNDEFENDED_MAX,
                 "every robust accuracy (the attack may be too weak even without a defense)")


def large_budget_breaks(large_correct, eps_large):
    value = accuracy(large_correct)["accuracy"]
    return Check("large budget breaks the defense", f"accuracy of the defense at eps {eps_large:g}", value,
                 f"<= {LARGE_BUDGET_MAX:.0%}", value <= LARGE_BUDGET_MAX,
                 "the robust accuracy at the nominal budget (gradients may be masked)")


def more_iterations_agree(correct, correct_more, factor=2):
    """Accuracy under `factor` times the iterations must not fall outside the interval of the reported one: if it
    falls, the reported attack had not converged; if it rises, the attack is too noisy to trust."""
    reported, more = accuracy(correct), accuracy(correct_more)["accuracy"]
    passed = reported["ci_low"] <= more <= reported["ci_high"]
    return Check(f"{factor}x iterations agree", f"accuracy with {factor}x the iterations (reported "
                 f"{reported['accuracy']:.3f}, interval [{reported['ci_low']:.3f}, {reported['ci_high']:.3f}])",
                 more, "inside the reported interval", passed, "the robust accuracy of this attack (not converged)")


def transfer_not_stronger(adaptive_correct, transfer_correct):
    """A transfer attack (examples made against the undefended classifier) must not beat the adaptive attack
    beyond the paired interval: if it does, the adaptive attack's gradients are worse than no gradients."""
    diff = paired_difference(adaptive_correct, transfer_correct)  # transfer - adaptive
    passed = not diff["ci_high"] < 0
    return Check("transfer not stronger", "accuracy under transfer minus accuracy under the adaptive attack "
                 f"(paired interval [{diff['ci_low']:.3f}, {diff['ci_high']:.3f}])", diff["difference"],
                 "interval not entirely below 0", passed, "the adaptive robust accuracy (gradients may be masked)")


def flip_rate(labels_a, labels_b):
    """How often the defense's prediction differs between two forwards of the same inputs (its randomness); an
    informational row: a high rate means single-forward evaluations are noisy."""
    a, b = np.asarray(labels_a), np.asarray(labels_b)
    value = float((a != b).mean())
    return Check("prediction flips between two forwards", "fraction of clean images whose label changes between "
                 "two forwards (the defense's randomness)", value, "reported", True,
                 "single-forward evaluations (AutoAttack judges success by one forward)")


def summary(rows):
    """One line for a report: 'All checks passed.' or each failed check (rows as `Check.row()` gives them, with a
    `threat`), its value, what was wanted and the number it casts doubt on."""
    failed = [r for r in rows if not r["passed"]]
    if not failed:
        return "**All checks passed.**"
    return "**Failed:** " + "; ".join(f"{r.get('threat', '')} {r['name']} ({r['value']:.3f}, wanted {r['threshold']}): "
                                      f"casts doubt on {r['casts_doubt_on']}" for r in failed)


def table(rows):
    """The checks as a report shows them: a DataFrame indexed by threat and check, values to 3 decimals."""
    import pandas as pd

    frame = pd.DataFrame(rows)[["threat", "name", "value", "threshold", "passed", "what", "casts_doubt_on"]]
    frame["value"] = frame["value"].map(lambda v: f"{v:.3f}")
    return frame.set_index(["threat", "name"])
