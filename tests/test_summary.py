"""The summary of every claim (notebooks/summary.py): the claim rows of each paper from tiny synthetic results, their
verdicts and numbers, the published values they cite (unknown ones stay unknown), and its place in the DAG."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from diffrobust import claims
from diffrobust.config import available_presets, load_config
from diffrobust.reports import parameter_names, render_notebook
from diffrobust.stages import densepure, diffpure, pixel_barrier, rdc
from synthetic_sets import DIFFPURE, N, RDC, outcome, transfer

REPO = Path(__file__).resolve().parents[1]
KNOWN = yaml.safe_load((REPO / "config/published_values.yaml").read_text())


# --- the row type and the verdict rules ---------------------------------------------------------------------------

def test_verdict_rules_read_the_whole_interval():
    assert claims.at_least(0.0, 0.1) == "holds" and claims.at_least(-0.01, 0.1) == "inconclusive"
    assert claims.at_least(-0.2, -0.01) == "fails" and claims.at_least(float("nan"), float("nan")) == "inconclusive"
    assert claims.above(0.0, 0.1) == "inconclusive" and claims.above(0.01, 0.1) == "holds"
    assert claims.above(-0.1, 0.0) == "fails"
    assert claims.reproduces(0.71, 0.6, 0.8) == "holds" and claims.reproduces(0.71, 0.72, 0.9) == "fails"
    with pytest.raises(ValueError, match="unknown verdict 'maybe'"):
        claims.Claim("p", "c", "not known", "", "", None, None, None, "maybe", "")


def test_the_html_table_escapes_and_links_each_row_to_its_report():
    row = claims.Claim("RDC", "RDC ≥ <DiffPure>", "not known", "S: x", "0.5", 0.5, 0.25, 0.75, "holds",
                       claims.anchor("rdc_table", "The ordering: RDC ≥ DiffPure"))
    html = claims.html_table([row])
    assert "RDC ≥ &lt;DiffPure&gt;" in html and "[0.250, 0.750]" in html
    assert '<a href="rdc_table.html#The-ordering:-RDC-%E2%89%A5-DiffPure">rdc_table.html</a>' in html
    assert '<b class="verdict-holds">holds</b>' in html


# --- DensePure / DDS ----------------------------------------------------------------------------------------------

def certification(radii, predict=None):
    """A merged certification table of N images (label 0; radius -1 = abstained)."""
    predict = [0] * N if predict is None else predict
    return pd.DataFrame({"idx": np.arange(N) * 25, "label": 0, "predict": predict, "radius": radii,
                         "correct": 0, "time": 0.1})


def densepure_rows(dataset, dense_radii, dds_radii=(0.3,) * N, n=1000):
    tables = {("dds", 0.5, 1): certification(list(dds_radii)), ("densepure", 0.5, 3): certification(list(dense_radii))}
    return densepure.claims(lambda method, sigma, k: tables[(method, sigma, k)], sigmas=[0.5], radii=[0.0, 0.25, 2.0],
                            votes=3, n=n, alpha=0.001, dataset=dataset, known=KNOWN)


def test_densepure_at_least_dds_holds_then_fails_when_densepure_certifies_less():
    rows = densepure_rows("mnist", dense_radii=[0.3] * 6 + [0.1] * 2)  # at r = 0.25: 6/8 against DDS's 8/8
    cell = {row.claim: row for row in rows}
    at_zero = cell["DensePure (K = 3) ≥ DDS in certified accuracy at sigma 0.5, radius 0"]
    assert (at_zero.estimate, at_zero.low, at_zero.high, at_zero.verdict) == (0.0, 0.0, 0.0, "holds")
    at_quarter = cell["DensePure (K = 3) ≥ DDS in certified accuracy at sigma 0.5, radius 0.25"]
    assert at_quarter.estimate == pytest.approx(-0.25)
    # paired differences [0]*6 + [-1]*2: sd 0.4629, half-width 1.96 * sd / sqrt(8) = 0.3208
    assert at_quarter.low == pytest.approx(-0.25 - 0.3208, abs=1e-3)
    assert at_quarter.verdict == "inconclusive"
    rows = densepure_rows("mnist", dense_radii=[0.1] * N)  # DensePure certifies nothing at 0.25
    assert {r.claim: r for r in rows}[at_quarter.claim].verdict == "fails"
    # DensePure's Table 1 is not known: the cell says so, and cites the claim itself
    assert at_quarter.published == "not known"
    assert "P-text" in at_quarter.provenance and "no published values for mnist" in at_quarter.provenance


def test_a_radius_no_draw_count_can_certify_is_inconclusive_not_holds():
    rows = densepure_rows("mnist", dense_radii=[0.3] * N, n=60)  # the largest radius: 1.23 sigma = 0.62 < 2.0
    beyond = next(row for row in rows if row.claim.endswith("radius 2"))
    assert beyond.estimate == 0.0 and beyond.verdict == "inconclusive"
    assert "no radius above 0.62 can be certified with N = 60" in beyond.ours


def test_densepure_headlines_are_not_run_off_imagenet_and_measured_on_it():
    mini = [row for row in densepure_rows("mnist", dense_radii=[0.3] * N) if row.headline]
    assert [row.verdict for row in mini] == ["not run at this preset"] * 2
    assert [row.published for row in mini] == ["+0.07 (imagenet)", "0.71 (imagenet)"]
    assert all("not measured at this preset" in row.ours and row.estimate is None for row in mini)
    # ImageNet: the gain averaged over the 3 radii, per image: DensePure (1, 1, 0) - DDS (1, 1, 0) except 2 images
    # that DensePure abstains on (0, 0, 0): mean -2/3 * 2/8
    gain, dds = [row for row in densepure_rows("imagenet", dense_radii=[0.3] * 6 + [-1.0] * 2) if row.headline]
    assert gain.estimate == pytest.approx(-1 / 6) and gain.verdict == "fails"  # +0.07 is far above the interval
    # DDS at radius 0.5 (the published one; not among the table's radii): 0 of 8 images certified that far
    assert (dds.estimate, dds.low) == (0.0, 0.0) and dds.verdict == "fails"
    assert dds.provenance == "P-text: arXiv 2206.10550 abstract"


# --- DiffPure and RDC ---------------------------------------------------------------------------------------------

FIVE, NONE = [1] * 5 + [0] * 3, [0] * N


def diffpure_sets(undefended=NONE, standard=[1] * 6 + [0] * 2, rand=FIVE):
    return {"linf": {("undefended", "standard"): outcome(undefended), ("undefended", "rand"): outcome(undefended),
                     ("diffpure", "standard"): outcome(standard), ("diffpure", "rand"): outcome(rand),
                     ("diffpure", "rand-large"): outcome(NONE), ("diffpure", "rand-more"): outcome(rand)}}


def test_diffpure_beats_the_undefended_classifier_and_passes_the_checks():
    beats, checks, *headlines = diffpure.claims(diffpure_sets(), {"linf": transfer()}, DIFFPURE, dataset="mnist",
                                                known=KNOWN)
    # worst case per image over standard and rand: 5/8; paired sd of [1]*5 + [0]*3 = 0.5175, half-width 0.3586
    assert beats.estimate == pytest.approx(0.625) and beats.low == pytest.approx(0.2664, abs=1e-3)
    assert beats.verdict == "holds" and beats.published == "not known"
    assert beats.report == "diffpure_table.html#Clean-and-robust-accuracy-(ours)"
    assert checks.verdict == "holds"
    assert checks.ours == "All checks passed, each on 8 of 8 images correctly classified clean."
    # the paper-scale numbers (CIFAR-10): min(standard, rand) at l-inf and l2; not run on MNIST
    assert [(row.published, row.verdict) for row in headlines] == [("0.7129", "not run at this preset"),
                                                                   ("0.8060", "not run at this preset")]


def failed_checks(row):
    """The failed checks a masking claim row names, in order ("<threat> <check>" before each value)."""
    assert row.ours.startswith("Failed: "), row.ours
    return [part.split(" (")[0] for part in row.ours.removeprefix("Failed: ").split("; ")]


def test_an_undefended_classifier_that_does_not_fall_fails_the_checks_and_weakens_the_claim():
    beats, checks, *_ = diffpure.claims(diffpure_sets(undefended=[1] * 4 + [0] * 4), {"linf": transfer()}, DIFFPURE,
                                        dataset="mnist", known=KNOWN)
    assert checks.verdict == "fails"
    assert ("undefended classifier falls under rand (0.500, wanted <= 5%, on 8 of 8 images correctly classified clean)"
            in checks.ours)
    assert failed_checks(checks) == ["linf undefended classifier falls under standard",
                                     "linf undefended classifier falls under rand"]
    assert beats.estimate == pytest.approx(0.125) and beats.verdict == "inconclusive"


def test_diffpure_reproduces_its_published_number_only_inside_our_interval():
    def headline(rand):
        rows = diffpure.claims(diffpure_sets(rand=rand), {"linf": transfer()}, DIFFPURE, dataset="cifar10", known=KNOWN)
        return next(row for row in rows if row.headline and row.verdict != "not run at this preset")

    row = headline(FIVE)  # min(standard 6/8, rand 5/8) = 5/8, exact interval [0.245, 0.915] holds 0.7129
    assert (row.estimate, row.published, row.verdict) == (0.625, "0.7129", "holds")
    assert row.low == pytest.approx(0.2449, abs=1e-3) and "S: claims digest of the RDC paper" in row.provenance
    assert headline([1] + [0] * 7).verdict == "fails"  # 1/8: [0.003, 0.527]




def rdc_rows(dataset="mnist", rdc_robust=[1] * 6 + [0] * 2, diffpure_robust=FIVE, same_budget=True):
    sets = {"linf": {("undefended", "apgd_dlr"): outcome(NONE), ("adversarial", "apgd_dlr"): outcome([1] * 2 + [0] * 6),
                     ("rdc", "apgd_dlr"): outcome(rdc_robust), ("rdc", "apgd_dlr-large"): outcome(NONE),
                     ("rdc", "apgd_dlr-more"): outcome(rdc_robust)}}
    dp = {("diffpure", "standard"): outcome(diffpure_robust), ("diffpure", "rand"): outcome(diffpure_robust)}
    return rdc.claims(sets, {"linf": transfer()}, RDC, diffpure_sets={"linf": dp if same_budget else None},
                      dataset=dataset, known=KNOWN)


def test_rdc_ordering_holds_then_fails_when_diffpure_is_ahead():
    order, beats_at, checks, headline = rdc_rows()
    assert order.verdict == "holds" and order.published == "not known for mnist"
    assert "rdc 0.750 [0.35, 0.97], diffpure 0.625 [0.24, 0.91], undefended 0.000" in order.ours
    assert order.report.startswith("rdc_table.html#The-ordering-the-paper-claims:-RDC-%E2%89%A5-DiffPure")
    assert rdc_rows(diffpure_robust=[1] * 7 + [0])[0].verdict == "fails"
    assert rdc_rows(same_budget=False)[0].verdict == "not run at this preset"
    # RDC - adversarial, paired: per-image differences [0, 0, 1, 1, 1, 1, 0, 0]: 0.5, half-width 0.3704
    assert beats_at.estimate == pytest.approx(0.5) and beats_at.low == pytest.approx(0.1296, abs=1e-3)
    assert beats_at.verdict == "holds" and beats_at.published == "not known for mnist linf"
    assert checks.verdict == "holds"
    assert (headline.published, headline.verdict, headline.headline) == ("0.7567", "not run at this preset", True)


def test_the_rdc_masking_row_names_each_failed_check_once():
    """Two attacks run on the undefended classifier: a check each, named by its attack (not one name twice)."""
    settings = {**RDC, "attacks": {"apgd_dlr": {}, "rdc_standard": {}}}
    falls_not = outcome([1] * 4 + [0] * 4)
    sets = {("undefended", "apgd_dlr"): falls_not, ("undefended", "rdc_standard"): falls_not,
            ("adversarial", "apgd_dlr"): outcome(NONE), ("rdc", "apgd_dlr"): outcome(FIVE),
            ("rdc", "rdc_standard"): outcome(FIVE), ("rdc", "apgd_dlr-large"): outcome(NONE),
            ("rdc", "apgd_dlr-more"): outcome(FIVE)}
    rows = rdc.claims({"linf": sets}, {"linf": transfer()}, settings, diffpure_sets={"linf": None},
                      dataset="mnist", known=KNOWN)
    checks = next(row for row in rows if row.claim.startswith("the attacks on RDC pass the checks"))
    assert checks.verdict == "fails"
    names = failed_checks(checks)
    assert names == ["linf undefended classifier falls under apgd_dlr",
                     "linf undefended classifier falls under rdc_standard"]
    assert len(set(names)) == len(names)


def test_rdc_at_paper_scale_cites_the_published_ordering_and_margin():
    order, beats_at, _, headline = rdc_rows(dataset="cifar10")
    assert order.published == "rdc 0.7567, diffpure 0.4453, undefended 0.0000"
    assert beats_at.published == "+0.0477" and "P-text" in beats_at.provenance
    assert headline.estimate == 0.75 and headline.verdict == "holds"  # 6/8: [0.349, 0.968]
    assert rdc_rows(dataset="cifar10", rdc_robust=[1] + [0] * 7)[-1].verdict == "fails"


# --- Pixel is a Barrier -------------------------------------------------------------------------------------------

PIXEL = {"budgets": [0.2], "edit": {"purified_strength": 0.3},
         "claims": {"metric": "ssim", "pdm_margin": 0.05, "restore_margin": 0.05, "seed": 0}}


def edit_table(ldm_advdm=0.6, fid_advdm=200.0):
    """Per-image SSIM of the edits: clean 0.9, the random control 0.85, advdm as given for the LDM edit."""
    jitter = 0.01 * (np.arange(N) % 3)
    rows = []

    def add(attack, eps, editor, purifier, ssim, fid):
        rows.extend({"image": i, "attack": attack, "eps": eps, "editor": editor, "purifier": purifier,
                     "strength": 0.3, "ssim": ssim + jitter[i], "set_fid": fid} for i in range(N))

    add("none", 0.0, "ldm", "none", 0.9, 50.0)
    for editor in ("ldm", "pdm"):
        add("random", 0.2, editor, "none", 0.85, 60.0)
    add("advdm", 0.2, "ldm", "none", ldm_advdm, fid_advdm)
    add("advdm", 0.2, "pdm", "none", 0.84, 70.0)
    add("advdm", 0.2, "ldm", "pdm_pure", 0.88, 55.0)
    return pd.DataFrame(rows)


def pixel_rows(dataset="mnist", **table):
    table = edit_table(**table)
    return pixel_barrier.claim_rows(pixel_barrier.claims(table, PIXEL, ["advdm"]), table, PIXEL, dataset=dataset,
                                    known=KNOWN)


def test_the_three_pixel_barrier_claims_and_a_verdict_that_flips():
    degrades, unaffected, restores, fid = pixel_rows()
    assert degrades.claim.startswith("the LDM edit of advdm-protected images is worse than of the random control")
    assert degrades.estimate == pytest.approx(-0.25) and degrades.verdict == "holds"
    assert unaffected.estimate == pytest.approx(-0.01) and unaffected.verdict == "holds"
    assert restores.estimate == pytest.approx(-0.02) and restores.verdict == "holds"
    assert pixel_rows(ldm_advdm=0.95)[0].verdict == "fails"  # the protected image's LDM edit is the better one
    # no metric table of the paper is known: the rows say so and cite the claims' statements
    assert {row.published for row in (degrades, unaffected, restores)} == {
        "not known (the paper's tables were not readable)"}
    assert '"nearly unchanged"' in unaffected.provenance and unaffected.report == "pixel_barrier.html#The-three-claims"
    assert (fid.verdict, fid.headline, fid.published) == ("not run at this preset", True, "> 100 (imagenet)")


def test_the_fid_headline_at_paper_scale_needs_a_rise_of_over_100():
    fid = pixel_rows(dataset="imagenet")[-1]
    assert fid.estimate == pytest.approx(150.0) and fid.verdict == "holds" and fid.low is None
    assert "advdm +150.0" in fid.ours
    assert pixel_rows(dataset="imagenet", fid_advdm=90.0)[-1].verdict == "fails"


# --- every paper, the links, the DAG ------------------------------------------------------------------------------

def every_row():
    return (densepure_rows("mnist", dense_radii=[0.3] * N)
            + diffpure.claims(diffpure_sets(), {"linf": transfer()}, DIFFPURE, dataset="mnist", known=KNOWN)
            + rdc_rows() + pixel_rows())


def test_every_paper_contributes_and_only_paper_scale_headlines_are_not_run():
    rows = every_row()
    assert list(claims.counts(rows).index) == ["DensePure / DDS", "DiffPure", "RDC", "Pixel is a Barrier"]
    assert {row.verdict for row in rows} <= set(claims.VERDICTS)
    assert all(row.verdict == "not run at this preset" for row in rows if row.headline)
    assert all(row.verdict != "not run at this preset" for row in rows if not row.headline)
    assert claims.counts(rows).loc["RDC"].tolist() == [3, 0, 0, 1]


def test_a_row_says_headline_once():
    """The summary marks a headline row "(headline, paper scale)"; the claim's own words must not say it again."""
    rows = every_row() + rdc_rows(dataset="cifar10")
    assert any(row.headline for row in rows)
    cells = re.findall(r"<tr><td>(.*?)</td>", claims.html_table(rows))
    assert len(cells) == len(rows)
    for cell in cells:
        assert cell.count("headline") <= 1, cell


def test_every_link_points_at_a_heading_of_its_report():
    for row in every_row():
        report, heading = row.report.split("#")
        source = (REPO / "notebooks" / report.replace(".html", ".py")).read_text()
        headings = {claims.anchor("", match.group(1)).split("#", 1)[1]
                    for match in map(re.compile(r"# #+ (.*)").fullmatch, source.splitlines()) if match}
        assert heading in headings, (row.claim, heading)


def test_every_preset_renders_the_summary_and_its_parameters_are_the_notebooks():
    for preset in available_presets():
        assert "summary" in load_config({"preset": preset})["reports"], preset
    assert parameter_names(REPO / "notebooks/summary.py") == ["preset", "dataset", "published", "pages", "reports"]
    smk = (REPO / "workflow/rules/common.smk").read_text()
    assert '"summary_html": f"{RESULTS}/reports/index.html"' in smk
    assert 'category="0 Summary"' in (REPO / "workflow/rules/reports.smk").read_text()


def test_the_summary_renders_without_code_where_no_paper_report_runs(tmp_path):
    render_notebook(REPO / "notebooks/summary.py", {"preset": "p", "dataset": "mnist", "pages": ["data_report"],
                                                    "published": str(REPO / "config/published_values.yaml"),
                                                    "reports": {}}, tmp_path / "s.ipynb", tmp_path / "index.html",
                    cwd=tmp_path)
    html = (tmp_path / "index.html").read_text()
    assert "every claim of RDC" in html and "this preset's reports do not include rdc_table" in html
    assert '<a href="data_report.html">data_report</a>' in html and "from diffrobust" not in html


def test_a_worst_case_over_no_stored_set_is_an_error_not_all_robust():
    from diffrobust.stages.robustness import SetError, worst_case

    with pytest.raises(SetError, match=r"no set of rdc was made by any of the attacks \['apgd_dlr'\]"):
        worst_case({("dc", "apgd_dlr"): outcome(NONE)}, "rdc", ["apgd_dlr"])
