"""The checks against gradient masking rest on the images correctly classified clean (issue 21, item 4): each check
says how many, and a check with none to check is inconclusive (`passed` None), never "passed" on no evidence."""

import numpy as np

from diffrobust.attacks import masking
from diffrobust.stages import robustness

NONE_RIGHT, THREE_RIGHT = [False] * 4, [True, True, True, False]


def test_each_check_with_no_image_correctly_classified_clean_is_inconclusive():
    checks = [masking.undefended_falls(NONE_RIGHT, NONE_RIGHT, "rand"),
              masking.large_budget_breaks(NONE_RIGHT, NONE_RIGHT, 0.4),  # 0%: "breaks" a defense never right
              masking.more_iterations_agree(NONE_RIGHT, NONE_RIGHT, NONE_RIGHT),
              masking.transfer_not_stronger(NONE_RIGHT, NONE_RIGHT, NONE_RIGHT)]
    assert [check.passed for check in checks] == [None] * 4
    assert {check.rests_on for check in checks} == {"0 of 4 images correctly classified clean"}


def test_a_check_with_images_to_check_is_judged_as_before_and_says_how_many():
    falls = masking.undefended_falls(NONE_RIGHT, THREE_RIGHT, "rand")
    assert falls.passed is True and falls.rests_on == "3 of 4 images correctly classified clean"
    assert masking.large_budget_breaks([True, False, False, False], THREE_RIGHT, 0.4).passed is False  # 25% > 10%
    assert masking.undefended_falls([True] + [False] * 3, THREE_RIGHT).passed is False
    # the informational row judges nothing and rests on every image
    assert masking.flip_rate([1, 2, 3, 4], [1, 2, 3, 4]).rests_on == "4 images (right or wrong)"


def rows(*checks, threat="linf"):
    return [{**check.row(), "threat": threat} for check in checks]


def test_the_summary_and_table_say_nothing_to_check_and_a_failure_still_wins():
    empty = masking.large_budget_breaks(NONE_RIGHT, NONE_RIGHT, 0.4)
    passing = masking.undefended_falls(NONE_RIGHT, THREE_RIGHT, "rand")
    failing = masking.undefended_falls([True] * 4, [True] * 4, "standard")
    text = masking.summary(rows(passing, empty))
    assert text == ("**Inconclusive, nothing to check:** linf large budget breaks the defense (on 0 of 4 images "
                    "correctly classified clean)")
    assert masking.summary(rows(passing, failing, empty)).startswith(
        "**Failed:** linf undefended classifier falls under standard (1.000, wanted <= 5%, on 4 of 4 images "
        "correctly classified clean)")
    assert masking.summary(rows(passing, failing)).count("Inconclusive") == 0
    assert masking.summary(rows(passing, masking.large_budget_breaks(NONE_RIGHT, [True] * 4, 0.4))) == (
        "**All checks passed**, on 3 of 4 images correctly classified clean (linf undefended classifier falls under "
        "rand); 4 of 4 images correctly classified clean (linf large budget breaks the defense).")
    table = masking.table(rows(passing, empty))
    assert table["passed"].tolist() == ["yes", "nothing to check"]
    assert table["rests_on"].tolist() == ["3 of 4 images correctly classified clean",
                                          "0 of 4 images correctly classified clean"]
    verdicts = [robustness.masking_claim("RDC", "RDC", "linf", rows(*checks), "").verdict
                for checks in [(passing,), (passing, empty), (passing, failing, empty)]]
    assert verdicts == ["holds", "inconclusive", "fails"]


def stored(clean, robust):
    n = len(clean)
    return {"idx": np.arange(n), "clean_correct": np.asarray(clean, bool), "attack_robust": np.asarray(robust, bool),
            "adv_correct": np.asarray(robust, bool)}


def test_the_stage_checks_rest_on_each_set_s_own_clean_images():
    """The smoke run before issue 21: the undefended classifier right on 3 of 4 images, the defense on none."""
    settings = {"attacks": {"rand": {}}, "checks": {"attack": "rand", "iterations_factor": 2},
                "threats": {"linf": {"large_eps": 0.4}}}
    sets = {("undefended", "rand"): stored(THREE_RIGHT, NONE_RIGHT), ("rdc", "rand"): stored(NONE_RIGHT, NONE_RIGHT),
            ("rdc", "rand-large"): stored(NONE_RIGHT, NONE_RIGHT), ("rdc", "rand-more"): stored(NONE_RIGHT, NONE_RIGHT)}
    transfer = {"idx": np.arange(4)[::-1], "adv_correct": np.zeros(4, bool), "clean_label_a": np.zeros(4),
                "clean_label_b": np.zeros(4)}
    checks = robustness.masking_checks(sets, transfer, "linf", settings, "rdc")
    assert [(row["name"], row["passed"], row["rests_on"][:6]) for row in checks] == [
        ("undefended classifier falls under rand", True, "3 of 4"), ("large budget breaks the defense", None, "0 of 4"),
        ("2x iterations agree", None, "0 of 4"), ("transfer not stronger", None, "0 of 4"),
        ("prediction flips between two forwards", True, "4 imag")]
