"""diffrobust.models: the model file format, registry checkpoints in their official formats, the eps interfaces."""

import math

import numpy as np
import pytest
import torch

from helpers import randomize

from diffrobust import diffusion as D
from diffrobust import models
from diffrobust.networks import adm, edm
from diffrobust.networks.classifiers import build_small_resnet
from diffrobust.training import multihead_from_conditional

# A tiny class-conditional MNIST-like UNet: 8x8 single-channel images, 3 classes + null class 3.
TINY_UNET = {"family": "adm_unet", "config": {
    "image_size": 8, "in_channels": 1, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
    "attention_resolutions": "4", "num_heads": 2, "class_cond": True, "num_classes": 4}}
TINY_SETTINGS = {"schedule": "linear", "num_timesteps": 50, "learn_sigma": False, "rescale_timesteps": False,
                 "null_class": 3}
TINY_CLASSIFIER = {"family": "small_resnet", "config": {"in_channels": 1, "num_classes": 3, "width": 8, "depth": 8}}


def tiny_unet(seed=0, architecture=TINY_UNET):
    return randomize(models.build_architecture(architecture), seed).eval()


def inputs(seed=1, n=3, channels=1, size=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=generator), torch.tensor([3.0, 17.5, 40.0][:n])


# --- building -----------------------------------------------------------------------------------------------------

def test_adm_unet_with_default_extras_is_the_guided_diffusion_network(fixtures_dir):
    flags = torch.load(fixtures_dir / "architectures" / "guided_diffusion_small.pt", weights_only=True)["config"]
    torch.manual_seed(0)
    official = adm.build_guided_diffusion_unet(flags)
    torch.manual_seed(0)
    ours = models.build_adm_unet(flags)
    assert list(ours.state_dict()) == list(official.state_dict())
    assert all(torch.equal(ours.state_dict()[k], value) for k, value in official.state_dict().items())


def test_adm_unet_extra_keys_set_channels_classes_heads_and_resampling():
    net = models.build_adm_unet({**TINY_UNET["config"], "output_heads": 5, "class_cond": False, "learn_sigma": True})
    assert net.in_channels == 1 and net.out_channels == 5 * 2 and net.num_classes is None
    assert net.input_blocks[0][0].weight.shape[1] == 1 and net.out[2].weight.shape[0] == 10
    conditional = models.build_adm_unet({**TINY_UNET["config"], "conv_resample": False})
    assert conditional.label_emb.num_embeddings == 4
    downsample = conditional.input_blocks[2][0]  # the level change after input conv + one residual block
    assert isinstance(downsample.op, torch.nn.AvgPool2d)  # no strided convolution
    x, t = inputs()
    assert conditional(x, t, y=torch.tensor([0, 1, 3])).shape == x.shape
    with pytest.raises(ValueError, match="in_channels"):
        models.build_adm_unet({**TINY_UNET["config"], "in_channels": 0})
    with pytest.raises(ValueError, match="conv_resample"):
        models.build_adm_unet({**TINY_UNET["config"], "conv_resample": "no"})


def test_adm_unet_config_of_rebuilds_the_same_network():
    for extra in ({}, {"learn_sigma": True, "conv_resample": False, "class_cond": False},
                  {"patch_size": 2, "attention_resolutions": "2"}):
        network = models.build_adm_unet({**TINY_UNET["config"], **extra})
        again = models.build_adm_unet(models.adm_unet_config_of(network))
        shapes = {k: v.shape for k, v in network.state_dict().items()}
        assert {k: v.shape for k, v in again.state_dict().items()} == shapes
        assert again.conv_resample == network.conv_resample
        assert again.patch_size == network.patch_size == extra.get("patch_size", 1)
        assert again.attention_resolutions == network.attention_resolutions


def test_patched_adm_unet_is_the_unpatched_network_on_pixel_unshuffled_images():
    # image 8x8x1 in 2x2 patches = a 4x4x4 image; flags describe the patched grid (attention at its 2x2 level)
    patched = tiny_unet(architecture={"family": "adm_unet", "config": {
        **TINY_UNET["config"], "patch_size": 2, "attention_resolutions": "2", "learn_sigma": True}})
    assert patched.image_size == 8 and patched.in_channels == 1 and patched.out_channels == 2
    plain = models.build_adm_unet({**TINY_UNET["config"], "image_size": 4, "in_channels": 4,
                                   "attention_resolutions": "2", "learn_sigma": True})
    plain.load_state_dict(patched.state_dict())  # the same parameters, shape for shape
    plain.eval()  # as `patched`: the same steps (train mode takes the official ones, eval mode the CPU fast path)
    x, t = inputs()
    y = torch.tensor([0, 2, 3])
    with torch.no_grad():
        out = patched(x, t, y)
        expected = torch.nn.functional.pixel_shuffle(plain(torch.nn.functional.pixel_unshuffle(x, 2), t, y), 2)
    assert out.shape == (3, 2, 8, 8)
    assert torch.equal(out, expected)
    # channel 0 of the output is eps of the image's channel: the unshuffled eps patch channels are 0..3
    assert torch.equal(out[:, :1], torch.nn.functional.pixel_shuffle(
        plain(torch.nn.functional.pixel_unshuffle(x, 2), t, y)[:, :4], 2))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        models.build_adm_unet({**TINY_UNET["config"], "patch_size": 3})


def test_small_resnet_checks_its_config():
    net = build_small_resnet({"in_channels": 1, "num_classes": 7, "width": 8, "depth": 14})
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    assert sum(1 for m in net.modules() if type(m).__name__ == "PreActBlock") == 6  # (14 - 2) / 6 = 2 per stage
    with pytest.raises(ValueError, match="6n\\+2"):
        build_small_resnet({"depth": 10})
    with pytest.raises(ValueError, match="unknown small_resnet config keys: heads"):
        build_small_resnet({"heads": 2})


# --- diffusion settings ---------------------------------------------------------------------------------------------

def test_diffusion_settings_defaults_and_errors():
    settings = models.diffusion_settings("cosine", 4000, learn_sigma=True, rescale_timesteps=True)
    assert settings["variance"] == "learned_range" and settings["null_class"] is None
    assert models.diffusion_settings("linear", 10)["variance"] == "fixed_large"
    with pytest.raises(ValueError, match="schedule"):
        models.diffusion_settings("quadratic", 10)
    with pytest.raises(ValueError, match="learn_sigma=True"):
        models.diffusion_settings("linear", 10, variance="learned_range")
    with pytest.raises(ValueError, match="beta_d"):
        models.diffusion_settings("vpsde", 1000, beta_min=0.1)


def test_build_diffusion_schedules():
    cosine = models.build_diffusion(models.diffusion_settings("cosine", 4000, learn_sigma=True, rescale_timesteps=True))
    assert np.array_equal(cosine.betas, D.cosine_betas(4000)) and cosine.timestep_scale == 0.25
    assert cosine.alpha_bar(10.5) == pytest.approx(D.cosine_alpha_bar(10.5, 4000))
    linear = models.build_diffusion(TINY_SETTINGS)
    assert np.array_equal(linear.betas, D.linear_betas(50)) and linear.variance == "fixed_large"
    vp = models.build_diffusion(models.diffusion_settings("vpsde", 1000, beta_min=0.1, beta_d=19.9))
    for time in (1, 37, 500, 1000):
        assert vp.alpha_bar(time) == pytest.approx(D.vpsde_alpha_bar(time / 1000), rel=1e-12)
    assert vp.alpha_bar(12.5) == pytest.approx(D.vpsde_alpha_bar(0.0125), rel=1e-12)
    # the VP-SDE sampled at k/1000 is close to (within 8 %), but not, the discrete linear-1000 table
    linear_1000 = models.build_diffusion(models.diffusion_settings("linear", 1000)).alphas_cumprod
    relative = np.abs(vp.alphas_cumprod / linear_1000 - 1)
    assert 0.01 < relative.max() < 0.08 and relative[:100].max() < 1e-3


# --- save / load ----------------------------------------------------------------------------------------------------

def round_trip_cases():
    conditional = tiny_unet()
    multihead, multihead_architecture = multihead_from_conditional(conditional, 3, fold_label=3)
    classifier = randomize(models.build_architecture(TINY_CLASSIFIER), 5)
    return {
        "diffusion": (conditional, TINY_UNET, TINY_SETTINGS, inputs() + (torch.tensor([0, 2, 3]),)),
        "multihead_diffusion": (multihead, multihead_architecture, {**TINY_SETTINGS, "null_class": None}, inputs()),
        "classifier": (classifier, TINY_CLASSIFIER, None, (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)),)),
    }


@pytest.mark.parametrize("kind", models.KINDS)
def test_save_load_round_trip(tmp_path, kind):
    network, architecture, settings, arguments = round_trip_cases()[kind]
    network.eval()
    path = models.save_model(tmp_path / "sub" / "model.pt", network, kind=kind, architecture=architecture,
                             diffusion=settings, extra={"num_classes": 3, "note": ("a", 1)})
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temporary file left behind
    loaded = models.load_model(path)
    assert loaded.kind == kind
    assert loaded.architecture["family"] == architecture["family"]
    assert loaded.extra == {"num_classes": 3, "note": ["a", 1]}
    assert not loaded.network.training
    assert not any(p.requires_grad for p in loaded.network.parameters())
    for key, value in network.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[key], value), key
    with torch.no_grad():
        if kind == "diffusion":
            x, t, y = arguments
            assert torch.equal(loaded.network(x, t, y=y), network(x, t, y=y))
        else:
            assert torch.equal(loaded.network(*arguments), network(*arguments))
    if settings is None:
        assert loaded.diffusion is None and loaded.diffusion_settings is None
    else:
        assert loaded.diffusion_settings == models.diffusion_settings(**settings)
        assert np.array_equal(loaded.diffusion.alphas_cumprod, np.cumprod(1 - D.linear_betas(50)))


def test_save_model_checks_kind_and_settings(tmp_path):
    network = tiny_unet()
    with pytest.raises(ValueError, match="kind"):
        models.save_model(tmp_path / "m.pt", network, kind="unet", architecture=TINY_UNET, diffusion=TINY_SETTINGS)
    with pytest.raises(ValueError, match="needs diffusion settings"):
        models.save_model(tmp_path / "m.pt", network, kind="diffusion", architecture=TINY_UNET)
    with pytest.raises(ValueError, match="takes no diffusion settings"):
        models.save_model(tmp_path / "m.pt", network, kind="classifier", architecture=TINY_UNET, diffusion=TINY_SETTINGS)
    assert not list(tmp_path.iterdir())


def test_load_model_explains_foreign_and_missing_files(tmp_path):
    raw = tmp_path / "raw.pt"
    torch.save(tiny_unet().state_dict(), raw)
    with pytest.raises(models.ModelFileError, match="not a diffrobust model file"):
        models.load_model(raw)
    with pytest.raises(FileNotFoundError, match="nothing.pt not found"):
        models.load_model(tmp_path / "nothing.pt")
    good = models.save_model(tmp_path / "good.pt", tiny_unet(), kind="diffusion", architecture=TINY_UNET,
                             diffusion=TINY_SETTINGS)
    record = torch.load(good, weights_only=True)
    record["architecture"] = {"family": "adm_unet", "config": {**TINY_UNET["config"], "num_channels": 64}}
    torch.save(record, tmp_path / "mismatch.pt")
    with pytest.raises(models.ModelFileError, match="do not fit the network"):
        models.load_model(tmp_path / "mismatch.pt")


# --- official checkpoints -------------------------------------------------------------------------------------------

def registry_with(name, family, config, path, **entry):
    return {name: {"description": f"test entry {name}", "files": [{"path": path, "urls": ["https://example.org/x"]}],
                   "architecture": {"family": family, "config": config}, **entry}}


def test_guided_diffusion_state_dict_loads_with_its_diffusion_settings(tmp_path, fixtures_dir):
    reference = torch.load(fixtures_dir / "architectures" / "guided_diffusion_small.pt", weights_only=True)
    (tmp_path / "gd").mkdir()
    torch.save(reference["state_dict"], tmp_path / "gd" / "small.pt")  # guided-diffusion saves a bare state dict
    registry = registry_with("gd", "guided_diffusion_unet", reference["config"], "small.pt")
    loaded = models.load_registry_checkpoint("gd", root=tmp_path, registry=registry)
    assert loaded.kind == "diffusion" and loaded.extra["registry_name"] == "gd"
    assert loaded.diffusion_settings == {"schedule": "linear", "num_timesteps": 1000, "learn_sigma": True,
                                         "rescale_timesteps": False, "null_class": None, "variance": "learned_range"}
    assert np.array_equal(loaded.diffusion.betas, D.linear_betas(1000)) and loaded.diffusion.timestep_scale == 1.0
    with torch.no_grad():
        out = models.eps_model(loaded)(reference["x"], reference["t"], reference["y"])
    assert (out - reference["out"]).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="no null class"):
        models.eps_model(loaded, unconditional=True)


def test_improved_diffusion_checkpoint_gets_cosine_rescaled_settings(tmp_path):
    flags = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "8",
             "learn_sigma": True, "diffusion_steps": 4000, "noise_schedule": "cosine", "num_heads": 2}
    torch.manual_seed(0)
    official = randomize(adm.build_improved_diffusion_unet(flags), 4).eval()
    (tmp_path / "idm").mkdir()
    torch.save(official.state_dict(), tmp_path / "idm" / "weights.pt")
    loaded = models.load_registry_checkpoint(
        "idm", root=tmp_path, registry=registry_with("idm", "improved_diffusion_unet", flags, "weights.pt"))
    settings = loaded.diffusion_settings
    assert (settings["schedule"], settings["num_timesteps"], settings["rescale_timesteps"]) == ("cosine", 4000, True)
    assert loaded.diffusion.timestep_scale == 0.25
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = models.eps_model(loaded)
    with torch.no_grad():
        # diffusion.py hands the network rescaled timesteps; the eps model passes them on unchanged
        assert torch.equal(model(x, torch.tensor([250.0, 7.0])), official(x, torch.tensor([250.0, 7.0])))


def test_robustbench_checkpoint_is_unwrapped_and_unprefixed(tmp_path):
    config = {"depth": 10, "widen_factor": 1, "num_classes": 10}
    official = randomize(models.build_architecture({"family": "robustbench_wrn", "config": config}), 6, 0.2).eval()
    (tmp_path / "rb").mkdir()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in official.state_dict().items()}, "epoch": 100}
    torch.save(wrapped, tmp_path / "rb" / "Standard.pt")
    loaded = models.load_registry_checkpoint(
        "rb", root=tmp_path, registry=registry_with("rb", "robustbench_wrn", config, "Standard.pt"))
    assert loaded.kind == "classifier" and loaded.diffusion is None
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(models.classifier(loaded)(x), official(x))
    with pytest.raises(ValueError, match="no eps prediction"):
        models.eps_model(loaded)



def _edm_fixture_as_registry_checkpoint(tmp_path, fixtures_dir, fixture, precond):
    """(fixture, LoadedModel): an EDM fixture's network written as an NVlabs/edm pickle and loaded through a
    one-entry registry with the given `precond`."""
    from test_networks_edm import write_edm_like_pickle  # the EDM-format writer of the EDM reader's own tests

    small = torch.load(fixtures_dir / "architectures" / fixture, weights_only=True)
    config = {**small["config"], "precond": precond}
    network = edm.build_edm_vp_songunet(config)
    network.load_state_dict(small["state_dict"])
    (tmp_path / "edm").mkdir()
    write_edm_like_pickle(tmp_path / "edm" / "net.pkl", network.eval().requires_grad_(False), small["config"])
    loaded = models.load_registry_checkpoint(
        "edm", root=tmp_path, registry=registry_with("edm", "edm_vp_songunet", config, "net.pkl"))
    return small, loaded


def test_edm_pickle_loads_and_its_eps_adapter_inverts_the_denoiser(tmp_path, fixtures_dir):
    small, loaded = _edm_fixture_as_registry_checkpoint(tmp_path, fixtures_dir, "edm_vp_songunet_small.pt", "vp")
    assert loaded.diffusion_settings["schedule"] == "vpsde"
    chain = loaded.diffusion
    model = models.eps_model(loaded)
    assert isinstance(model, models.EDMVPEps)
    x_t = small["x"] * 0.5
    labels = torch.tensor([4, 9])
    for time in (20, 300.5):
        alpha_bar = chain.alpha_bar(time)
        sigma = math.sqrt(1 / alpha_bar - 1)
        with torch.no_grad():
            eps = model(x_t, torch.full((2,), chain.time_to_model_timestep(time)), labels)
            denoised = loaded.network(x_t / math.sqrt(alpha_bar), torch.full((2,), sigma),
                                      torch.nn.functional.one_hot(labels, 10))
        expected = (x_t / math.sqrt(alpha_bar) - denoised) / sigma  # eps = (x - D(x; sigma)) / sigma
        assert (eps - expected).abs().max().item() < 2e-4 * max(1.0, 1 / sigma)
    one_shot = D.one_shot_denoise(model, chain, x_t, 20, clip_denoised=False, y=labels)
    with torch.no_grad():
        reference = loaded.network(x_t / math.sqrt(chain.alpha_bar(20)), math.sqrt(1 / chain.alpha_bar(20) - 1),
                                   torch.nn.functional.one_hot(labels, 10))
    assert (one_shot - reference).abs().max().item() < 1e-4


def test_edm_precond_pickle_gets_an_eps_adapter_of_its_own_denoiser(tmp_path, fixtures_dir):
    # The released edm-cifar10-32x32-*-vp.pkl are EDMPrecond: a denoiser D(x; sigma) for any sigma, queried on the
    # VP SDE's chain. The adapter must give eps = (x - D(x; sigma)) / sigma of EDMPrecond's D, not VPPrecond's.
    small, loaded = _edm_fixture_as_registry_checkpoint(tmp_path, fixtures_dir, "edm_precond_songunet_small.pt", "edm")
    assert isinstance(loaded.network, edm.EDMPrecond) and loaded.kind == "diffusion"
    assert loaded.diffusion_settings == models.diffusion_settings("vpsde", 1000, beta_min=0.1, beta_d=19.9)
    assert models.num_label_classes(loaded) == 10
    chain = loaded.diffusion
    model = models.eps_model(loaded)
    assert isinstance(model, models.EDMPrecondEps)
    x_t = small["x"] * 0.5
    labels = torch.tensor([4, 9, 0])
    one_hot = torch.nn.functional.one_hot(labels, 10)
    # What the loader gave before: the same weights read as VPPrecond (the same keys load strictly).
    as_vp = edm.build_edm_vp_songunet({**small["config"], "precond": "vp"})
    as_vp.load_state_dict(small["state_dict"], strict=True)
    vp_view = models.EDMVPEps(as_vp.eval(), 1000)
    for time in (1, 20, 300.5, 1000):
        alpha_bar = chain.alpha_bar(time)
        sigma = math.sqrt(1 / alpha_bar - 1)
        t_model = torch.full((3,), chain.time_to_model_timestep(time))
        with torch.no_grad():
            eps = model(x_t, t_model, labels)
            denoised = loaded.network(x_t / math.sqrt(alpha_bar), torch.full((3,), sigma), one_hot)
            wrong = vp_view(x_t, t_model, labels)
        assert model.sigma(t_model, x_t).tolist() == pytest.approx([sigma] * 3, rel=1e-9)
        expected = (x_t / math.sqrt(alpha_bar) - denoised) / sigma  # eps = (x - D(x; sigma)) / sigma
        assert (eps - expected).abs().max().item() < 2e-5 * max(1.0, 1 / sigma)
        assert (wrong - expected).abs().max().item() > 0.05
    with torch.no_grad():
        unlabelled = model(x_t, torch.full((3,), 19.0))
        zero_labels = loaded.network.noise_prediction(x_t / math.sqrt(chain.alpha_bar(20)),
                                                      math.sqrt(1 / chain.alpha_bar(20) - 1),
                                                      torch.zeros(3, 10))
    torch.testing.assert_close(unlabelled, zero_labels)  # y=None: all-zero labels, EDM's convention

    # a defense's one-shot denoising gets EDMPrecond's D(x; sigma) back
    one_shot = D.one_shot_denoise(model, chain, x_t, 20, clip_denoised=False, y=labels)
    with torch.no_grad():
        reference = loaded.network(x_t / math.sqrt(chain.alpha_bar(20)), math.sqrt(1 / chain.alpha_bar(20) - 1),
                                   one_hot)
    assert (one_shot - reference).abs().max().item() < 1e-4


def test_missing_checkpoint_file_says_what_to_do(tmp_path):
    registry = registry_with("gd", "guided_diffusion_unet", {"image_size": 64}, "model.pt")
    with pytest.raises(models.CheckpointNotFoundError) as error:
        models.load_registry_checkpoint("gd", root=tmp_path, registry=registry)
    message = str(error.value)
    assert str(tmp_path / "gd" / "model.pt") in message and "snakemake" in message and "test entry gd" in message
    manual = registry_with("rb", "robustbench_wrn", {}, "Standard.pt", manual="Open the Drive link by hand.")
    with pytest.raises(FileNotFoundError, match="Open the Drive link by hand"):
        models.load_registry_checkpoint("rb", root=tmp_path, registry=manual)
    with pytest.raises(KeyError, match="not in the registry"):
        models.load_registry_checkpoint("nope", root=tmp_path, registry=registry)
    with pytest.raises(ValueError, match="no loader"):
        models.load_registry_checkpoint("x", root=tmp_path, registry=registry_with("x", "vit", {}, "m.bin"))


def test_project_registry_names_resolve_to_files_under_root(tmp_path, repo_root):
    with pytest.raises(models.CheckpointNotFoundError, match="cifar10_uncond_50M_500K.pt"):
        models.load_registry_checkpoint("improved_diffusion_cifar10_uncond", root=tmp_path)


# --- eps interfaces -------------------------------------------------------------------------------------------------

def loaded_tiny(seed=0):
    network = tiny_unet(seed).requires_grad_(False)
    return models.LoadedModel(network=network, kind="diffusion", architecture=TINY_UNET,
                              diffusion=models.build_diffusion(TINY_SETTINGS),
                              diffusion_settings=models.diffusion_settings(**TINY_SETTINGS))


def test_conditional_unconditional_and_guided_eps_of_a_null_class_model():
    loaded = loaded_tiny()
    x, t = inputs()
    y = torch.tensor([0, 2, 1])
    with torch.no_grad():
        by_class = loaded.network(x, t, y=y)
        null = loaded.network(x, t, y=torch.tensor([3, 3, 3]))
        assert torch.equal(models.eps_model(loaded)(x, t, y), by_class)
        assert torch.equal(models.eps_model(loaded, unconditional=True)(x, t), null)
        guided = models.eps_model(loaded, guidance_scale=1.5)(x, t, y)
    assert torch.allclose(guided, 2.5 * by_class - 1.5 * null, atol=1e-6)
    assert not torch.allclose(by_class, null)
    with pytest.raises(ValueError, match="pass labels"):
        models.eps_model(loaded)(x, t)
    with pytest.raises(ValueError, match="pass no labels"):
        models.eps_model(loaded, unconditional=True)(x, t, y)
    assert models.num_label_classes(loaded) == 3
    every = models.all_class_eps(loaded, x, t)
    assert every.shape == (3, 3, 1, 8, 8)
    assert torch.equal(every[torch.arange(3), y], by_class)


def test_multihead_eps_selects_each_samples_head():
    conditional = loaded_tiny()
    multihead, architecture = multihead_from_conditional(conditional.network, 3, fold_label=None)
    randomize(multihead, 9)
    loaded = models.LoadedModel(network=multihead.eval(), kind="multihead_diffusion", architecture=architecture,
                                diffusion=conditional.diffusion, diffusion_settings={**TINY_SETTINGS, "null_class": None},
                                extra={"num_classes": 3})
    x, t = inputs()
    y = torch.tensor([2, 0, 2])
    with torch.no_grad():
        out = multihead(x, t)
        eps = models.eps_model(loaded)(x, t, y)
        every = models.all_class_eps(loaded, x, t)
    assert out.shape == (3, 3, 8, 8) and every.shape == (3, 3, 1, 8, 8)
    for i, k in enumerate(y.tolist()):
        assert torch.equal(eps[i, 0], out[i, k])
        assert torch.equal(every[i, k, 0], out[i, k])
    with pytest.raises(ValueError, match="no unconditional"):
        models.eps_model(loaded, unconditional=True)
