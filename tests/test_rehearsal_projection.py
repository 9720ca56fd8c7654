"""The projection of the real presets' hours from a rehearsal record (diffrobust.rehearsal.projection)."""

import json
from collections import Counter

import pytest

from diffrobust import cli, provenance
from diffrobust.config import load_config
from diffrobust.rehearsal import projection


def diffpure_config(*, images_per_seed, seeds, n_iter, dt, shard_size):
    """A minimal config of the DiffPure stage alone: one custom APGD-CE attack at l-inf, t* = 0.1."""
    return {"dataset": "cifar10", "reports": ["diffpure_table"],
            "subsets": {"diffpure": {"n": images_per_seed, "seeds": list(seeds)}},
            "diffpure": {"threats": {"linf": {"t_star": 0.1}}, "purifier": {"variant": "sde", "dt": dt},
                         "attacks": {"apgd": {"method": "autoattack", "version": "custom", "attacks": ["apgd-ce"],
                                              "n_iter": n_iter, "n_restarts": 1}},
                         "checks": {"attack": "apgd", "iterations_factor": 2}, "eval_draws": 1,
                         "shard_size": shard_size}}


REHEARSAL = diffpure_config(images_per_seed=2, seeds=[0], n_iter=1, dt=0.05, shard_size=2)
REAL = diffpure_config(images_per_seed=64, seeds=[0, 1], n_iter=100, dt=0.001, shard_size=64)


def test_attack_job_scales_by_iterations_images_and_reverse_steps_after_the_overhead():
    record = {"preset": "cifar10", "device": "cpu", "jobs": [
        {"job": "cifar10/attack/undefended/apgd/linf/shard0", "seconds": 10.0, "max_rss_mb": 1.0},
        {"job": "cifar10/attack/diffpure/apgd-more/linf/shard0", "seconds": 20.0, "max_rss_mb": 1.0},
        {"job": "cifar10/merge_votes/dds/sigma0.25/votes1", "seconds": 2.0, "max_rss_mb": 1.0}]}
    result = projection.project(record, REHEARSAL, REAL)
    rows = {row["group"]: row for row in result["groups"]}
    assert result["overhead_seconds"] == 2.0  # the merge job: no network loaded
    # undefended: 2 -> 128 images; 1 -> 100 APGD iterations, plus one forward (1/3) to score each image
    undefended = (10 - 2) * (128 * (100 + 1 / 3)) / (2 * (1 + 1 / 3)) + 2 * 2  # 2 real shards of 64
    assert rows["attack/undefended/apgd/linf"]["real_seconds"] == pytest.approx(undefended, rel=1e-12)
    assert rows["attack/undefended/apgd/linf"]["real_jobs"] == 2
    # DiffPure, twice the iterations ('-more'): t*/dt reverse steps and the classifier, 0.1/0.05 + 1 -> 0.1/0.001 + 1
    more = (20 - 2) * (128 * (200 + 1 / 3) * 101) / (2 * (2 + 1 / 3) * 3) + 2 * 2
    assert rows["attack/diffpure/apgd-more/linf"]["real_seconds"] == pytest.approx(more, rel=1e-12)
    assert result["total_hours"] == pytest.approx((undefended + more) / 3600, rel=1e-12)
    assert result["stages_hours"] == {"diffpure": pytest.approx((undefended + more) / 3600, rel=1e-12)}
    assert result["unit"] == "CPU-hours"
    not_projected = {item["group"]: item["why"] for item in result["not_projected"]}
    assert "the rehearsal has no job" in not_projected["attack/diffpure/apgd/linf"]
    assert "the rehearsal has no job" in not_projected["evaluate/diffpure/undefended/apgd/linf"]
    assert "not a job of the real preset" in not_projected["merge_votes/dds/0.25"]


def test_a_measured_startup_wins_over_the_cheapest_job_and_work_never_goes_negative():
    record = {"preset": "cifar10", "device": "cuda:0", "startup_seconds": 12.0, "jobs": [
        {"job": "cifar10/attack/undefended/apgd/linf/shard0", "seconds": 10.0, "max_rss_mb": 1.0}]}
    result = projection.project(record, REHEARSAL, REAL)
    assert result["overhead_seconds"] == 12.0
    assert result["unit"] == "GPU-hours"
    # 10 s < the start-up: no work to scale, the overhead of each of the 2 real jobs stays
    assert result["groups"][0]["real_seconds"] == 2 * 12.0


def test_autoattack_passes_follow_pyautoattack_versions():
    # standard: APGD-CE 100, APGD-T 9 targets x 100, FAB-T 9 x 100, Square 5,000 forward queries
    assert projection.autoattack_passes({"version": "standard"}, 10) == pytest.approx(100 + 900 + 900 + 5000 / 3)
    # rand: APGD-CE and APGD-DLR, 1 restart, 100 iterations, 20 EOT draws each
    assert projection.autoattack_passes({"version": "rand"}, 10) == 2 * 100 * 20
    # custom: AutoAttack's constructor keeps APGD's 5 restarts
    assert projection.autoattack_passes({"version": "custom", "attacks": ["apgd-dlr"]}, 10) == 5 * 100
    # the rehearsal's overrides
    assert projection.autoattack_passes({"version": "standard", "n_iter": 1, "n_target_classes": 1,
                                         "n_queries": 1}, 10) == pytest.approx(3 + 1 / 3)


def test_job_groups_of_the_real_presets_count_the_dry_run_jobs():
    # Counts read once from `python -m snakemake -n --config preset=<preset> --quiet rules` (job stats), minus the
    # downloads and prepare_dataset (not projected); render_summary's benchmark is render_report/summary.
    dry_run = {"cifar10": {"certify_shard": 300, "merge_votes": 27, "attack": 576, "evaluate": 4, "sigma_sweep": 1,
                           "finetune_multihead": 1, "render_report": 5, "render_summary": 1},
               "imagenet": {"certify_shard": 120, "merge_votes": 27, "attack": 64, "evaluate": 1, "protect": 11,
                            "edit_protected": 11, "render_report": 5, "render_summary": 1}}
    for preset, expected in dry_run.items():
        counts = Counter()
        for group, jobs in projection.job_groups(load_config({"preset": preset})).items():
            counts["render_summary" if group == ("render_report", "summary") else group[0]] += jobs
        assert dict(counts) == expected, preset


@pytest.mark.parametrize("job, group", [
    ("cifar10/attack/rdc/apgd_dlr-more/l2/shard12", ("attack", "rdc", "apgd_dlr-more", "l2")),
    ("cifar10/certify_shard/densepure/sigma0.25/shard3", ("certify_shard", "densepure", "0.25")),
    ("imagenet/merge_votes/densepure/sigma1.0/votes40", ("merge_votes", "densepure", "1.0")),
    ("cifar10/evaluate/rdc/from-undefended/rdc_standard/linf", ("evaluate", "rdc", "undefended", "rdc_standard",
                                                                 "linf")),
    ("imagenet/protect/sigma_free_attack", ("protect", "sigma_free_attack")),
    ("download_checkpoint/vit_b16_cifar10/model.npz", ("download_checkpoint", "vit_b16_cifar10", "model.npz")),
])
def test_job_group_of_a_benchmark_path(job, group):
    preset = "imagenet" if job.startswith("imagenet/") else "cifar10"
    assert projection.job_group(job, preset) == group


def test_every_rehearsal_job_of_cifar10_lands_in_a_real_group():
    rehearsal, real = projection.configs_of({"preset": "cifar10"})
    real_groups = projection.job_groups(real)
    assert set(projection.job_groups(rehearsal)) == set(real_groups)


def test_project_only_reads_the_record_stores_the_projection_and_picks_up_gpu_memory(tmp_path, capsys):
    job = "cifar10/certify_shard/dds/sigma0.25/shard0"
    record = {"preset": "cifar10", "device": "cuda", "cores": 16, "jobs": [
        {"job": job, "seconds": 30.0, "max_rss_mb": 1.0},
        {"job": "cifar10/certify_shard/dds/sigma0.25/shard1", "seconds": 30.0, "max_rss_mb": 1.0},
        {"job": "cifar10/merge_votes/dds/sigma0.25/votes1", "seconds": 5.0, "max_rss_mb": 1.0},
        {"job": "download_cifar10", "seconds": 1.0, "max_rss_mb": 1.0},
        {"job": "download_checkpoint/vit_b16_cifar10/a.npz", "seconds": 2.0, "max_rss_mb": 1.0},
        {"job": "download_checkpoint/vit_b16_cifar10/b.npz", "seconds": 3.0, "max_rss_mb": 1.0}]}
    (tmp_path / "rehearsal.json").write_text(json.dumps(record))
    log = tmp_path / "logs" / f"{job}.run.json"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"peak_gpu_memory_mb": 1234.5}))
    assert cli.main(["rehearse", "--project-only", "--scratch", str(tmp_path)]) in (0, None)
    printed = capsys.readouterr().out
    stored = json.loads((tmp_path / "rehearsal.json").read_text())
    result = stored["projection"]
    assert stored["jobs"][0]["peak_gpu_memory_mb"] == 1234.5 and stored["jobs"][1]["peak_gpu_memory_mb"] is None
    row = next(row for row in result["groups"] if row["group"] == "certify_shard/dds/0.25")
    assert row["peak_gpu_memory_mb"] == 1234.5
    # the rehearsal: 2 images x (4 + 8) draws; the preset: 500 images x (100 + 100,000) draws, in 50 shards
    expected = (30 - 5 + 30 - 5) * (500 * 100_100) / (2 * 12) + 5 * 50
    assert row["real_seconds"] == pytest.approx(expected, rel=1e-12)
    dds = next(figure for figure in result["anchors"] if figure["what"].startswith("DDS"))
    assert dds["ours_seconds"] == pytest.approx(expected / 500, rel=1e-12)
    assert "121 s" in dds["published"]
    not_projected = {item["group"]: item["why"] for item in result["not_projected"]}
    assert not_projected["download_checkpoint"].endswith("(2 rehearsal jobs, 5.0 s)")
    assert "GPU-hours" in printed and "anchor: DDS" in printed and "not projected: download_cifar10" in printed


def test_project_only_without_a_record_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no rehearsal record"):
        projection.project_scratch(tmp_path)


def test_run_record_has_no_gpu_memory_where_cuda_was_never_initialized(tmp_path):
    path = tmp_path / "run.json"
    with provenance.run_record(path):
        pass
    assert json.loads(path.read_text())["peak_gpu_memory_mb"] is None


def test_rehearse_needs_a_preset_or_project_only_with_a_scratch_folder(capsys):
    assert cli.main(["rehearse"]) == 2
    assert "--preset" in capsys.readouterr().err
    assert cli.main(["rehearse", "--project-only"]) == 2
    assert "--scratch" in capsys.readouterr().err


def test_rdc_defense_calls_count_the_edm_grid_points_per_class():
    rehearsal, real = projection.configs_of({"preset": "cifar10"})
    # RDC's grid linspace(1e-4, 3, 1001) without its last point: 1,000 sigma points, 10 classes, LM 5 steps
    assert projection.defense_calls(real, "rdc", "dc", "linf") == 1000 * 10
    assert projection.defense_calls(real, "rdc", "rdc", "l2") == 5 + 1000 * 10
    assert projection.defense_calls(real, "rdc", "dc_multihead", "linf") == 1000
    assert projection.defense_calls(real, "rdc", "rdc_multihead", "linf") == 5 + 1000
    assert projection.defense_calls(rehearsal, "rdc", "rdc", "linf") == 1 + 1 * 10  # sigma_steps 2, LM 1 step
    # DiffPure at t* = 0.1 with dt 1e-3: 100 reverse-SDE steps and the classifier
    assert projection.defense_calls(real, "diffpure", "diffpure", "linf") == 101
