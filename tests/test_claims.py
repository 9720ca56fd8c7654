"""Verdicts need evidence (issue 21, item 4): a claim about robust accuracy that rests on no correctly classified
clean image is inconclusive and says why, in the shared verdict code (`claims.on_evidence`) that DiffPure's and RDC's
claims and the summary use; claims with evidence keep their verdicts. Synthetic per-image outcomes throughout."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from diffrobust import claims
from diffrobust.stages import diffpure, rdc
from diffrobust.stages.robustness import accuracy_claim, paired_claim
from synthetic_sets import DIFFPURE, N, RDC, outcome, transfer

KNOWN = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/published_values.yaml").read_text())


NEVER_RIGHT = {"idx": np.arange(N), "attack_robust": np.zeros(N, bool), "adv_correct": np.zeros(N, bool),
               "clean_correct": np.zeros(N, bool)}  # the smoke classifier before issue 21: 0 of its images right


def test_no_evidence_names_each_defense_that_classifies_no_image_correctly_clean():
    assert claims.no_evidence({"RDC": [True, False], "undefended": [False, True]}) == ""
    assert claims.no_evidence({"RDC": [True, False], "undefended": [False, False]}) == (
        "no image is correctly classified clean by undefended (0 of 2 images)")
    assert claims.no_evidence({"RDC": np.zeros(4, bool), "DiffPure": np.zeros(4, bool)}) == (
        "no image is correctly classified clean by RDC (0 of 4 images) or DiffPure (0 of 4 images)")
    assert claims.on_evidence("fails", "0.1", {"RDC": [True]}) == ("fails", "0.1")
    assert claims.on_evidence("holds", "0.000", {"RDC": [False] * 3}) == (
        "inconclusive", "0.000; inconclusive: no image is correctly classified clean by RDC (0 of 3 images)")


def test_a_paired_claim_on_a_defense_that_is_never_right_is_inconclusive_and_says_why():
    robust, none = np.array([1] * 6 + [0] * 2, bool), np.zeros(N, bool)
    normal = paired_claim("RDC", "RDC beats adversarial", robust, none, ("RDC", "adversarial"), "not known", "",
                          "", clean=(np.ones(N, bool), np.array([1] + [0] * 7, bool)))
    assert normal.verdict == "holds" and normal.estimate == pytest.approx(0.75)  # 1 of 8 right clean: evidence
    empty = paired_claim("RDC", "RDC beats adversarial", robust, none, ("RDC", "adversarial"), "not known", "", "",
                         clean=(np.ones(N, bool), np.zeros(N, bool)))
    assert empty.verdict == "inconclusive" and empty.estimate == pytest.approx(0.75)  # the number stays shown
    assert empty.ours.endswith("; inconclusive: no image is correctly classified clean by adversarial (0 of 8 images)")


def test_a_published_accuracy_is_not_reproduced_by_a_defense_that_is_never_right():
    entry = {"values": {"robust": 0.4453}, "tag": "S", "source": "x"}
    four = np.zeros(4, bool)  # 0 of 4: the exact interval [0, 0.60] holds 0.4453, on no evidence
    row = accuracy_claim("RDC", "c", four, entry, "", clean=four, defense="RDC")
    assert (row.estimate, row.verdict) == (0.0, "inconclusive")
    assert "no image is correctly classified clean by RDC (0 of 4 images)" in row.ours
    right = accuracy_claim("RDC", "c", four, entry, "", clean=np.array([1, 0, 0, 0], bool), defense="RDC")
    assert right.verdict == "holds"  # 1 of 4 right clean, none robust: the interval still holds 0.4453


def never_right_diffpure_sets():
    return {"linf": {(defense, attack): NEVER_RIGHT for defense in ("undefended", "diffpure")
                     for attack in ("standard", "rand", "rand-large", "rand-more")}}


def test_diffpure_with_no_correctly_classified_clean_image_claims_nothing():
    never = {"idx": np.arange(N), "adv_correct": np.zeros(N, bool), "clean_label_a": np.zeros(N),
             "clean_label_b": np.zeros(N)}
    beats, checks, *headlines = diffpure.claims(never_right_diffpure_sets(), {"linf": never}, DIFFPURE,
                                                dataset="cifar10", known=KNOWN)
    assert beats.verdict == "inconclusive" and beats.estimate == 0.0
    assert ("inconclusive: no image is correctly classified clean by DiffPure (0 of 8 images) or undefended "
            "(0 of 8 images)") in beats.ours
    assert checks.verdict == "inconclusive"  # "large budget breaks the defense" on a defense that is never right
    assert checks.ours.startswith("Inconclusive, nothing to check: linf undefended classifier falls under standard "
                                  "(on 0 of 8 images correctly classified clean)")
    assert "linf large budget breaks the defense (on 0 of 8 images correctly classified clean)" in checks.ours
    # paper scale: linf measured (0 of 8, an interval that misses 0.7129: "fails" without evidence), l2 not run
    assert [row.verdict for row in headlines] == ["inconclusive", "not run at this preset"]


def rdc_sets(undefended, adversarial, rdc_set, diffpure_set):
    sets = {"linf": {("undefended", "apgd_dlr"): undefended, ("adversarial", "apgd_dlr"): adversarial,
                     ("rdc", "apgd_dlr"): rdc_set, ("rdc", "apgd_dlr-large"): outcome([0] * N),
                     ("rdc", "apgd_dlr-more"): rdc_set}}
    return sets, {("diffpure", "standard"): diffpure_set, ("diffpure", "rand"): diffpure_set}


def test_rdc_ordering_zero_equals_zero_equals_zero_is_inconclusive_not_holds():
    sets, dp = rdc_sets(NEVER_RIGHT, NEVER_RIGHT, NEVER_RIGHT, NEVER_RIGHT)
    sets["linf"][("rdc", "apgd_dlr-large")] = NEVER_RIGHT
    order, beats, checks, headline = rdc.claims(sets, {"linf": transfer()}, RDC, diffpure_sets={"linf": dp},
                                                dataset="mnist", known=KNOWN)
    assert order.claim.startswith("RDC ≥ DiffPure ≥ undefended") and order.verdict == "inconclusive"
    assert order.ours.startswith("rdc 0.000 [0.00, 0.37], diffpure 0.000 [0.00, 0.37], undefended 0.000")
    assert order.ours.endswith("inconclusive: no image is correctly classified clean by rdc (0 of 8 images) or "
                               "diffpure (0 of 8 images) or undefended (0 of 8 images)")
    assert beats.verdict == "inconclusive" and checks.verdict == "inconclusive"
    assert headline.verdict == "not run at this preset"  # mnist: the paper-scale number is not measured here
    # the summary's counts follow: nothing holds for RDC
    assert claims.counts([order, beats, checks, headline]).loc["RDC"].tolist() == [0, 0, 3, 1]


def test_rdc_claims_with_some_correctly_classified_images_keep_their_verdicts():
    some = outcome([0] * N)
    some["clean_correct"] = np.array([1, 1, 1] + [0] * 5, bool)  # the undefended classifier: 3 of 8 right clean
    adversarial = outcome([1] * 2 + [0] * 6)
    sets, dp = rdc_sets(some, adversarial, outcome([1] * 6 + [0] * 2), outcome([1] * 5 + [0] * 3))
    order, beats, checks, _ = rdc.claims(sets, {"linf": transfer()}, RDC, diffpure_sets={"linf": dp},
                                         dataset="mnist", known=KNOWN)
    assert order.verdict == "holds" and "inconclusive" not in order.ours  # 0.75 >= 0.625 >= 0
    assert beats.verdict == "holds" and checks.verdict == "holds"
    assert "undefended classifier falls under apgd_dlr" in checks.ours and "3 of 8 images" in checks.ours
    sets, dp = rdc_sets(some, adversarial, outcome([1] * 6 + [0] * 2), outcome([1] * 7 + [0]))
    assert rdc.claims(sets, {"linf": transfer()}, RDC, diffpure_sets={"linf": dp}, dataset="mnist",
                      known=KNOWN)[0].verdict == "fails"  # DiffPure ahead: 0.75 < 0.875


def densepure_cells(dds_predict, dense_predict):
    """DensePure >= DDS per radius on N images of label 0 (both certify every prediction at radius 0.3)."""
    from diffrobust.stages import densepure

    def table(predict):
        return pd.DataFrame({"idx": np.arange(N), "label": 0, "predict": predict, "radius": 0.3, "correct": 0,
                             "time": 0.1})

    tables = {"dds": table(dds_predict), "densepure": table(dense_predict)}
    rows = densepure.claims(lambda method, sigma, k: tables[method], sigmas=[0.5], radii=[0.0, 0.25], votes=3,
                            n=1000, alpha=0.001, dataset="mnist", known=KNOWN)
    return [row for row in rows if not row.headline]


def test_densepure_at_least_dds_on_images_neither_gets_right_is_inconclusive():
    wrong = [6] * N  # the smoke run before issue 21: DensePure and DDS right on 0 of its 2 images
    cells = densepure_cells(wrong, wrong)
    assert [cell.verdict for cell in cells] == ["inconclusive", "inconclusive"]  # 0 >= 0
    assert cells[0].ours.endswith("; inconclusive: no image is correctly classified clean by DensePure or DDS "
                                  "(0 of 8 images)")
    # DDS right on one image, DensePure on none: evidence; -1/8 with a paired interval that holds 0
    cells = densepure_cells([0] + [6] * (N - 1), wrong)
    assert [cell.verdict for cell in cells] == ["inconclusive", "inconclusive"] and "no image" not in cells[0].ours
    assert [cell.verdict for cell in densepure_cells([0] * N, wrong)] == ["fails", "fails"]
    assert [cell.verdict for cell in densepure_cells(wrong, [0] * N)] == ["holds", "holds"]
