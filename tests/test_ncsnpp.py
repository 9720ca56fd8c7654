"""score_sde NCSN++ (DiffPure's CIFAR-10 purifier network) against the official code's fixtures, and its checkpoint
format (EMA shadow params copied by position) through the registry loader."""

import copy
import json

import pytest
import torch
import yaml

from diffrobust import models
from diffrobust.errors import DiffrobustError
from diffrobust.networks import build_network, ncsnpp

MANIFEST = "score_sde_ncsnpp_cifar10_ddpmpp_deep_continuous.json"
REGISTRY_NAME = "score_sde_cifar10_vp_ddpmpp_deep"


@pytest.fixture(scope="module")
def small(fixtures_dir):
    return torch.load(fixtures_dir / "architectures" / "score_sde_ncsnpp_small.pt", weights_only=True)


@pytest.fixture(scope="module")
def mimic(fixtures_dir):
    return torch.load(fixtures_dir / "architectures" / "score_sde_checkpoint_mimic.pt", weights_only=True)


@pytest.fixture(scope="module")
def manifest(fixtures_dir):
    return json.loads((fixtures_dir / "architectures" / MANIFEST).read_text())


def state_dict_manifest(module):
    """[[key, shape, dtype], ...] in state-dict order, as the fixtures' JSON manifests write it."""
    return [[key, list(t.shape), str(t.dtype).removeprefix("torch.")] for key, t in module.state_dict().items()]


def small_network(small):
    network = ncsnpp.build_score_sde_ncsnpp(ncsnpp.flat_config(small["config"]))
    network.load_state_dict(small["state_dict"], strict=True)
    return network.eval()


def load_checkpoint(tmp_path, mimic, checkpoint=None):
    """A score_sde checkpoint (default: the mimic's) written as checkpoint_8.pth and loaded through a one-entry
    registry with the mimic's config."""
    folder = tmp_path / "tiny_score_sde"
    folder.mkdir(exist_ok=True)
    torch.save(mimic["checkpoint"] if checkpoint is None else checkpoint, folder / "checkpoint_8.pth")
    registry = {"tiny_score_sde": {
        "description": "the small NCSN++ in score_sde's checkpoint format",
        "files": [{"path": "checkpoint_8.pth", "urls": []}],
        "architecture": {"family": "score_sde_ncsnpp", "config": ncsnpp.flat_config(mimic["config"])}}}
    return models.load_registry_checkpoint("tiny_score_sde", root=tmp_path, registry=registry)


# --- the network ----------------------------------------------------------------------------------------------


def test_small_network_matches_the_official_output(small):
    network = small_network(small)
    assert list(network.state_dict()) == list(small["state_dict"])
    with torch.no_grad():
        out = network(small["x"], small["t_label"])
    assert out.shape == small["x"].shape
    assert (out - small["out"]).abs().max().item() < 1e-5


def test_cifar10_network_has_the_official_state_dict_and_parameter_order(manifest, repo_root):
    registry = yaml.safe_load((repo_root / "config" / "checkpoints.yaml").read_text())
    architecture = registry[REGISTRY_NAME]["architecture"]
    assert architecture["family"] == "score_sde_ncsnpp"
    assert architecture["config"] == manifest["config"] == ncsnpp.CIFAR10_DDPMPP_DEEP_CONTINUOUS
    with torch.device("meta"):  # 106.6M parameters, no memory
        network = build_network(architecture)
    assert state_dict_manifest(network) == manifest["state_dict"]
    assert sum(p.numel() for p in network.parameters()) == manifest["num_parameters"] == 106_632_579
    # the order the checkpoint's EMA shadow list follows
    assert [name for name, _ in network.named_parameters()] == manifest["parameters_order"]


def test_registry_entry_implies_diffpures_vp_sde():
    architecture = {"family": "score_sde_ncsnpp", "config": dict(ncsnpp.CIFAR10_DDPMPP_DEEP_CONTINUOUS)}
    assert models.registry_diffusion_settings(architecture) == models.diffusion_settings(
        "vpsde", 1000, beta_min=0.1, beta_d=19.9)
    assert models.time_input(architecture) == "continuous"
    assert models.time_input({"family": "guided_diffusion_unet"}) == "discrete"
    assert models.time_input({"family": "adm_unet"}) == "discrete"


def test_network_options_that_are_not_the_cifar10_path(small):
    config = ncsnpp.flat_config(small["config"])
    x, labels = small["x"], small["t_label"]
    network = small_network(small)
    with torch.no_grad():
        reference = network(x, labels)
        # centered: false takes [0, 1] images and maps them to [-1, 1] itself
        uncentered = ncsnpp.build_score_sde_ncsnpp({**config, "centered": False})
        uncentered.load_state_dict(small["state_dict"])
        assert (uncentered.eval()((x + 1) / 2, labels) - reference).abs().max().item() < 1e-5
        # scale_by_sigma divides by the SMLD noise level the (integer) label indexes
        scaled = ncsnpp.build_score_sde_ncsnpp({**config, "scale_by_sigma": True})
        scaled.load_state_dict(small["state_dict"])
        sigmas = small["state_dict"]["sigmas"][labels.long()].float().reshape(-1, 1, 1, 1)
        assert (scaled.eval()(x, labels) - reference / sigmas).abs().max().item() < 1e-5
        # an unconditional network has no embedding MLP and ignores time
        unconditional = ncsnpp.build_score_sde_ncsnpp({**config, "conditional": False}).eval()
        assert "all_modules.0.weight" in unconditional.state_dict()
        assert unconditional.state_dict()["all_modules.0.weight"].shape == (32, 3, 3, 3)  # the input conv
        assert torch.equal(unconditional(x, labels), unconditional(x, labels * 0.5))
        # a scalar label is broadcast over the batch
        assert torch.equal(network(x, labels[:1].expand(2)), network(x, float(labels[0])))


@pytest.mark.parametrize("key, value", [
    ("fir", True), ("progressive", "output_skip"), ("progressive_input", "residual"), ("resblock_type", "ddpm"),
    ("embedding_type", "fourier"), ("name", "ddpm"), ("attention_type", "legacy"),
])
def test_builder_refuses_options_it_does_not_implement(key, value):
    with pytest.raises(ValueError, match=f"config key '{key}' = {value!r} is not implemented"):
        ncsnpp.build_score_sde_ncsnpp({key: value})


def test_builder_refuses_unknown_keys_malformed_values_and_the_nested_form(small):
    with pytest.raises(ValueError, match="unknown score_sde_ncsnpp config keys: nff"):
        ncsnpp.build_score_sde_ncsnpp({"nff": 32})
    with pytest.raises(ValueError, match="unknown .* data, model, optim, sampling, training .*flat_config"):
        ncsnpp.build_score_sde_ncsnpp(small["config"])
    with pytest.raises(ValueError, match="'fir' must be true or false"):
        ncsnpp.build_score_sde_ncsnpp({"fir": "no"})
    with pytest.raises(ValueError, match="'ch_mult' must be a list of at least one positive"):
        ncsnpp.build_score_sde_ncsnpp({"ch_mult": []})
    with pytest.raises(ValueError, match="'image_size' \\(20\\) must be divisible by"):
        ncsnpp.build_score_sde_ncsnpp({"image_size": 20})
    with pytest.raises(ValueError, match="only continuous VP models"):
        ncsnpp.flat_config({**small["config"], "training": {"sde": "vesde", "continuous": True}})
    # the official code lower-cases these names
    assert ncsnpp.validated_config({"resblock_type": "BigGAN", "nonlinearity": "Swish"})["resblock_type"] == "BigGAN"


# --- score_sde's checkpoint format ----------------------------------------------------------------------------


def with_training_weights(mimic, seed=0, scale=0.05):
    """The mimic's checkpoint with 'model' parameters that differ from its EMA. (The fixture's 'model' entry holds
    exactly its EMA values, although its README says they differ, so by itself it cannot tell them apart.)"""
    generator = torch.Generator().manual_seed(seed)
    model = {key: value if key == "module.sigmas" else value + scale * torch.randn(value.shape, generator=generator)
             for key, value in mimic["checkpoint"]["model"].items()}
    return {**mimic["checkpoint"], "model": model}


def test_checkpoint_loads_the_ema_weights_that_diffpure_runs(tmp_path, mimic):
    loaded = load_checkpoint(tmp_path, mimic)
    assert loaded.kind == "diffusion" and not loaded.network.training
    assert loaded.diffusion_settings == models.diffusion_settings("vpsde", 1000, beta_min=0.1, beta_d=19.9)
    assert models.time_input(loaded) == "continuous"
    x, labels = mimic["x"], mimic["t_label"]
    with torch.no_grad():
        assert (loaded.network(x, labels) - mimic["out_ema"]).abs().max().item() < 1e-5

    # with training weights that differ from the EMA, the loader still gives the EMA network's output
    checkpoint = with_training_weights(mimic)
    loaded = load_checkpoint(tmp_path, mimic, checkpoint)
    raw = ncsnpp.build_score_sde_ncsnpp(ncsnpp.flat_config(mimic["config"]))
    raw.load_state_dict({key.removeprefix("module."): value for key, value in checkpoint["model"].items()})
    with torch.no_grad():
        out, raw_out = loaded.network(x, labels), raw.eval()(x, labels)
    assert (out - mimic["out_ema"]).abs().max().item() < 1e-5
    assert (raw_out - mimic["out_ema"]).abs().max().item() > 1e-2  # the 'model' weights were not taken
    assert torch.equal(loaded.network.sigmas, checkpoint["model"]["module.sigmas"])  # buffers come from 'model'


def test_a_plain_state_dict_loads_too(tmp_path, mimic, small):
    loaded = load_checkpoint(tmp_path, mimic, {f"module.{k}": v for k, v in small["state_dict"].items()})
    with torch.no_grad():
        assert (loaded.network(small["x"], small["t_label"]) - small["out"]).abs().max().item() < 1e-5


def _with_shadow(mimic, edit):
    checkpoint = copy.copy(mimic["checkpoint"])
    checkpoint["ema"] = {**checkpoint["ema"], "shadow_params": edit(list(checkpoint["ema"]["shadow_params"]))}
    return checkpoint


def test_an_ema_list_of_the_wrong_length_or_shape_names_the_file(tmp_path, mimic):
    path = tmp_path / "tiny_score_sde" / "checkpoint_8.pth"
    with pytest.raises(models.ModelFileError) as error:
        load_checkpoint(tmp_path, mimic, _with_shadow(mimic, lambda shadow: shadow[:-1]))
    assert isinstance(error.value, DiffrobustError)
    assert str(path) in str(error.value) and "EMA holds 153 shadow parameters" in str(error.value)
    assert "has 154" in str(error.value)

    def wrong_shape(shadow):
        shadow[5] = torch.zeros(3, 3)
        return shadow

    with pytest.raises(models.ModelFileError) as error:
        load_checkpoint(tmp_path, mimic, _with_shadow(mimic, wrong_shape))
    message = str(error.value)
    assert str(path) in message and "EMA shadow parameter 5 has shape (3, 3)" in message
    assert "(all_modules.2.bias) has shape (32,)" in message

    no_buffers = {**mimic["checkpoint"], "model": {}}
    with pytest.raises(models.ModelFileError, match="lacks the buffers sigmas"):
        load_checkpoint(tmp_path, mimic, no_buffers)


# --- the eps interface ----------------------------------------------------------------------------------------


def test_eps_model_passes_the_time_label_straight_to_the_network(tmp_path, mimic):
    loaded = load_checkpoint(tmp_path, mimic)
    eps = models.eps_model(loaded)
    assert isinstance(eps, models.ScoreSDEEps)
    x, labels = mimic["x"], mimic["t_label"]
    with torch.no_grad():
        assert torch.equal(eps(x, labels), loaded.network(x, labels))
        assert torch.equal(eps(x, 411.5), loaded.network(x, torch.full((2,), 411.5)))  # not floored
        assert torch.equal(models.eps_model(loaded, unconditional=True)(x, labels), loaded.network(x, labels))
    with pytest.raises(ValueError, match="unconditional.*pass no labels"):
        eps(x, labels, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="guidance needs a model with a null class"):
        models.eps_model(loaded, guidance_scale=1.0)
    assert models.num_label_classes(loaded) is None
