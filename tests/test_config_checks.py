"""Config errors caught when the DAG is built (issue 21, items 1 and 10): each bad value is one message naming the
full key, the source it came from and the fix, before any job runs (not in a job, not in the report after every job).
"""

import re

import pytest
from snakemake.cli import parse_config

from diffrobust.config import (CONFIG_SCHEMA, REPO_ROOT, ConfigError, load_checkpoint_registry, read_yaml,
                               resolve_config, workflow_sources)
from diffrobust.stages import plan


def dag_build(*config_entries, configfiles=()):
    """The config as workflow/rules/common.smk resolves it for `snakemake --configfile ... --config ...`."""
    sources = workflow_sources([REPO_ROOT / "config" / "config.yaml"], list(configfiles),
                               parse_config(["preset=smoke", *config_entries]))
    return resolve_config(sources).config


def dag_build_error(*config_entries, configfiles=()):
    with pytest.raises(ConfigError) as error:
        dag_build(*config_entries, configfiles=configfiles)
    return str(error.value)


def problem_lines(message):
    """The problems a ConfigError lists (one line each; a single problem may stand alone)."""
    lines = [line for line in message.splitlines() if line.startswith("  - ")]
    return lines or [message]


EOT_PGD = ("method: eot_pgd, gradient_mode: bpda, steps: 7, relative_step_size: 0.5, eot_attack_reps: 1, "
           "eot_defense_reps: 1")

# (--config entry, the fragments the one message must hold: the full key, its source, the fix)
BAD_OVERRIDES = {
    # item 1: a name of a derived masking check, and names that are no path part / wildcard value
    "attack named rand-more": (
        f"diffpure={{attacks: {{rand-more: {{{EOT_PGD}}}}}}}",
        ["config key 'diffpure.attacks.rand-more' (from --config)", "reserved for the masking checks",
         "rename the attack"]),
    "attack named <check>-large": (
        f"diffpure={{attacks: {{rand-large: {{{EOT_PGD}}}}}}}",
        ["config key 'diffpure.attacks.rand-large' (from --config)", "reserved", "rename the attack"]),
    "attack named square-large": (
        "rdc={attacks: {square-large: {method: autoattack, version: standard}}}",
        ["config key 'rdc.attacks.square-large' (from --config)", "reserved", "rename the attack"]),
    "attack name with a space": (
        "rdc={attacks: {'my attack': {method: autoattack, version: standard}}}",
        ["config key 'rdc.attacks.my attack' (from --config)", "letters, digits, _ and -", "rename the attack",
         "^[A-Za-z0-9_-]+$"]),
    "attack name with a dot": (
        f"diffpure={{attacks: {{pgd.v2: {{{EOT_PGD}}}}}}}",
        ["config key 'diffpure.attacks.pgd.v2' (from --config)", "letters, digits, _ and -", "rename the attack"]),
    # item 10
    "autoattack without version": (
        "diffpure={attacks: {aa: {method: autoattack}}}",
        ["config key 'diffpure.attacks.aa' (from --config) lacks 'version'", "standard, rand, or custom"]),
    "eot_pgd without steps and step size": (
        "rdc={attacks: {pgd: {method: eot_pgd, eot_attack_reps: 1, eot_defense_reps: 1}}}",
        ["config key 'rdc.attacks.pgd' (from --config) lacks 'steps', 'relative_step_size'", "DiffPure: 50"]),
    "custom autoattack without attacks": (
        "diffpure={attacks: {c: {method: autoattack, version: custom}}}",
        ["config key 'diffpure.attacks.c' (from --config) lacks 'attacks'", "add the list"]),
    "dc.sigma_min above sigma_max": (
        "rdc={dc: {sigma_min: 4.0}}",
        ["config key 'rdc.dc.sigma_min' = 4.0 (from --config) must be below 'rdc.dc.sigma_max' = 3.0 "
         "(from the schema default)", "swap them"]),
    "multihead_dc.timesteps outside the chain": (
        "rdc={multihead_dc: {timesteps: [0, 5000]}}",
        ["config key 'rdc.multihead_dc.timesteps' (from --config) has [5000]",
         "'models.diffusion.num_timesteps' = 1000", "0 to 999"]),
    "multihead_dc.timesteps empty": (
        "rdc={multihead_dc: {timesteps: []}}",
        ["config key 'rdc.multihead_dc.timesteps' = [] (from --config) must list at least 1"]),
    "lm.sigma_min above sigma_max": (
        "rdc={lm: {sigma_min: 0.7, sigma_max: 0.5}}",
        ["config key 'rdc.lm.sigma_min' = 0.7 (from --config) must be at most 'rdc.lm.sigma_max' = 0.5 "
         "(from --config)", "swap them"]),
    "pdm_pure_if without its model": (
        "pixel_barrier={purifier_list: [pdm_pure, pdm_pure_if]}",
        ["config key 'pixel_barrier.purifier_list' (from --config) runs pdm_pure_if",
         "'pixel_barrier.models.if_stage2' (from the schema default, now null)", "or drop pdm_pure_if"]),
    "noisy_upscaling without its model": (
        "pixel_barrier={purifier_list: [pdm_pure, noisy_upscaling]}",
        ["config key 'pixel_barrier.purifier_list' (from --config) runs noisy_upscaling",
         "'pixel_barrier.models.upscaler'", "or drop noisy_upscaling"]),
    "a missing target file": (
        "pixel_barrier={target: {file: no/such/MIST.png}}",
        ["config key 'pixel_barrier.target.file' = 'no/such/MIST.png' (from --config): no such file",
         "set it to null for the checkerboard"]),
    "purifier list without pdm_pure": (
        "pixel_barrier={purifier_list: [jpeg]}",
        ["config key 'pixel_barrier.purifier_list' = ['jpeg'] (from --config) must include 'pdm_pure'", "add it"]),
    "purified_strength not an edit strength": (
        "pixel_barrier={edit: {purified_strength: 0.2}}",
        ["config key 'pixel_barrier.edit.purified_strength' = 0.2 (from --config) is not one of "
         "'pixel_barrier.edit.strengths' = [0.1, 0.3] (from config/presets/smoke.yaml)", "add it to strengths"]),
    "duplicate budgets": (
        "pixel_barrier={budgets: [0.1, 0.1]}",
        ["config key 'pixel_barrier.budgets' = [0.1, 0.1] (from --config) names a value twice"]),
    "claims on correctness without a classifier": (
        "pixel_barrier={claims: {metric: correct}, models: {classifier: null}}",
        ["config key 'pixel_barrier.claims.metric' = 'correct' (from --config) needs a classifier model",
         "'pixel_barrier.models.classifier' is null (from --config)", "choose a metric"]),
    "unknown LDM checkpoint": (
        "pixel_barrier={models: {ldm: nosuch}}",
        ["config key 'pixel_barrier.models.ldm' = 'nosuch' (from --config) is not a checkpoint",
         "stable_diffusion_v1_4"]),
    "LDM checkpoint outside the preset's list": (
        "pixel_barrier={models: {ldm: stable_diffusion_v1_4}}",
        ["config key 'pixel_barrier.models.ldm' = 'stable_diffusion_v1_4' (from --config)",
         "add it to the preset's 'checkpoints' list"]),
    "classifier checkpoint as the pixel model": (
        "pixel_barrier={models: {pixel: vit_b16_cifar10}}",
        ["config key 'pixel_barrier.models.pixel' = 'vit_b16_cifar10' (from --config) is not what the pixel role "
         "loads (a diffusion network)", "guided_diffusion_256_uncond"]),
    "linf budget above 1": (
        "diffpure={threats: {linf: {eps: 2.0, t_star: 0.1, large_eps: 0.4}}}",
        ["config key 'diffpure.threats.linf.eps' = 2.0 (from --config) must be <= 1", "8/255 is 0.031373"]),
    "linf budget in 255ths": (
        "rdc={threats: {linf: {eps: 8, large_eps: 0.5}}}",
        ["config key 'rdc.threats.linf.eps' = 8 (from --config) must be <= 1"]),
    "large_eps below eps": (
        "diffpure={threats: {l2: {eps: 1.5, t_star: 0.01, large_eps: 1.0}}}",
        ["config key 'diffpure.threats.l2.large_eps' = 1.0 (from --config) must be larger than "
         "'diffpure.threats.l2.eps' = 1.5 (from --config)", "raise large_eps"]),
    "no_random_start names no attack": (
        "pixel_barrier={no_random_start: [sds_minnus]}",
        ["config key 'pixel_barrier.no_random_start.0' = 'sds_minnus' (from --config) must be one of",
         "did you mean 'sds_minus'?"]),
}


@pytest.mark.parametrize("override, fragments", BAD_OVERRIDES.values(), ids=BAD_OVERRIDES.keys())
def test_a_bad_override_is_one_message_at_dag_build_naming_key_source_and_fix(override, fragments):
    message = dag_build_error(override)
    assert len(problem_lines(message)) == 1, message
    for fragment in fragments:
        assert fragment in message


def test_a_bad_value_from_a_configfile_is_blamed_on_the_file(tmp_path):
    path = tmp_path / "attacks.yaml"
    path.write_text("rdc:\n  attacks:\n    apgd_dlr-more: {method: autoattack, version: standard}\n")
    message = dag_build_error(configfiles=[path])
    assert f"config key 'rdc.attacks.apgd_dlr-more' (from {path})" in message
    path.write_text("pixel_barrier:\n  target: {file: missing.png}\n")
    assert f"config key 'pixel_barrier.target.file' = 'missing.png' (from {path}): no such file" in dag_build_error(
        configfiles=[path])


def test_good_values_next_to_the_refused_ones_are_accepted(tmp_path):
    target = tmp_path / "MIST.png"
    target.write_bytes(b"\x89PNG")
    config = dag_build(f"diffpure={{attacks: {{rand_more: {{{EOT_PGD}}}, more-rand: {{{EOT_PGD}}}}}}}",
                       "rdc={dc: {sigma_min: 0.5, sigma_max: 2.0}, lm: {sigma_min: 0.5, sigma_max: 0.5}, "
                       "multihead_dc: {timesteps: [0, 999]}}",
                       f"pixel_barrier={{target: {{file: {target}}}, edit: {{purified_strength: 0.1}}, "
                       "claims: {metric: psnr}, models: {classifier: null}, no_random_start: [sds_minus]}")
    assert {"rand_more", "more-rand"} <= set(config["diffpure"]["attacks"])
    assert plan.attack_names(config["diffpure"]).count("rand-more") == 1


def test_every_preset_passes_the_dag_build_checks():
    for preset in ("smoke", "mini", "cifar10", "imagenet"):
        assert dag_build(f"preset={preset}")["preset"] == preset


def test_the_jobs_blocks_of_every_preset_pass_the_command_lines_schema_check():
    """The CLI holds a job's block to its part of the schema alone: a rule there must not need the rest of the
    schema (a $ref) nor the whole block (a protect job gets no purifiers)."""
    from diffrobust.cli import schema_problems
    from diffrobust.config import pixel_barrier_job_settings

    for preset in ("smoke", "mini", "cifar10", "imagenet"):
        config = dag_build(f"preset={preset}")
        for stage in ("diffpure", "rdc"):
            assert schema_problems(config[stage], stage) == [], (preset, stage)
        for kind in ("protect", "edit"):
            settings = pixel_barrier_job_settings(config["pixel_barrier"], kind)
            assert schema_problems(settings, "pixel_barrier") == [], (preset, kind)
    broken = {"attacks": {"pgd.v2": {"method": "eot_pgd", "steps": 2}}, "threats": {"linf": {"eps": 8}}}
    assert schema_problems(broken, "diffpure") == [
        "diffpure.attacks: 'pgd.v2' does not match '^[A-Za-z0-9_-]+$'",
        "diffpure.attacks.pgd.v2: 'relative_step_size' is a required property",
        "diffpure.attacks.pgd.v2: 'eot_attack_reps' is a required property",
        "diffpure.attacks.pgd.v2: 'eot_defense_reps' is a required property",
        "diffpure.threats.linf: 't_star' is a required property",
        "diffpure.threats.linf: 'large_eps' is a required property",
        "diffpure.threats.linf.eps: 8 is greater than the maximum of 1"]


def test_the_torch_free_tables_agree_with_the_loaders():
    from diffrobust.config import PIXEL_BARRIER_ROLE_FOLDERS, REGISTRY_FAMILY_KINDS, checkpoint_fits_role
    from diffrobust.defenses.upscaling import UPSCALER_FOLDERS
    from diffrobust.models import REGISTRY_KINDS
    from diffrobust.networks.ldm import SUBFOLDERS

    assert REGISTRY_FAMILY_KINDS == REGISTRY_KINDS
    assert PIXEL_BARRIER_ROLE_FOLDERS["ldm"] == SUBFOLDERS
    assert set(PIXEL_BARRIER_ROLE_FOLDERS["upscaler"]) == set(UPSCALER_FOLDERS)
    registry = load_checkpoint_registry()
    fitting = {role: sorted(name for name, entry in registry.items() if checkpoint_fits_role(role, entry))
               for role in ("ldm", "if_stage2", "upscaler", "lpips", "fid_inception", "features")}
    assert fitting == {"ldm": ["stable_diffusion_v1_4"], "if_stage2": ["deepfloyd_if_stage2_large"],
                       "upscaler": ["stable_diffusion_x4_upscaler"],
                       "lpips": ["pytorch_fid_inception", "torchvision_alexnet"],
                       "fid_inception": ["pytorch_fid_inception", "torchvision_alexnet"],
                       "features": ["clip_vit_base_patch32"]}


def test_the_attack_name_pattern_is_the_attack_wildcards_constraint():
    rule = (REPO_ROOT / "workflow" / "rules" / "attacks.smk").read_text()
    assert f'attack="{plan.ATTACK_NAME_PATTERN}"' in rule
    schema = read_yaml(CONFIG_SCHEMA)
    for stage in ("diffpure", "rdc"):
        pattern = schema["properties"][stage]["properties"]["attacks"]["propertyNames"]["pattern"]
        assert pattern == f"^{plan.ATTACK_NAME_PATTERN}$"
    assert re.fullmatch(plan.ATTACK_NAME_PATTERN, "rand-more") and plan.reserved_suffix("rand-more") == "-more"
    assert plan.reserved_suffix("more-rand") is None


@pytest.mark.workflow
def test_snakemake_refuses_an_attack_named_like_a_masking_check(repo_root, tmp_path):
    """Issue 21 item 1 as reported: the user's `rand-more` was planned twice, run as `autoattack rand` and its row
    labelled with the user's attack."""
    from test_workflow import copy_repo, snakemake

    repo = copy_repo(repo_root, tmp_path / "repo")
    result = snakemake(repo, "-n", "--config", "preset=smoke", f"diffpure={{attacks: {{rand-more: {{{EOT_PGD}}}}}}}",
                       check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "config key 'diffpure.attacks.rand-more' (from --config): attack names ending in -more or -large are " \
           "reserved" in output
    assert "Traceback" not in output and "Job stats" not in output
