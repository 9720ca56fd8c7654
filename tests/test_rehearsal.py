"""The dress rehearsal of both paper-scale presets, run for real (issue 22): `diffrobust rehearse --preset cifar10`
and `--preset imagenet` each make their official-format files, run the preset's whole DAG offline and must end with
every planned rule run, every report rendered, and a summary page with every claim row.

The only place where the paper-scale jobs run end to end. The imagenet rehearsal runs in the default `pytest` (about
15 minutes on 2 cores); the cifar10 one (about 22 minutes) is marked `long_rehearsal` and runs with
`pytest -m long_rehearsal`: both in the default run would bring CI near its hour (issue 22 asks for both within 25
minutes; the cifar10 DAG's 16 DC/RDC attack jobs alone take about 70-80 s each).
"""

import json
import subprocess
import sys

import pytest

from diffrobust.config import load_checkpoint_registry, load_config

pytestmark = pytest.mark.workflow

# Rules each preset's DAG must run (the preset's config decides which; snakemake's dry run plans the same set).
EXPECTED_RULES = {
    "cifar10": {"download_checkpoint", "download_cifar10", "prepare_dataset", "finetune_multihead", "certify_shard",
                "merge_votes", "attack", "evaluate", "sigma_sweep", "render_report", "render_summary"},
    "imagenet": {"download_checkpoint", "prepare_dataset", "certify_shard", "merge_votes", "attack", "evaluate",
                 "protect", "edit_protected", "render_report", "render_summary"},
}


@pytest.fixture(scope="module", params=["imagenet", pytest.param("cifar10", marks=pytest.mark.long_rehearsal)])
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
    preset, _, record = rehearsal
    for name, made in record["made"].items():
        # reduced exactly where config/rehearsal/<preset>.yaml says why, and then with the architecture its files match
        assert bool(made["reduced"]) == bool(made["why_reduced"]), name
        if made["reduced"] and made.get("architecture"):
            assert made["architecture"] != load_checkpoint_registry()[name]["architecture"], name
    millions = {name: round(made["num_params"] / 1e6, 1) for name, made in record["made"].items() if made["num_params"]}
    if preset == "cifar10":
        # official sizes: improved-diffusion's CIFAR-10 UNet 52.5M, EDM's DDPM++ 55.7M, score_sde's deep NCSN++ 106.6M,
        # Wang et al.'s WRN-70-16 266.8M
        assert millions["improved_diffusion_cifar10_uncond"] == 52.5
        assert millions["edm_cifar10_cond_vp"] == millions["edm_cifar10_uncond_vp"] == 55.7
        assert millions["robustbench_cifar10_linf_wang2023better_wrn70_16"] == 266.8
    else:
        # CLIP ViT-B/32 151.3M and ResNet-50 25.6M at official size; the 552.8M guided-diffusion UNet built narrower
        assert millions["clip_vit_base_patch32"] == 151.3 and millions["torchvision_resnet50_imagenet"] == 25.6
        assert millions["guided_diffusion_256_uncond"] < 552.8


def test_projection_of_the_real_preset(rehearsal):
    _, _, record = rehearsal
    projection = record["projection"]
    assert projection["total_hours"] > 0
    assert projection["unit"] == "CPU-hours"
