"""RDC: the diffusion classifier computes RDC's EDM-weighted ELBO (and MultiHeadRDC's uniform one), deterministic,
batched, with exact input gradients; likelihood maximization is RDC's Adam loop, unrolled and differentiable."""

import math

import pytest
import torch
from helpers import class_distinct_edm, randomize
from torch import nn

from diffrobust import diffusion as dp
from diffrobust import models, seeds
from diffrobust.attacks.gradients import with_gradient_mode
from diffrobust.defenses import (ChainDenoiser, DiffusionClassifier, EDMDenoiser, EDMMultiheadDenoiser,
                                 LikelihoodMaximizer, MultiheadDenoiser, PurifiedClassifier, denoiser_for)
from diffrobust.defenses import diffusion_classifier as dcm
from diffrobust.networks import edm

CLASSES = 3


class TemplateDenoiser(nn.Module):
    """D_y(x_noisy, sigma) = m_y, a constant image per class, so ||D_y - x~||² = ||m_y - x~||² at every sigma."""

    evaluations_per_input = CLASSES
    num_classes = CLASSES

    def __init__(self, templates, chain=None):
        super().__init__()
        self.templates = templates
        if chain is not None:
            self.chain_sigmas = torch.as_tensor((1 / chain.alphas_cumprod - 1) ** 0.5)

    def eps_all_classes(self, x_noisy, sigma):
        s = sigma.to(x_noisy.dtype).reshape(-1, 1, 1, 1, 1)
        return (x_noisy[:, None] - self.templates[None]) / s


class ToyEps(nn.Module):
    """A smooth class-conditional eps (or v) network in float64: tanh(conv(x_t) + b_y)·(1 + t/100); label CLASSES
    is the null class."""

    def __init__(self, channels=1, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1).double()
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g, dtype=torch.float64) * 0.4)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g, dtype=torch.float64) * 0.1)
        self.bias = nn.Parameter(torch.randn(CLASSES + 1, channels, 1, 1, generator=g, dtype=torch.float64))
        self.requires_grad_(False)

    def forward(self, x, t, y=None):
        return torch.tanh(self.conv(x) + self.bias[y]) * (1 + t.view(-1, 1, 1, 1) / 100)


def chain():
    return dp.GaussianDiffusion.linear(50, variance="fixed_small")


def toy_denoiser(prediction="eps"):
    return ChainDenoiser(ToyEps(), chain(), num_classes=CLASSES, null_class=CLASSES, prediction=prediction)


def images(n=2, size=4, seed=0, low=0.2, high=0.8):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, 1, size, size, generator=g, dtype=torch.float64)


def central_differences(function, x, weights, h=1e-6):
    numeric = torch.zeros_like(x)
    for i in range(x.numel()):
        step = torch.zeros(x.numel(), dtype=x.dtype)
        step[i] = h
        step = step.view_as(x)
        numeric.view(-1)[i] = ((function(x + step) * weights).sum() - (function(x - step) * weights).sum()) / (2 * h)
    return numeric


def autograd_gradient(function, x, weights):
    x_var = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((function(x_var) * weights).sum(), x_var)
    return grad


# --- the diffusion classifier ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,weighting", [("edm", "edm_code"), ("edm", "edm_textbook"), ("edm", "uniform"),
                                            ("vp", "uniform")])
def test_dc_logits_of_a_template_denoiser_are_minus_the_total_weight_times_the_squared_distance(grid, weighting):
    templates = torch.rand(CLASSES, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    classifier = DiffusionClassifier(TemplateDenoiser(templates, chain()), sigma_grid=grid, weighting=weighting,
                                     sigma_steps=101, timesteps=[0, 7, 30, 49])
    x = images(3)
    distance = ((templates[None] - (2 * x[:, None] - 1)) ** 2).flatten(2).mean(dim=2)  # [N, K]
    if grid == "edm":
        points = torch.linspace(1e-4, 3, 101, dtype=torch.float64)
        sigma, dt = points[:-1], points[1:] - points[:-1]
        quadratic = (-((sigma.log() + 1.2) ** 2) / 2 * 1.2 ** 2 if weighting == "edm_code"
                     else -((sigma.log() + 1.2) ** 2) / (2 * 1.2 ** 2))
        density = torch.exp(quadratic) / (sigma * 1.2 * math.sqrt(2 * math.pi))
        weights = ((sigma ** 2 + 0.25) / (0.5 * sigma) ** 2 * density * dt if weighting != "uniform"
                   else 1 / (len(sigma) * sigma ** 2))
    else:
        sigma = torch.as_tensor((1 / chain().alphas_cumprod[[0, 7, 30, 49]] - 1) ** 0.5)
        weights = 1 / (4 * sigma ** 2)
    torch.testing.assert_close(classifier.weights, weights, rtol=1e-12, atol=0)
    torch.testing.assert_close(classifier(x), -weights.sum() * distance, rtol=1e-10, atol=1e-12)
    assert classifier(x).argmax(dim=1).tolist() == distance.argmin(dim=1).tolist()  # nearest template


def test_the_code_and_textbook_weightings_differ_by_the_stated_factor():
    code, textbook = (DiffusionClassifier(TemplateDenoiser(torch.zeros(CLASSES, 1, 2, 2)), weighting=w)
                      for w in ("edm_code", "edm_textbook"))
    sigma = code.sigmas
    factor = torch.exp(-((sigma.log() + 1.2) ** 2) / 2 * (1.2 ** 2 - 1.2 ** -2))
    torch.testing.assert_close(code.weights / textbook.weights, factor, rtol=1e-10, atol=0)
    assert len(sigma) == 1000 and sigma[0] == 1e-4 and sigma[-1] < 3  # linspace(1e-4, 3, 1001)[:-1]


@pytest.mark.parametrize("checkpoint", [True, False])
def test_dc_input_gradient_equals_central_finite_differences(checkpoint):
    classifier = DiffusionClassifier(toy_denoiser("v"), sigma_steps=5, chunk_size=5, checkpoint=checkpoint)
    x = images(2)
    weights = torch.randn(2, CLASSES, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grad = autograd_gradient(classifier, x, weights)
    assert grad.abs().max() > 1e-3
    torch.testing.assert_close(grad, central_differences(classifier, x, weights), rtol=1e-6, atol=1e-9)


def test_batching_and_chunking_give_the_logits_of_one_image_at_a_time():
    x = images(4)
    one_at_a_time = torch.cat([DiffusionClassifier(toy_denoiser(), sigma_steps=9, chunk_size=3)(x[i:i + 1])
                               for i in range(4)])
    for chunk_size in (1, 7, 10_000):
        batched = DiffusionClassifier(toy_denoiser(), sigma_steps=9, chunk_size=chunk_size)(x)
        torch.testing.assert_close(batched, one_at_a_time, rtol=1e-12, atol=1e-14)


def test_dc_is_deterministic_and_shares_its_noise_across_classes_and_images():
    classifier = DiffusionClassifier(toy_denoiser(), sigma_steps=6, seed=11)
    x = images(2)
    torch.testing.assert_close(classifier(x), classifier(x), rtol=0, atol=0)
    assert not torch.equal(DiffusionClassifier(toy_denoiser(), sigma_steps=6, seed=12)(x), classifier(x))
    expected = torch.randn((5, 1, 4, 4), generator=seeds.generator(11), dtype=torch.float64)
    torch.testing.assert_close(classifier.noise((1, 4, 4), torch.float64, "cpu"), expected, rtol=0, atol=0)
    assert classifier.settings()["seed"] == 11 and classifier.settings()["network_evaluations"] == 5 * CLASSES


def tiny_adm(seed=0):
    architecture = {"family": "adm_unet", "config": {
        "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1", "attention_resolutions": "", "num_heads": 1,
        "dropout": 0.0, "image_size": 8, "in_channels": 1, "class_cond": True, "num_classes": CLASSES + 1}}
    return randomize(models.build_architecture(architecture), seed).eval().requires_grad_(False), architecture


class HeadCopies(nn.Module):
    """A multi-head network whose head k is the conditional network at label k."""

    def __init__(self, conditional):
        super().__init__()
        self.conditional = conditional

    def forward(self, x, t):
        return torch.cat([self.conditional(x, t, y=torch.full((x.shape[0],), k)) for k in range(CLASSES)], dim=1)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("grid", ["vp", "edm"])
def test_multihead_dc_equals_single_head_dc_when_every_head_copies_the_conditional_model(prediction, grid):
    network, _ = tiny_adm()
    single = ChainDenoiser(network, chain(), num_classes=CLASSES, null_class=CLASSES, prediction=prediction)
    multi = MultiheadDenoiser(HeadCopies(network), chain(), num_classes=CLASSES, prediction=prediction)
    options = dict(sigma_grid=grid, sigma_steps=6, timesteps=[0, 10, 49], chunk_size=8)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    dc_single, dc_multi = DiffusionClassifier(single, **options), DiffusionClassifier(multi, **options)
    torch.testing.assert_close(dc_multi(x), dc_single(x), rtol=1e-5, atol=1e-6)
    assert dc_single.network_evaluations() == CLASSES * dc_multi.network_evaluations()
    assert dc_multi.network_evaluations() == (3 if grid == "vp" else 5)


def test_the_vp_grid_with_uniform_weighting_is_multihead_rdcs_logits():
    """MultiHeadRDC: x_t = sqrt(a_t) x~ + sqrt(1 - a_t) eps_t, logits -mean_t mean ||eps^_y(x_t, t) - eps_t||²."""
    network, _ = tiny_adm(seed=2)
    schedule = chain()
    classifier = DiffusionClassifier(MultiheadDenoiser(HeadCopies(network), schedule, num_classes=CLASSES),
                                     sigma_grid="vp", timesteps=range(0, 50, 7), seed=4)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    ts = torch.arange(0, 50, 7)
    noise = classifier.noise((1, 8, 8), torch.float32, "cpu")
    a = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32)[ts].view(-1, 1, 1, 1)
    x_t = a.sqrt() * (2 * x - 1) + (1 - a).sqrt() * noise
    heads = models.multihead_outputs(HeadCopies(network), x_t, ts.float(), CLASSES)
    expected = -((heads - noise[:, None]) ** 2).mean(dim=(0, 2, 3, 4))
    torch.testing.assert_close(classifier(x)[0], expected, rtol=1e-5, atol=1e-7)


def test_chain_denoiser_queries_the_chain_level_of_sigma_and_converts_v_with_the_exact_alpha_bar():
    schedule = chain()
    denoiser = toy_denoiser("v")
    sigmas = denoiser.chain_sigmas
    mid = (sigmas[10].log() + sigmas[11].log()).div(2).exp()
    query = torch.stack([sigmas[0] / 10, sigmas[0], sigmas[10], mid, sigmas[-1], sigmas[-1] * 2])
    torch.testing.assert_close(denoiser.network_timestep(query),
                               torch.tensor([0, 0, 10, 10.5, 49, 49], dtype=torch.float64), rtol=0, atol=1e-12)
    # At a level, eps^ is the project's v -> eps conversion at that level, on x_t = x_noisy / sqrt(1 + sigma²).
    x_noisy = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = sigmas[[10, 10]]
    x_t = x_noisy / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()
    reference = models.VPredictionEps(denoiser.network, schedule)
    reference.alphas_cumprod = torch.as_tensor(schedule.alphas_cumprod)
    eps = denoiser.eps_all_classes(x_noisy, sigma)
    for k in range(CLASSES):
        expected = reference(x_t, torch.full((2,), 10.0), y=torch.full((2,), k))
        torch.testing.assert_close(eps[:, k], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(denoiser.eps(x_noisy, sigma), reference(x_t, torch.full((2,), 10.0),
                                                                       y=torch.full((2,), CLASSES)))


def tiny_edm(label_dim):
    net = edm.EDMPrecond(img_resolution=8, img_channels=1, label_dim=label_dim, model_channels=8, channel_mult=[1],
                         num_blocks=1, attn_resolutions=[])
    return randomize(net, 0).eval().requires_grad_(False)


def test_edm_denoiser_gives_edmprecond_d_with_one_hot_labels():
    net = tiny_edm(CLASSES)
    x_noisy = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.05, 2.0], dtype=torch.float64)
    denoised = EDMDenoiser(net).denoise_all_classes(x_noisy, sigma)
    for k in range(CLASSES):
        labels = torch.zeros(2, CLASSES)
        labels[:, k] = 1
        torch.testing.assert_close(denoised[:, k], net(x_noisy, sigma.float(), labels), rtol=1e-5, atol=1e-5)
    unconditional = tiny_edm(0)
    torch.testing.assert_close(EDMDenoiser(unconditional).denoise(x_noisy, sigma),
                               unconditional(x_noisy, sigma.float()))
    with pytest.raises(ValueError, match="unconditional"):
        EDMDenoiser(net).denoise(x_noisy, sigma)


TINY_EDM_CONFIG = {"precond": "edm", "img_resolution": 8, "img_channels": 1, "label_dim": CLASSES, "model_channels": 8,
                   "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}


class EDMHeadCopies(nn.Module):
    """A multi-head EDM network whose head k is the conditional EDM network at the one-hot label k (the interface
    of networks.edm.MultiheadEDMPrecond: `heads`, `noise_prediction(x, sigma)` -> [N, heads, C, H, W])."""

    def __init__(self, conditional):
        super().__init__()
        self.conditional, self.heads = conditional, conditional.label_dim

    def noise_prediction(self, x, sigma):
        labels = torch.eye(self.heads)
        return torch.stack([self.conditional.noise_prediction(x, sigma, labels[k].expand(x.shape[0], -1))
                            for k in range(self.heads)], dim=1)


@pytest.mark.parametrize("weighting", ["edm_code", "uniform"])
def test_edm_multihead_dc_equals_single_head_dc_when_every_head_copies_the_conditional_model(weighting):
    teacher = class_distinct_edm(TINY_EDM_CONFIG)  # distinct classes: equal logits are not equal by accident
    options = dict(sigma_steps=6, weighting=weighting, chunk_size=8)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    dc_single = DiffusionClassifier(EDMDenoiser(teacher), **options)
    dc_multi = DiffusionClassifier(EDMMultiheadDenoiser(EDMHeadCopies(teacher)), **options)
    logits = dc_single(x)
    torch.testing.assert_close(dc_multi(x), logits, rtol=1e-5, atol=1e-6)
    assert (logits[:, 0] - logits[:, 1]).abs().min() > 1e-4
    assert dc_single.network_evaluations() == CLASSES * dc_multi.network_evaluations() == CLASSES * 5
    x_adv = x.clone().requires_grad_(True)  # and the input gradient an attack sees
    grads = [torch.autograd.grad(dc(x_adv)[:, 1].sum(), x_adv)[0] for dc in (dc_single, dc_multi)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_edm_multihead_denoiser_gives_every_head_of_the_network_in_one_pass():
    from diffrobust import training

    teacher = class_distinct_edm(TINY_EDM_CONFIG)
    student, architecture = training.edm_multihead_from_conditional(teacher, TINY_EDM_CONFIG)
    student.eval()
    x_noisy = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.05, 2.0], dtype=torch.float64)
    denoiser = EDMMultiheadDenoiser(student)
    denoised = denoiser.denoise_all_classes(x_noisy, sigma)
    torch.testing.assert_close(denoised, student(x_noisy, sigma.float()), rtol=1e-5, atol=1e-5)
    mean_label = teacher(x_noisy, sigma.float(), torch.full((2, CLASSES), 1 / CLASSES))
    torch.testing.assert_close(denoised, mean_label[:, None].expand(-1, CLASSES, -1, -1, -1), rtol=1e-5, atol=1e-5)
    assert denoiser.num_classes == CLASSES and denoiser.evaluations_per_input == 1
    with pytest.raises(ValueError, match="no unconditional"):
        denoiser.denoise(x_noisy, sigma)
    loaded = models.LoadedModel(student, "multihead_diffusion", architecture, extra={"num_classes": CLASSES})
    assert isinstance(denoiser_for(loaded), EDMMultiheadDenoiser)
    with pytest.raises(ValueError, match="multi-head"):
        denoiser_for(loaded, unconditional=True)


def test_denoiser_for_picks_the_adapter_of_each_model_kind():
    network, architecture = tiny_adm()
    settings = models.diffusion_settings("linear", 50, null_class=CLASSES, prediction="v")
    loaded = models.LoadedModel(network, "diffusion", architecture, models.build_diffusion(settings), settings)
    adapter = denoiser_for(loaded)
    assert isinstance(adapter, ChainDenoiser) and adapter.num_classes == CLASSES and adapter.prediction == "v"
    assert denoiser_for(loaded, unconditional=True).null_class == CLASSES
    multihead = models.LoadedModel(HeadCopies(network), "multihead_diffusion", architecture,
                                   models.build_diffusion(settings), settings, extra={"num_classes": CLASSES})
    assert isinstance(denoiser_for(multihead), MultiheadDenoiser)
    with pytest.raises(ValueError, match="multi-head"):
        denoiser_for(multihead, unconditional=True)
    edm_loaded = models.LoadedModel(tiny_edm(CLASSES), "diffusion", {"family": "edm_vp_songunet", "config": {}})
    assert isinstance(denoiser_for(edm_loaded), EDMDenoiser)
    with pytest.raises(ValueError, match="unconditional one"):
        denoiser_for(edm_loaded, unconditional=True)


def test_bad_classifier_settings_are_refused():
    denoiser = toy_denoiser()
    with pytest.raises(ValueError, match="sigma grid"):
        DiffusionClassifier(denoiser, sigma_grid="karras")
    with pytest.raises(ValueError, match="weighting"):
        DiffusionClassifier(denoiser, weighting="edm")
    with pytest.raises(ValueError, match="Riemann"):
        DiffusionClassifier(denoiser, sigma_grid="vp", weighting="edm_code")
    with pytest.raises(ValueError, match="chain"):
        DiffusionClassifier(EDMDenoiser(tiny_edm(CLASSES)), sigma_grid="vp")
    with pytest.raises(ValueError, match="table indices"):
        DiffusionClassifier(denoiser, sigma_grid="vp", timesteps=[50])


# --- likelihood maximization -----------------------------------------------------------------------------------------

def unconditional_toy():
    return ChainDenoiser(ToyEps(seed=4), chain(), num_classes=CLASSES, null_class=CLASSES)


def test_lm_with_lr_zero_is_the_identity_up_to_the_clamp():
    x = images(2)
    x[0, 0, 0, :2] = torch.tensor([-0.05, 1.05])
    out = LikelihoodMaximizer(unconditional_toy(), lr=0.0)(x)
    torch.testing.assert_close(out, x.clamp(0, 1), rtol=0, atol=1e-15)
    assert out.min() == 0 and out.max() == 1


def test_lm_is_rdcs_adam_loop_with_torch_optim_adam():
    """RDC's loop (per image, torch.optim.Adam, lr 0.1, 5 steps, target not detached) on the same draws."""
    lm = LikelihoodMaximizer(unconditional_toy(), seed=3)
    x = images(2)
    with torch.no_grad():
        out = lm(x)
    assert (out - x).abs().max() > 0.05
    for i in range(2):
        xi = (2 * x[i:i + 1] - 1).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([xi], lr=0.1)
        for sigma, eps in lm.draws((1, 1, 4, 4), torch.float64):
            denoised = lm.denoiser.denoise(xi + sigma.view(-1, 1, 1, 1) * eps, sigma)
            loss = torch.nn.functional.mse_loss(denoised, xi)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.testing.assert_close(out[i:i + 1], ((xi.detach() + 1) / 2).clamp(0, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(lm(x), out, rtol=0, atol=0)  # deterministic per call (RDC's set_seed(1))


@pytest.mark.parametrize("eta,norm", [(None, "l2"), (0.01, "l2"), (0.004, "linf")])
def test_the_full_gradient_through_lm_equals_finite_differences(eta, norm):
    lm = LikelihoodMaximizer(unconditional_toy(), steps=3, lr=0.02, eta=eta, eta_norm=norm)
    x = images(2, low=0.3, high=0.7)
    weights = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grad = autograd_gradient(lm, x, weights)
    torch.testing.assert_close(grad, central_differences(lm, x, weights), rtol=1e-6, atol=1e-8)
    assert not torch.allclose(grad, weights)  # not the identity (BPDA) gradient
    if eta is not None:
        move = (lm(x) - x).flatten(1)
        assert (move.norm(dim=1) if norm == "l2" else move.abs().amax(dim=1)).max() <= eta + 1e-12


def test_lm_works_under_no_grad_and_detaches_only_when_no_graph_is_wanted():
    lm = LikelihoodMaximizer(unconditional_toy())
    x = images(2).requires_grad_(True)
    with torch.no_grad():
        quiet = lm(x)
    assert not quiet.requires_grad
    loud = lm(x)
    assert loud.requires_grad
    torch.testing.assert_close(loud.detach(), quiet, rtol=0, atol=1e-14)
    assert not lm(x.detach()).requires_grad
    assert lm.network_evaluations() == 5 and lm.settings()["seed"] == 1


def test_rdc_in_bpda_mode_passes_the_dc_gradient_at_the_purified_image_through_lm():
    lm = LikelihoodMaximizer(unconditional_toy(), steps=2, lr=0.02)
    dc = DiffusionClassifier(toy_denoiser(), sigma_steps=4)
    rdc = PurifiedClassifier(lm, dc)
    x = images(2, low=0.3, high=0.7)
    weights = torch.randn(2, CLASSES, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bpda = autograd_gradient(lambda z: with_gradient_mode(rdc, "bpda")(z), x, weights)
    torch.testing.assert_close(bpda, autograd_gradient(dc, lm(x), weights), rtol=1e-12, atol=1e-14)
    full = autograd_gradient(lambda z: with_gradient_mode(rdc, "full")(z), x, weights)
    assert not torch.allclose(full, bpda, rtol=1e-3)
    torch.testing.assert_close(rdc(x), dc(lm(x)), rtol=0, atol=0)  # deterministic: LM and DC re-seed per call


def test_bad_lm_settings_are_refused():
    with pytest.raises(ValueError, match="eta_norm"):
        LikelihoodMaximizer(unconditional_toy(), eta=0.1, eta_norm="l1")
    with pytest.raises(ValueError, match="sigma_min"):
        LikelihoodMaximizer(unconditional_toy(), sigma_min=0.0)
    with pytest.raises(ValueError, match="no null class"):
        LikelihoodMaximizer(ChainDenoiser(ToyEps(), chain(), num_classes=CLASSES), lr=0.1)(images(1))
    assert dcm.WEIGHTINGS.keys() == {"edm_code", "edm_textbook", "uniform"}
