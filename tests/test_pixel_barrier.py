"""Pixel is a Barrier: the latent diffusion model, SDEdit, the protective attacks, the purifiers and the claims, on tiny
random networks (seconds on a CPU)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from diffrobust import diffusion as dl
from diffrobust.attacks import protective
from diffrobust.attacks.budget import perturbation_norms
from diffrobust.defenses.sdedit import (LDMPure, PDMPure, latent_timesteps, ldm_sdedit, pixel_sdedit,
                                        released_pdm_pure_times)
from diffrobust.defenses.transforms import CropResize, JPEGCompression
from diffrobust.networks import ldm as ldm_lib
from diffrobust.stages import pixel_barrier

TINY = {"image_channels": 1, "image_size": 16, "latent_channels": 4, "vae_channels": [8, 8, 16],
        "unet_channels": [8, 16], "num_classes": 3, "prompt_tokens": 2, "cross_attention_dim": 8,
        "norm_num_groups": 4, "attention_head_dim": 4}


@pytest.fixture(scope="module")
def ldm():
    torch.manual_seed(0)
    return ldm_lib.build_mini_ldm(TINY)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(3, 1, 16, 16, generator=generator)


class ZeroEps(torch.nn.Module):
    """A pixel 'eps model' with one weight, so that pixel attacks have a gradient: eps = w·x_t."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x_t, t, y=None):
        return self.weight * x_t + 0.01 * t.view(-1, 1, 1, 1) / 1000


def pixel_models():
    return ZeroEps().requires_grad_(False), dl.GaussianDiffusion.linear(1000, variance="fixed_small")


# --- the LDM -----------------------------------------------------------------------------------------------------

def test_ldm_shapes_and_latent_scaling(ldm, images):
    z = ldm.encode(images)
    assert z.shape == (3, 4, 4, 4)  # two halvings for three VAE blocks
    ldm.vae.register_to_config(scaling_factor=0.5)
    assert torch.allclose(ldm.encode(images), 0.5 * z)
    ldm.vae.register_to_config(scaling_factor=1.0)
    decoded = ldm.decode(z)
    assert decoded.shape == images.shape and decoded.min() >= 0 and decoded.max() <= 1
    condition = ldm.condition(3)
    assert condition.shape == (3, 2, 8)
    assert torch.equal(condition[0], ldm.prompts(torch.tensor([3]))[0])  # the null row


def test_ldm_q_sample_uses_the_sd_schedule(ldm):
    z0, noise = torch.ones(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    a = float(ldm.scheduler.alphas_cumprod[500])
    expected_beta_end = 0.012
    assert float(ldm.scheduler.betas[-1]) == pytest.approx(expected_beta_end)
    assert torch.allclose(ldm.q_sample(z0, torch.tensor([500, 500]), noise), torch.full_like(z0, a ** 0.5))


def test_mini_ldm_saves_and_loads_offline(ldm, images, tmp_path):
    ldm_lib.save_ldm(tmp_path / "model", ldm, extra={"note": "tiny"})
    loaded = ldm_lib.load_ldm(tmp_path / "model")
    assert torch.equal(loaded.encode(images), ldm.encode(images))
    z = ldm.encode(images)
    assert torch.equal(loaded.eps(z, 10, loaded.condition(3)), ldm.eps(z, 10, ldm.condition(3)))
    assert ldm_lib.read_extra(tmp_path / "model") == {"note": "tiny"}
    assert not list(tmp_path.glob(".model.*"))  # no temporary folder left behind
    with pytest.raises(ldm_lib.LDMError, match="takes no text prompt"):
        ldm_lib.load_ldm(tmp_path / "model", prompt="a photo")
    with pytest.raises(ldm_lib.LDMError, match="missing"):
        ldm_lib.load_ldm(tmp_path)


def tiny_clip_text(folder, hidden_size=8):
    """A local CLIP tokenizer (letters only, no merges) and a one-layer CLIP text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                              model_max_length=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size,
                                                intermediate_size=2 * hidden_size, num_attention_heads=2,
                                                num_hidden_layers=1, max_position_embeddings=8, bos_token_id=0,
                                                eos_token_id=1, pad_token_id=1))
    return tokenizer, text_encoder


def tiny_stable_diffusion(folder):
    """A tiny SD v1 pipeline (3 channels, CLIP text encoder, local tokenizer) saved in diffusers' layout."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer, text_encoder = tiny_clip_text(folder)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.18215)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(8, 16),
                                layers_per_block=1, cross_attention_dim=8, norm_num_groups=4, attention_head_dim=4)
    scheduler = DDIMScheduler(**ldm_lib.SD_SCHEDULE)
    pipeline = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                              scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    pipeline.save_pretrained(folder / "sd")
    return pipeline


def test_tiny_sd_pipeline_saves_loads_offline_and_our_sdedit_is_its_img2img(tmp_path):
    pipeline = tiny_stable_diffusion(tmp_path)
    ldm = ldm_lib.load_ldm(tmp_path / "sd", prompt="a photo")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ours = ldm_sdedit(ldm, x, 0.3, num_inference_steps=20, generator=torch.Generator().manual_seed(5))
    theirs = pipeline(prompt=["a photo"] * 2, image=x, strength=0.3, num_inference_steps=20, guidance_scale=1.0,
                      generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert ours.shape == theirs.shape == x.shape
    assert torch.allclose(ours, theirs, atol=1e-5)
    # strength 0.3 of 20 steps keeps the last 6 (SD's steps_offset 1: 251 ... 1)
    _, timesteps = latent_timesteps(ldm.scheduler.config, 0.3, 20)
    assert timesteps.tolist() == [251, 201, 151, 101, 51, 1]
    with pytest.raises(ldm_lib.LDMError, match="needs a prompt"):
        ldm_lib.load_ldm(tmp_path / "sd")


def test_diff_protect_grid_at_strength_0_3_of_ddim_100():
    _, timesteps = latent_timesteps(ldm_lib.SD_SCHEDULE, 0.3, 100)
    assert len(timesteps) == 30 and int(timesteps[0]) == 291 and int(timesteps[-1]) == 1


# --- protective attacks ----------------------------------------------------------------------------------------

class FixedDraws(protective.Objective):
    """The objective with the same random draws (t, noise, posterior sample) at every call: deterministic, so that
    'PGD lowered it' is a statement about the attack, not about the draws."""

    def __init__(self, inner, seed=7):
        self.inner, self.seed = inner, seed

    def __call__(self, x01, generator):
        return self.inner(x01, torch.Generator().manual_seed(self.seed))

    def gradient(self, x01, generator):
        return self.inner.gradient(x01, torch.Generator().manual_seed(self.seed))


# SDS's update is not the gradient of any objective (it drops the UNet's Jacobian): its test is the VJP below.
GRADIENT_ATTACKS = [name for name in protective.ATTACKS if "sds" not in name]


@pytest.mark.parametrize("name", GRADIENT_ATTACKS)
def test_each_attack_lowers_its_own_objective_within_budget(ldm, images, name):
    eps_model, schedule = pixel_models()
    target = torch.zeros(1, 1, 16, 16)
    objective = FixedDraws(protective.objective_for(name, ldm=ldm, pixel_eps_model=eps_model,
                                                    pixel_schedule=schedule, target01=target))
    result = protective.protect(objective, images, eps=8 / 255, steps=8, step=0.25 * 8 / 255,
                                generator=torch.Generator().manual_seed(0), measure_draws=1)
    assert perturbation_norms(images, result.x_protected, "linf").max() <= 8 / 255 + 1e-6
    assert result.x_protected.min() >= 0 and result.x_protected.max() <= 1
    assert (result.objective_after < result.objective_before).all()


@pytest.mark.parametrize("name", ["sds", "sds_minus", "pixel_sds", "pixel_sds_minus"])
def test_sds_attacks_stay_within_budget_and_move_the_image(ldm, images, name):
    eps_model, schedule = pixel_models()
    objective = protective.objective_for(name, ldm=ldm, pixel_eps_model=eps_model, pixel_schedule=schedule)
    result = protective.protect(objective, images, eps=8 / 255, steps=4, step=0.25 * 8 / 255,
                                random_start=False, generator=torch.Generator().manual_seed(0), measure_draws=2)
    norms = perturbation_norms(images, result.x_protected, "linf")
    assert (norms <= 8 / 255 + 1e-6).all() and (norms > 4 / 255).all()


def test_sds_gradient_is_the_encoders_vjp_with_the_eps_error(ldm, images):
    generator_seed = 11
    grad = protective.sds_pullback(ldm, images, torch.Generator().manual_seed(generator_seed))
    # the same draws by hand: the posterior sample's noise, then t, then the diffusion noise
    generator = torch.Generator().manual_seed(generator_seed)
    posterior = ldm.posterior(images)
    sample_noise = torch.randn(posterior.mean.shape, generator=generator)
    t = torch.randint(0, 1000, (len(images),), generator=generator)
    noise = torch.randn(posterior.mean.shape, generator=generator)

    def encode(x):
        p = ldm.posterior(x)
        return (p.mean + p.std * sample_noise) * ldm.scaling_factor

    z = encode(images)
    with torch.no_grad():
        error = ldm.eps(ldm.q_sample(z, t, noise), t, ldm.condition(len(images))) - noise
    _, vjp = torch.autograd.functional.vjp(encode, images, error)
    assert torch.allclose(grad, vjp, atol=1e-6)
    assert grad.abs().sum() > 0
    # and SDS(+) steps along +sign(J^T(eps_hat - eps)), SDS(-) against it
    plus = protective.objective_for("sds", ldm=ldm).gradient(images, torch.Generator().manual_seed(generator_seed))
    assert torch.allclose(plus, -grad)


def test_encoder_attack_amplifies_latent_distance_over_random_noise(images):
    """Even an untrained VAE moves its latent 3-4x further under a PGD perturbation than under ±eps sign noise of
    the same budget (attacks_rdc_pdm.md §4 measured 2.8-4.2x; here 3.7-4.2x over three seeds), and PhotoGuard's
    pull toward the zero latent about 2.2-2.5x."""
    torch.manual_seed(4)
    untrained = ldm_lib.build_mini_ldm({**TINY, "image_size": 32, "vae_channels": [32, 32, 64]})
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1

    class LatentAway(protective.Objective):
        def __call__(self, x01, generator):
            return -(untrained.encode(x01) - untrained.encode(x)).flatten(1).norm(dim=1)

    eps = 8 / 255
    control = protective.random_sign_noise(x, eps, torch.Generator().manual_seed(0))
    control_distance = protective.latent_distance(untrained, x, control).mean()
    for objective, least in ((LatentAway(), 3.0), (protective.objective_for("photoguard_encoder", ldm=untrained), 1.8)):
        result = protective.protect(objective, x, eps=eps, steps=20, step=0.25 * 8 / 255,
                                    generator=torch.Generator().manual_seed(0), measure_draws=1)
        ratio = protective.latent_distance(untrained, x, result.x_protected).mean() / control_distance
        assert ratio > least


def test_random_control_is_plus_minus_eps(images):
    x = torch.full((2, 1, 8, 8), 0.5)
    noisy = protective.random_sign_noise(x, 0.1, torch.Generator().manual_seed(0))
    assert torch.allclose((noisy - x).abs(), torch.full_like(x, 0.1))
    assert 0.3 < (noisy > x).float().mean() < 0.7


def test_objective_for_names_what_is_missing():
    with pytest.raises(ValueError, match="target"):
        protective.objective_for("mist", ldm=object())
    with pytest.raises(ValueError, match="pixel"):
        protective.objective_for("pixel_advdm")
    with pytest.raises(ValueError, match="unknown"):
        protective.objective_for("glaze")


# --- SDEdit and purifiers ---------------------------------------------------------------------------------------

def test_pixel_sdedit_with_an_exact_eps_model_returns_the_image():
    """With the true eps of a single known image (x0 fixed), DDIM from any level returns x0 exactly."""
    x01 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = x01 * 2 - 1
    schedule = dl.GaussianDiffusion.linear(1000, variance="fixed_small")

    def oracle(x_t, t_model, y=None):
        a = float(schedule.alphas_cumprod[int(t_model[0])])
        return (x_t - a ** 0.5 * x0) / (1 - a) ** 0.5

    out = pixel_sdedit(oracle, schedule, x01, 0.3, num_inference_steps=100, sampler="ddim",
                       generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, x01, atol=1e-4)
    assert torch.equal(pixel_sdedit(oracle, schedule, x01, 0.0), x01)


def test_pdm_pure_schedules():
    times, noise_time = released_pdm_pure_times(1000)
    assert times == [100, 89, 78, 67, 56, 45, 34, 23, 12, 1, 0] and noise_time == 45
    eps_model, schedule = pixel_models()
    assert PDMPure(eps_model, schedule).network_evaluations() == 10
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for variant in ("paper", "released"):
        out = PDMPure(eps_model, schedule, variant=variant)(x, torch.Generator().manual_seed(0))
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="variant"):
        PDMPure(eps_model, schedule, variant="latest")


def test_ldm_pure_is_ldm_sdedit(ldm, images):
    purifier = LDMPure(ldm, strength=0.2, num_inference_steps=10)
    assert purifier.network_evaluations() == 2
    assert torch.equal(purifier(images, torch.Generator().manual_seed(0)),
                       ldm_sdedit(ldm, images, 0.2, num_inference_steps=10, generator=torch.Generator().manual_seed(0)))


def test_jpeg_and_crop():
    flat = torch.full((2, 1, 16, 16), 100 / 255)
    assert torch.allclose(JPEGCompression(65)(flat), flat, atol=1 / 255)
    assert torch.allclose(CropResize(0.2)(flat), flat)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert (JPEGCompression(65)(x) - x).abs().mean() > (JPEGCompression(95)(x) - x).abs().mean()
    ramp = torch.linspace(0, 1, 20).repeat(20, 1)[None, None]
    cropped = CropResize(0.2)(ramp)  # keeps columns 2..17 and stretches them to 20
    assert cropped[0, 0, 0, 0] > ramp[0, 0, 0, 1] and cropped[0, 0, 0, -1] < ramp[0, 0, 0, -2]
    with pytest.raises(ValueError):
        JPEGCompression(0)


# --- the claims ---------------------------------------------------------------------------------------------------

def synthetic_table(ldm_drop, pdm_drop, purified_drop, images=24):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.8, images)
    rows = []

    def add(attack, eps, editor, purifier, values):
        rows.append(pd.DataFrame({"attack": attack, "eps": eps, "editor": editor, "purifier": purifier,
                                  "strength": 0.3, "image": np.arange(images), "ssim": values}))

    add("none", 0.0, "ldm", "none", base)
    add("none", 0.0, "pdm", "none", base)
    for eps in (0.1,):
        add("random", eps, "ldm", "none", base - 0.01)
        add("random", eps, "pdm", "none", base - 0.01)
        add("advdm", eps, "ldm", "none", base - 0.01 - ldm_drop + rng.normal(0, 0.002, images))
        add("advdm", eps, "pdm", "none", base - 0.01 - pdm_drop + rng.normal(0, 0.002, images))
        add("advdm", eps, "ldm", "pdm_pure", base - purified_drop + rng.normal(0, 0.002, images))
    return pd.concat(rows, ignore_index=True)


def test_claims_verdicts_follow_the_numbers():
    settings = {"budgets": [0.1], "edit": {"purified_strength": 0.3},
                "claims": {"metric": "ssim", "pdm_margin": 0.05, "restore_margin": 0.05, "seed": 0}}
    paper_like = pixel_barrier.claims(synthetic_table(0.3, 0.005, 0.01), settings, ["advdm"]).set_index("claim")
    assert paper_like.loc["ldm_degrades", "verdict"] == "holds"
    assert paper_like.loc["pdm_unaffected", "verdict"] == "holds"
    assert paper_like.loc["pdm_pure_restores", "verdict"] == "holds"
    assert paper_like.loc["ldm_degrades", "estimate"] == pytest.approx(-0.3, abs=0.01)
    against = pixel_barrier.claims(synthetic_table(-0.02, 0.2, 0.3), settings, ["advdm"]).set_index("claim")
    assert against.loc["ldm_degrades", "verdict"] == "fails"
    assert against.loc["pdm_unaffected", "verdict"] == "fails"
    assert against.loc["pdm_pure_restores", "verdict"] == "fails"
    assert "advdm" in against.loc["pdm_unaffected", "sentence"]


def png_bytes(figure):
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def test_report_bar_charts_draw_the_same_bytes_on_every_render():
    """The bars' 95% intervals are seaborn bootstraps: seeded, two renders are the same image; another seed
    moves the intervals (so the seed is what makes them the same)."""
    table = synthetic_table(0.3, 0.005, 0.01)
    edits = table[table["purifier"] == "none"]
    ldm_after = table[(table["editor"] == "ldm") & (table["attack"] != "none")]
    for draw in (lambda **seed: pixel_barrier.edit_quality_figure(edits, "ssim", 0.3, **seed),
                 lambda **seed: pixel_barrier.purification_figure(ldm_after, "ssim", 0.3, 0.1, **seed)):
        first = png_bytes(draw())
        assert png_bytes(draw()) == first
        assert png_bytes(draw(seed=pixel_barrier.CHART_SEED + 1)) != first


def test_checkerboard_target():
    board = pixel_barrier.target_image({"target": {"period": 2}}, (1, 1, 8, 8))
    assert board.shape == (1, 1, 8, 8)
    assert board[0, 0, 0, :4].tolist() == [0, 0, 1, 1] and board[0, 0, 2, :4].tolist() == [1, 1, 0, 0]


def test_gridpure_tiles_cover_the_image_and_blend_the_input():
    from diffrobust.defenses.sdedit import GrIDPure, tile_starts

    assert tile_starts(512, 256, 128) == [0, 128, 256] and tile_starts(30, 16, 8) == [0, 8, 14]
    assert tile_starts(16, 32, 8) == [0]
    schedule = dl.GaussianDiffusion.linear(1000, variance="fixed_small")
    c = 0.2  # the oracle's belief: every tile is the constant image 0.2 in [-1, 1] units (0.6 in [0, 1])

    def oracle(x_t, t_model, y=None):  # its exact eps: the last ancestral step then returns the constant exactly
        a = float(schedule.alphas_cumprod[int(t_model[0])])
        return (x_t - a ** 0.5 * c) / (1 - a) ** 0.5

    x01 = 0.6 + 0.1 * torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    purifier = GrIDPure(oracle, schedule, tile_size=16, stride=8, t_star=0.01, passes=1, gamma=0.25)
    assert purifier.network_evaluations(24) == 1 * 4 * 10
    torch.testing.assert_close(purifier.purify_once(x01, torch.Generator().manual_seed(0)),
                               torch.full_like(x01, 0.6), atol=1e-5, rtol=0)
    torch.testing.assert_close(purifier(x01, torch.Generator().manual_seed(0)), 0.75 * 0.6 + 0.25 * x01,
                               atol=1e-5, rtol=0)
    twice = GrIDPure(oracle, schedule, tile_size=16, stride=8, passes=2, gamma=0.25)
    torch.testing.assert_close(twice(x01, torch.Generator().manual_seed(0)), 0.75 * 0.6 + 0.25 * x01,
                               atol=1e-5, rtol=0)


def test_clip_image_encoder_loads_from_a_hugging_face_clip_folder(tmp_path):
    """A tiny CLIPModel saved as openai/clip-vit-base-patch32 is (config.json + the whole model's weights): the
    image encoder loads without the text tower, checks its structure and returns unit-cosine embeddings for x, x."""
    from transformers import CLIPConfig, CLIPModel

    from diffrobust import quality
    from diffrobust.networks.pretrained import load_hf_clip_vision

    vision = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "image_size": 32, "patch_size": 8, "projection_dim": 12}
    config = CLIPConfig(text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "intermediate_size": 32, "vocab_size": 40, "max_position_embeddings": 8},
                        vision_config=vision, projection_dim=12)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path)
    spec = {**vision, "input": {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
                                                      "interpolation": "bicubic"}}
    encoder = load_hf_clip_vision(spec, tmp_path).eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = encoder(x)
    assert features.shape == (3, 12)
    assert torch.allclose(quality.cosine_similarity(features, features), torch.ones(3, dtype=torch.float64))
    assert quality.cosine_similarity(features[:1].expand(2, -1), features[1:]).abs().max() < 1
    with pytest.raises(ValueError, match="patch_size"):
        load_hf_clip_vision({**spec, "patch_size": 16}, tmp_path)


def tiny_if_stage2(folder):
    """A tiny DeepFloyd-IF-II-shaped UNet (6 channels in and out, noise-level class embedding, text projection) with
    IF's two schedulers, saved as the IF-II folder's unet/, scheduler/ and image_noising_scheduler/."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=32, layers_per_block=1, block_out_channels=[32, 32],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        in_channels=6, out_channels=6, cross_attention_dim=32, encoder_hid_dim=12, attention_head_dim=8,
        addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn="gelu", class_embed_type="timestep", mid_block_scale_factor=1.414,
        time_embedding_act_fn="gelu", time_embedding_dim=32, norm_num_groups=8).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", thresholding=True,
                  dynamic_thresholding_ratio=0.95, sample_max_value=1.0, variance_type="learned_range"
                  ).save_pretrained(folder / "scheduler")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(
        folder / "image_noising_scheduler")


def test_if_stage2_pdm_pure_runs_the_released_schedule_offline(tmp_path):
    from diffrobust.defenses.sdedit import IFStageIIPure, load_if_stage2

    tiny_if_stage2(tmp_path)
    np.save(tmp_path / "t5_xxl_a_picture.npy", np.ones((77, 12), dtype=np.float32))
    np.save(tmp_path / "zero_t5-v1_1-xxl_vector.npy", np.zeros((77, 12), dtype=np.float16))
    pipeline, prompt_embeds, negative_prompt_embeds = load_if_stage2(tmp_path)
    assert prompt_embeds.shape == negative_prompt_embeds.shape == (1, 77, 12)
    purifier = IFStageIIPure(pipeline, prompt_embeds, negative_prompt_embeds, low_res=8)
    assert purifier.network_evaluations() == 30  # 10 steps, each with two conditional rows and the unconditional
    for channels in (3, 1):
        x = torch.rand(2, channels, 24, 24, generator=torch.Generator().manual_seed(0))
        out = purifier(x, torch.Generator().manual_seed(1))
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
        assert (out - x).abs().mean() > 0
    again = purifier(x, torch.Generator().manual_seed(1))
    assert torch.equal(again, out)  # deterministic for its generator
    with pytest.raises(FileNotFoundError, match="prompt_embeds_file"):
        load_if_stage2(tmp_path, prompt_embeds_file="missing.npy")
    with pytest.raises(FileNotFoundError, match="image_noising_scheduler"):
        load_if_stage2(tmp_path / "unet")


def test_noisy_upscaling_runs_the_x4_upscaler_offline(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    from diffrobust.defenses.upscaling import NoisyUpscaling, load_sd_upscaler

    torch.manual_seed(0)
    tokenizer, text_encoder = tiny_clip_text(tmp_path / "vocab", hidden_size=32)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    text_encoder.save_pretrained(tmp_path / "text_encoder")
    UNet2DConditionModel(block_out_channels=(32, 32), layers_per_block=1, sample_size=8, in_channels=7,
                         out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=8, num_class_embeds=400, norm_num_groups=8).save_pretrained(tmp_path / "unet")
    AutoencoderKL(block_out_channels=[16, 16, 16], in_channels=3, out_channels=3, latent_channels=4,
                  down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                  norm_num_groups=8, scaling_factor=0.08333).save_pretrained(tmp_path / "vae")
    DDPMScheduler().save_pretrained(tmp_path / "low_res_scheduler")
    DDIMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "scheduler")
    purifier = NoisyUpscaling(load_sd_upscaler(tmp_path), prompt="a photo", num_inference_steps=3)
    assert purifier.network_evaluations() == 6
    for channels in (3, 1):
        x = torch.rand(2, channels, 8, 8, generator=torch.Generator().manual_seed(0))
        out = purifier(x, torch.Generator().manual_seed(1))
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert torch.equal(purifier(x, torch.Generator().manual_seed(1)), out)
    with pytest.raises(FileNotFoundError, match="low_res_scheduler"):
        load_sd_upscaler(tmp_path / "unet")


def test_lpips_reads_alexnet_from_a_file_and_measures_distance(tmp_path):
    import torchvision

    from diffrobust.networks.pretrained import load_lpips_alex

    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / "alexnet.pth")
    model = load_lpips_alex(tmp_path / "alexnet.pth")
    saved = torch.load(tmp_path / "alexnet.pth", weights_only=True)
    assert torch.equal(getattr(model.net.slice3, "6").weight, saved["features.6.weight"])  # features 5..7: slice 3
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = model(x * 2 - 1, x * 2 - 1).flatten()
        other = model(x * 2 - 1, x.flip(-1) * 2 - 1).flatten()
    assert torch.allclose(same, torch.zeros(2), atol=1e-6) and (other > 0).all()


def test_fid_inception_loads_its_weights_from_a_file_offline(tmp_path, monkeypatch):
    from pytorch_fid import inception as fid

    from diffrobust import quality
    from diffrobust.networks.pretrained import FID_WEIGHTS_FILE, load_fid_inception

    # a weights file of the right structure: pytorch-fid's own network, its loading skipped once
    monkeypatch.setattr(fid, "load_state_dict_from_url", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, state, *a, **k: None)
    torch.manual_seed(0)
    state = fid.fid_inception_v3().state_dict()
    monkeypatch.undo()
    torch.save(state, tmp_path / FID_WEIGHTS_FILE)
    hub = torch.hub.get_dir()
    extractor = load_fid_inception(tmp_path / FID_WEIGHTS_FILE)
    assert torch.hub.get_dir() == hub
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    features = quality.extract_features(extractor, x)
    assert features.shape == (3, 2048)
    assert quality.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(FileNotFoundError, match="pytorch_fid_inception"):
        load_fid_inception(tmp_path / "missing.pth")


def test_image_metrics_adds_lpips_on_minus_one_one_and_fid_when_their_networks_are_loaded():
    seen = []

    def fake_lpips(a, b):
        seen.append((float(a.min()), a.shape[1]))
        return (a - b).abs().mean((1, 2, 3), keepdim=True)

    clean = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    edited = (clean + 0.1).clamp(0, 1)
    rows = pixel_barrier.image_metrics(edited, clean, torch.zeros(4, dtype=torch.long), None, None,
                                       {"lpips": fake_lpips, "fid_features": torch.nn.Flatten()})
    assert seen[0][0] < 0 and seen[0][1] == 3  # [-1, 1], grayscale repeated to RGB
    expected = ((edited - clean) * 2).abs().mean((1, 2, 3)).double().numpy()
    np.testing.assert_allclose(rows["lpips"], expected, rtol=1e-6)
    assert rows["set_fid"] > 0 and "correct" not in rows and "feature_distance" not in rows


def test_protect_cli_names_missing_settings_and_writes_nothing(tmp_path, capsys):
    from diffrobust import cli

    out = tmp_path / "sets" / "advdm.npz"
    code = cli.main(["protect", "--attack", "advdm", "--settings", '{"budgets": [0.1]}', "--subset",
                     '{"start": 0, "stop": 2}', "--models", "{}", "--dataset-dir", str(tmp_path), "--out", str(out)])
    assert code == 2  # a usage error: argparse's status
    assert "argument --settings: lacks steps" in capsys.readouterr().err
    assert not out.parent.exists()


# --- Mist's target image as part of a set's identity (issue 21, item 2) ----------------------------------------------


def _target_png(path, seed):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_the_protect_job_reads_the_target_once_and_refuses_other_bytes_than_planned(tmp_path):
    import hashlib

    from diffrobust.errors import DiffrobustError

    target = _target_png(tmp_path / "MIST.png", seed=0)
    settings = {"target": {"file": str(target), "period": 4}}
    data, digest = pixel_barrier.read_target(settings, "mist")
    assert digest == hashlib.sha256(target.read_bytes()).hexdigest() and data == target.read_bytes()
    assert pixel_barrier.read_target(settings, "advdm") == (None, None)  # photoguard_encoder, advdm, ... read no target
    assert pixel_barrier.read_target({"target": {"file": None, "period": 4}}, "mist") == (None, None)
    # the pixels come from the bytes that were hashed, not from a second read of the file
    from_bytes = pixel_barrier.target_image(settings, (1, 1, 8, 8), data)
    _target_png(target, seed=1)
    assert torch.equal(from_bytes, pixel_barrier.target_image(settings, (1, 1, 8, 8), data))
    assert not torch.equal(from_bytes, pixel_barrier.target_image(settings, (1, 1, 8, 8)))
    with pytest.raises(DiffrobustError, match=f"pixel_barrier.target.file {target} changed after the workflow planned "
                                              f"this job \\(sha256 {digest[:12]}\\.\\.\\. then"):
        pixel_barrier.read_target(settings, "mist", expected_sha256=digest)


def test_a_set_protected_with_an_old_target_is_never_edited_with_the_new_one(tmp_path):
    """The changed-target fault case: the edit job of a set made with the old target refuses it (before loading any
    model) when the workflow now plans the new target, and writes nothing."""
    from diffrobust.errors import DiffrobustError
    from diffrobust.io import atomic_write_npz

    old, new = "a" * 64, "b" * 64
    made_with_old = tmp_path / "mist.npz"
    atomic_write_npz(made_with_old, {"x_clean": np.zeros((1, 1, 4, 4), np.float32), "target_sha256": np.str_(old)})
    made_before_digests = tmp_path / "texture_only.npz"
    atomic_write_npz(made_before_digests, {"x_clean": np.zeros((1, 1, 4, 4), np.float32)})
    outputs = {"out_tsv": tmp_path / "edits/mist.tsv", "out_grid": tmp_path / "edits/mist.grid.npz"}
    with pytest.raises(DiffrobustError, match=f"{made_with_old} was made with the target image of sha256 aaaaaaaaaaaa"
                                              "\\.\\.\\., but pixel_barrier.target.file now holds sha256 bbbbbbbbbbbb"):
        pixel_barrier.run_edit("mist", settings={}, models={}, set_path=made_with_old, target_sha256=new, **outputs)
    with pytest.raises(DiffrobustError, match="was made with no recorded target image"):
        pixel_barrier.run_edit("texture_only", settings={}, models={}, set_path=made_before_digests,
                               target_sha256=new, **outputs)
    assert not (tmp_path / "edits").exists()
    sets = pixel_barrier.read_protected(made_with_old)
    pixel_barrier.check_set_target(made_with_old, sets, "mist", old)  # the target it was made with: accepted
    pixel_barrier.check_set_target(made_before_digests, {}, "advdm", None)  # no target file planned: nothing to check
