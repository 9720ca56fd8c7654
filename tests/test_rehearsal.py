"""The dress rehearsal of both paper-scale presets, run for real (issue 22): `diffrobust rehearse --preset cifar10`
and `--preset imagenet` each make their official-format files, run the preset's whole DAG offline and must end with
every planned rule run, every report rendered, and a summary page with every claim row.

This is the slowest test of the suite (both rehearsals: about 20 minutes on 2 cores); it is the only place where the
paper-scale jobs run end to end.
"""

import json
import subprocess
import sys

import pytest
import yaml

from diffrobust.config import load_config

pytestmark = pytest.mark.workflow

# Rules each preset's DAG must run (the preset's config decides which; snakemake's dry run plans the same set).
EXPECTED_RULES = {
    "cifar10": {"download_checkpoint", "download_cifar10", "prepare_dataset", "finetune_multihead", "certify_shard",
                "merge_votes", "attack", "evaluate", "sigma_sweep", "render_report", "render_summary"},
    "imagenet": {"download_checkpoint", "prepare_dataset", "certify_shard", "merge_votes", "attack", "evaluate",
                 "protect", "edit_protected", "render_report", "render_summary"},
}


@pytest.fixture(scope="module", params=["cifar10", "imagenet"])
def rehearsal(request, tmp_path_factory):
    """(preset, scratch folder, rehearsal.json) of one preset's rehearsal, run through the command line."""
    preset = request.param
    scratch = tmp_path_factory.mktemp(f"rehearsal-{preset}")
    result = subprocess.run([sys.executable, "-m", "diffrobust", "rehearse", "--preset", preset, "--scratch",
                             str(scratch), "--cores", "2"], capture_output=True, text=True)
    record_file = scratch / "rehearsal.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    assert result.returncode == 0, (f"rehearse --preset {preset} exited {result.returncode}; not run: "
                                    f"{record.get('rules_not_run')}\n{result.stderr[-4000:]}")
    return preset, scratch, record


def test_every_planned_rule_ran(rehearsal):
    preset, _, record = rehearsal
    planned = set(record["planned_rules"]) - {"all"}
    assert planned == EXPECTED_RULES[preset]
    assert record["rules_not_run"] == []
    assert planned <= set(record["rules_with_outputs"])
    # the attack and certification rules ran once per planned job, not just once
    for rule in ("attack", "certify_shard"):
        assert record["rules_with_outputs"][rule] >= record["planned_rules"][rule]


def test_every_report_rendered_and_the_summary_has_every_claim_row(rehearsal):
    preset, scratch, record = rehearsal
    reports = load_config({"preset": preset})["reports"]
    folder = scratch / "results" / preset / "reports"
    for name in reports:
        page = folder / ("index.html" if name == "summary" else f"{name}.html")
        assert page.is_file() and page.stat().st_size > 10_000, f"{page} missing or empty"
        assert "Traceback" not in page.read_text(), f"{page} shows an exception"
    summary = record["summary"]
    assert summary["missing_reports"] == []
    # one table per paper of the summary, none empty; a paper-scale preset measures rows of every paper it reports
    assert summary["tables"] == 4 and min(summary["rows_per_table"]) >= 1
    measured = sum(count for verdict, count in summary["verdicts"].items() if verdict != "not")
    assert measured >= 3, summary


def test_networks_are_official_size_unless_listed_as_reduced(rehearsal):
    preset, scratch, record = rehearsal
    reduced = yaml.safe_load((scratch.parents[0] / scratch.name / "config" / "config.yaml").read_text()) and None
    for name, made in record["made"].items():
        assert bool(made["reduced"]) == bool(made["why_reduced"]), name  # reduced exactly where the settings say why
    sizes = {name: made["num_params"] for name, made in record["made"].items()}
    if preset == "cifar10":
        # official parameter counts: DDPM++ 52.5M (improved-diffusion cifar10_uncond_50M), EDM 55.7M, NCSN++ 106.6M
        assert round(sizes["improved_diffusion_cifar10_uncond"] / 1e6, 1) == 52.5
        assert round(sizes["score_sde_cifar10_ncsnpp_deep_vp"] / 1e6, 1) == 106.6 or reduced is None
    else:
        assert sizes["clip_vit_base_patch32"] > 150e6  # CLIP ViT-B/32 at official size (151.3M)


def test_projection_of_the_real_preset(rehearsal):
    _, _, record = rehearsal
    projection = record["projection"]
    assert projection["total_hours"] > 0
    assert projection["unit"] == "CPU-hours"
