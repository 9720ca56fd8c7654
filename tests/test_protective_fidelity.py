"""Pixel is a Barrier's protective attacks against Diff-Protect's released settings (issue 22, departures 3-6): the
PGD step, Mist's target image as a registry file, the two attacks called "PhotoGuard", and the stored images."""

import numpy as np
import pytest
import torch

from diffrobust import config as cfg
from diffrobust.attacks import protective
from diffrobust.stages import pixel_barrier


def schema_defaults():
    """The pixel_barrier block as the schema fills it (the paper-scale protocol)."""
    block = {}
    schema = cfg.read_yaml(cfg.CONFIG_SCHEMA)
    cfg.fill_defaults(schema["properties"]["pixel_barrier"], block)
    return block


class Constant(protective.Objective):
    """An objective whose gradient is +1 everywhere: each PGD step moves every pixel by exactly -step."""

    def __call__(self, x01, generator):
        return x01.flatten(1).sum(1)

    def gradient(self, x01, generator):
        return torch.ones_like(x01)


# --- 3: the step is Diff-Protect's 1/255 at every budget ------------------------------------------------------------

def test_the_default_step_is_one_grey_level_at_eps_8():
    settings = schema_defaults()
    eps = 8 / 255
    step = protective.pgd_step(eps, settings["step_size"], settings["relative_step_size"])
    assert step == pytest.approx(1 / 255)  # eps/16 would be 0.5/255
    x = torch.full((1, 1, 4, 4), 0.5)
    result = protective.protect(Constant(), x, eps=eps, steps=3, step=step, random_start=False, measure_draws=1)
    assert torch.allclose(x - result.x_protected, torch.full_like(x, 3 / 255), atol=1e-6)


def test_relative_step_and_both_or_neither_refused():
    assert protective.pgd_step(0.2, None, 0.0625) == pytest.approx(0.0125)
    for both in ((1 / 255, 0.0625), (None, None)):
        with pytest.raises(ValueError, match="exactly one of pixel_barrier.step_size"):
            protective.pgd_step(0.1, *both)
    with pytest.raises(cfg.ConfigError, match="'pixel_barrier.relative_step_size' = 0.1 .*set exactly one"):
        cfg.load_config({"preset": "imagenet", "pixel_barrier": {"relative_step_size": 0.1}})


# --- 4: Mist's target is Diff-Protect's MIST.png, a registry file ---------------------------------------------------

def test_the_imagenet_preset_targets_the_registry_mist_png():
    registry = cfg.load_checkpoint_registry()
    entry = registry["diff_protect_mist_target"]
    assert entry["files"][0]["urls"] == [
        "https://raw.githubusercontent.com/xavihart/Diff-Protect/ac5ffdbe02bd6740a6e871f00c3fa1300ef0fa11/"
        "test_images/target/MIST.png"]
    config = cfg.load_config({"preset": "imagenet"})
    target = config["pixel_barrier"]["target"]
    assert target["file"] == "data/checkpoints/diff_protect_mist_target/MIST.png"
    assert "diff_protect_mist_target" in config["checkpoints"]
    assert cfg.pixel_barrier_target_file(config["pixel_barrier"], "texture_only") == target["file"]
    assert "registry diff_protect_mist_target" in pixel_barrier.target_text(config["pixel_barrier"])
    mini = cfg.load_config({"preset": "mini"})["pixel_barrier"]
    assert "checkerboard" in pixel_barrier.target_text(mini)  # the mini/smoke stand-in, named as such


def test_a_target_checkpoint_must_be_downloaded_and_not_doubled():
    with pytest.raises(cfg.ConfigError, match="add it to the preset's 'checkpoints' list too"):
        cfg.load_config({"preset": "mini", "pixel_barrier": {"target": {"checkpoint": "diff_protect_mist_target"}}})
    with pytest.raises(cfg.ConfigError, match="is not a checkpoint of config/checkpoints.yaml"):
        cfg.load_config({"preset": "imagenet", "pixel_barrier": {"target": {"checkpoint": "no_such_image"}}})


# --- 5: both "PhotoGuard"s run, named apart ---------------------------------------------------------------------------

def test_both_photoguards_run_by_default_under_unambiguous_names():
    attacks = schema_defaults()["attacks"]
    assert "texture_only" in attacks and "photoguard_encoder" in attacks and "photoguard" not in attacks
    rows = pixel_barrier.paper_rows(attacks)["paper's row"]
    assert rows["texture_only"].startswith("PhotoGuard") and "not a row" in rows["photoguard_encoder"]
    assert rows["sds_minus"] == "SDS(-)" and rows["mist"] == "Mist"
    with pytest.raises(ValueError, match="unknown protective attack 'photoguard'"):
        protective.objective_for("photoguard", ldm=object())


# --- 6: the stored images, exact or as Diff-Protect's astype(uint8) ---------------------------------------------------

def test_released_storage_truncates_and_darkens_the_clean_reference():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    stored = protective.stored_images(x, "released_uint8")
    scaled = (255 * x).double()
    away_from_integers = (scaled - scaled.round()).abs() > 1e-3
    assert torch.equal((stored * 255).round()[away_from_integers].double(), scaled.floor()[away_from_integers])
    assert torch.equal(protective.stored_images(x, "float32"), x)
    # the clean images v/255 as Diff-Protect's chain stores them: v/127.5 - 1, then (x + 1)/2 * 255, astype(uint8)
    values = np.arange(256, dtype=np.uint8)
    released = (np.clip(((values.astype(np.float32) / np.float32(127.5) - 1) + 1) / 2, 0, 1) * np.float32(255.0))
    clean = protective.released_uint8(torch.from_numpy(values).float() / 255).numpy()
    assert np.array_equal(clean, released.astype(np.uint8))
    assert np.array_equal(np.nonzero(clean != values)[0], np.arange(1, 64))  # one level darker at 1..63
    assert (values.astype(int) - clean).max() == 1


def test_the_imagenet_preset_stores_as_released_and_the_default_exactly():
    assert schema_defaults()["storage"] == "float32"
    assert cfg.load_config({"preset": "imagenet"})["pixel_barrier"]["storage"] == "released_uint8"
    assert "storage" in cfg.PIXEL_BARRIER_JOB_KEYS["protect"] and "step_size" in cfg.PIXEL_BARRIER_JOB_KEYS["protect"]


def test_the_protect_job_stores_its_sets_and_clean_reference_as_the_storage_says(monkeypatch):
    """Through protect_job: with released_uint8 the random control and the clean reference are Diff-Protect's
    truncated PNG values (pixels v = 1..63 of the clean images one level down); with float32 they are exact."""
    from diffrobust.networks import ldm as ldm_lib

    torch.manual_seed(0)
    tiny = ldm_lib.build_mini_ldm({"image_channels": 1, "image_size": 16, "latent_channels": 4,
                                   "vae_channels": [8, 8, 16], "unet_channels": [8, 16], "num_classes": 3,
                                   "prompt_tokens": 2, "cross_attention_dim": 8, "norm_num_groups": 4,
                                   "attention_head_dim": 4})
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x01 = values.float() / 255
    monkeypatch.setattr(pixel_barrier, "load_models", lambda models, settings, device: {"ldm": tiny})
    monkeypatch.setattr(pixel_barrier, "evaluation_images",
                        lambda dataset_dir, subset: (x01, torch.zeros(1).long(), np.arange(1)))
    settings = {**schema_defaults(), "budgets": [8 / 255], "batch_size": 1, "seed": 0}
    stored = {}
    for storage in ("float32", "released_uint8"):
        arrays = pixel_barrier.protect_job("random", settings={**settings, "storage": storage}, subset={}, models={},
                                           dataset_dir=None)
        assert str(arrays["storage"]) == storage
        stored[storage] = arrays
    exact, released = stored["float32"], stored["released_uint8"]
    assert np.array_equal(exact["x_clean"], x01.numpy())
    darker = values.numpy().astype(int) - np.round(released["x_clean"] * 255).astype(int)
    assert np.array_equal(np.nonzero(darker.ravel())[0], np.arange(1, 64)) and darker.max() == 1
    control = exact["eps0/x"] * 255  # clean ± 8 levels, clipped
    assert np.array_equal(np.round(released["eps0/x"] * 255), protective.released_uint8(
        torch.from_numpy(exact["eps0/x"])).numpy().astype(np.float32))
    assert (np.round(released["eps0/x"] * 255) <= np.round(control)).all()  # truncation never brightens
