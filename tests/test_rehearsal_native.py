"""The rehearsal's native-torch checkpoint writers: what they write loads through the project's real registry loader,
in the publisher's layout, and the rehearsal plumbing (settings, mirror URLs, the served folder) works offline."""

import pickle
import urllib.request

import pytest
import torch
import yaml

from diffrobust import models
from diffrobust.rehearsal import native, run

REGISTRY = yaml.safe_load(open(run.REPO_ROOT / "config" / "checkpoints.yaml"))
NATIVE = [name for name, entry in REGISTRY.items()
          if (entry.get("architecture") or {}).get("family") in native.WRITERS]


@pytest.mark.parametrize("name", ["improved_diffusion_cifar10_uncond", "edm_cifar10_cond_vp",
                                  "score_sde_cifar10_vp_ddpmpp_deep", "robustbench_cifar10_standard_wrn28_10",
                                  "robustbench_cifar10_linf_wang2023better_wrn70_16"])
def test_reduced_files_load_through_the_registry_loader(tmp_path, name):
    entry = REGISTRY[name]
    info = native.WRITERS[entry["architecture"]["family"]](entry, tmp_path / name, seed=3, reduced=True)
    key, factor = native.REDUCED_WIDTH[entry["architecture"]["family"]]
    official = entry["architecture"]["config"][key]
    assert info["reduced"] == f"{key} {official} -> {official // factor}"
    reduced_entry = {**entry, "architecture": native.architecture_for(entry, True)[0]}
    loaded = models.load_registry_checkpoint(name, tmp_path, registry={name: reduced_entry})
    assert sum(p.numel() for p in loaded.network.parameters()) == info["num_params"]
    # no parameter left at exactly zero: the zero-initialised output layers were filled
    assert all(p.any() for p in loaded.network.parameters())
    assert not list(tmp_path.rglob("*.tmp"))


def test_official_size_and_publisher_layouts(tmp_path):
    entry = REGISTRY["robustbench_cifar10_standard_wrn28_10"]
    info = native.write_robustbench_state_dict(entry, tmp_path, seed=0)
    # WRN-28-10's 36,479,194 parameters, built from (and reporting) the registry's own architecture block
    assert info == {"num_params": 36479194, "reduced": None, "architecture": entry["architecture"]}
    contents = torch.load(tmp_path / "Standard.pt", weights_only=True)
    assert set(contents) == {"state_dict"} and all(k.startswith("module.") for k in contents["state_dict"])

    name = "score_sde_cifar10_vp_ddpmpp_deep"
    entry = REGISTRY[name]
    native.write_score_sde_checkpoint(entry, tmp_path / name, seed=0, reduced=True)
    checkpoint = torch.load(tmp_path / name / "checkpoint_8.pth", weights_only=True)
    assert set(checkpoint) == {"optimizer", "model", "ema", "step"}
    # the EMA differs from 'model', so a loader reading 'model' would not give the EMA weights
    reduced_entry = {**entry, "architecture": native.architecture_for(entry, True)[0]}
    loaded = models.load_registry_checkpoint(name, tmp_path, registry={name: reduced_entry})
    first = next(loaded.network.parameters())
    assert torch.equal(first, checkpoint["ema"]["shadow_params"][0])
    assert not torch.equal(first, next(iter(checkpoint["model"].values())))


def test_edm_pickle_names_the_registry_wrapper_and_refuses_plain_unpickling(tmp_path):
    entry = REGISTRY["edm_cifar10_uncond_vp"]
    native.write_edm_pickle(entry, tmp_path, seed=0, reduced=True)
    path = tmp_path / "edm-cifar10-32x32-uncond-vp.pkl"
    from diffrobust.networks import edm

    assert edm.read_edm_network_pickle(path).class_name == "EDMPrecond"
    with pytest.raises((RuntimeError, ModuleNotFoundError)):
        pickle.loads(path.read_bytes())  # torch_utils is not importable: only the restricted reader reads it


def test_every_native_registry_entry_has_a_writer_and_a_reduction():
    assert NATIVE, "no native entries found"
    for name in NATIVE:
        family = REGISTRY[name]["architecture"]["family"]
        assert run.writer_key(name, REGISTRY[name]) == family
        assert family in native.REDUCED_WIDTH


def test_rehearsal_settings_keep_networks_and_checks(tmp_path):
    for preset in run.PRESETS:
        settings = run.rehearsal_settings(preset)
        assert set(settings) == {"reduced", "overrides"}
        assert "models" not in settings["overrides"] or set(settings["overrides"]["models"]) <= {"multihead"}
        assert "checkpoints" not in settings["overrides"]
    with pytest.raises(run.RehearsalError, match="rehearsed presets are cifar10, imagenet"):
        run.rehearsal_settings("mini")


def test_mirror_config_points_downloads_at_the_served_folder(tmp_path):
    (tmp_path / "checkpoints" / "a").mkdir(parents=True)
    (tmp_path / "checkpoints" / "a" / "f.bin").write_bytes(b"weights")
    with run.serve(tmp_path) as url:
        config = run.scratch_config("cifar10", {"seed": 1}, {"cifar10": {"md5": "m", "size": 3}}, url,
                                    "cifar-10-python.tar.gz")
        assert config["checkpoint_mirror"] == f"{url}/checkpoints"
        assert config["datasets"]["cifar10"] == {"md5": "m", "size": 3, "url": f"{url}/cifar-10-python.tar.gz"}
        with urllib.request.urlopen(f"{config['checkpoint_mirror']}/a/f.bin") as response:
            assert response.read() == b"weights"
