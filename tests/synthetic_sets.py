"""Synthetic per-image outcomes of stored adversarial sets, for the claim and summary tests: N images, the arrays
the claims read (`robustness.robust`, clean correctness, the transfer evaluation), and tiny DiffPure / RDC blocks."""

import numpy as np

N = 8  # images

THREATS = {"linf": {"eps": 0.1, "large_eps": 0.4, "t_star": 0.1}}
DIFFPURE = {"threats": THREATS, "attacks": {"standard": {}, "rand": {}},
            "checks": {"attack": "rand", "iterations_factor": 2}}
RDC = {"threats": THREATS, "attacks": {"apgd_dlr": {}}, "defenses": ["undefended", "adversarial", "rdc"],
       "checks": {"attack": "apgd_dlr", "iterations_factor": 2}}


def outcome(robust):
    """A stored adversarial set of N images, each robust or not (`robustness.robust`), all clean-correct."""
    return {"idx": np.arange(N), "attack_robust": np.asarray(robust, dtype=bool), "adv_correct": np.ones(N, bool),
            "clean_correct": np.ones(N, bool)}


def transfer():
    """A transfer evaluation of N images: all correct, two identical clean forwards (no flips)."""
    return {"idx": np.arange(N), "adv_correct": np.ones(N, bool), "clean_label_a": np.zeros(N),
            "clean_label_b": np.zeros(N)}
