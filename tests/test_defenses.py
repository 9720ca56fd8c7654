"""Defense composition: smoothing denoisers (DDS, DensePure), purified classifiers and K-vote labelers."""

import torch

from diffrobust import diffusion as dp
from diffrobust.defenses import PurifiedClassifier, SmoothingDenoiser, VotingLabeler, tstar_time


def oracle_eps_model(schedule, x0_model):
    """An eps-network that knows the clean image: its pred_xstart is exactly x0 at every timestep."""

    def model(x_t, t_model, y=None):
        index = int(round(float(torch.as_tensor(t_model).reshape(-1)[0]) / schedule.timestep_scale))
        a = float(schedule.alphas_cumprod[index])
        return (x_t - a ** 0.5 * x0_model) / (1 - a) ** 0.5

    return model


def test_tstar_rules_give_times_one_past_the_papers_indices():
    linear, cosine = dp.GaussianDiffusion.linear(1000), dp.GaussianDiffusion.cosine(4000)
    assert [tstar_time(linear, s, "first_at_least") for s in (0.25, 0.5, 1.0)] == [146, 260, 397]
    assert [tstar_time(linear, s, "nearest") for s in (0.25, 0.5, 1.0)] == [145, 259, 397]
    assert abs(tstar_time(cosine, 0.5, "cosine_closed_form") - 1984.2) < 0.1


def test_one_shot_and_respaced_denoisers_recover_the_image_with_an_oracle():
    torch.manual_seed(0)
    schedule = dp.GaussianDiffusion.linear(1000, variance="fixed_small")
    x0 = torch.rand(2, 1, 4, 4) * 0.8 + 0.1
    model = oracle_eps_model(schedule, x0 * 2 - 1)
    noisy = x0 + 0.5 * torch.randn_like(x0)  # smoothing noise in [0, 1] space
    for reverse, steps in (("one_shot", None), ("respaced", 5), ("ddim", 5)):
        denoiser = SmoothingDenoiser(model, schedule, 0.5, tstar_rule="nearest", reverse=reverse, num_steps=steps)
        out = denoiser(noisy, torch.Generator().manual_seed(1))
        assert torch.allclose(out, x0, atol=2e-3), reverse
    assert SmoothingDenoiser(model, schedule, 0.5, tstar_rule="nearest").network_evaluations() == 1
    assert SmoothingDenoiser(model, schedule, 0.5, tstar_rule="nearest", reverse="respaced",
                             num_steps=10).network_evaluations() == 10


def test_purified_classifier_composes_and_voting_is_prefix_stable():
    class Threshold(torch.nn.Module):
        def forward(self, x):
            score = x.mean(dim=(1, 2, 3))
            return torch.stack([score - 0.5, 0.5 - score], dim=1) * 10

    def noisy_purifier(x, generator):
        return (x + 0.2 * torch.randn(x.shape, generator=generator)).clamp(0, 1)

    x = torch.full((6, 1, 2, 2), 0.48)
    defense = PurifiedClassifier(noisy_purifier, Threshold())
    assert defense(x, torch.Generator().manual_seed(0)).shape == (6, 2)
    five = VotingLabeler(noisy_purifier, Threshold(), 5)(x, torch.Generator().manual_seed(3))
    nine = VotingLabeler(noisy_purifier, Threshold(), 9)(x, torch.Generator().manual_seed(3))
    assert five.shape == (5, 6) and torch.equal(five, nine[:5])
    assert 0 < five.float().mean() < 1  # the votes really differ between reverse streams


def test_purifiers_leave_autograd_to_the_caller():
    """Attacks backpropagate through a defense: the denoiser must not switch gradients off."""
    schedule = dp.GaussianDiffusion.linear(1000, variance="fixed_small")
    weight = torch.nn.Parameter(torch.tensor(0.3))

    def model(x_t, t_model, y=None):
        return weight * x_t

    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    for reverse, steps in (("one_shot", None), ("respaced", 2)):
        denoiser = SmoothingDenoiser(model, schedule, 0.25, tstar_rule="nearest", reverse=reverse, num_steps=steps)
        out = denoiser(x, torch.Generator().manual_seed(0))
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.abs().sum() > 0, reverse
    with torch.no_grad():  # and a caller that needs none can still switch them off
        assert not SmoothingDenoiser(model, schedule, 0.25, tstar_rule="nearest")(x).requires_grad


def test_votes_branched_after_the_shared_first_call_equal_the_per_vote_loop():
    """DensePure's K reverse runs together (one first network call, then one batch of K·B) give the images and
    labels of K separate runs with the same streams, for the mini-like learned-variance network and fixed variance."""
    from diffrobust import seeds
    from diffrobust.models import build_adm_unet

    torch.manual_seed(0)
    network = build_adm_unet({"image_size": 8, "in_channels": 1, "num_channels": 32, "num_res_blocks": 1,
                              "channel_mult": "1,1", "attention_resolutions": "4", "num_head_channels": 16,
                              "learn_sigma": True}).eval()

    def eps_model(x_t, t, y=None):
        return network(x_t, t)

    class Threshold(torch.nn.Module):
        def forward(self, x):
            score = x.mean(dim=(1, 2, 3))
            return torch.stack([score - 0.5, 0.5 - score], dim=1) * 50

    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for variance in ("learned_range", "fixed_small"):
        schedule = dp.GaussianDiffusion.linear(1000, variance=variance)
        denoiser = SmoothingDenoiser(eps_model, schedule, 0.5, tstar_rule="nearest", reverse="respaced", num_steps=3)
        streams = [seeds.generator(7, k) for k in range(4)]
        with torch.no_grad():
            together = denoiser.purify_votes(x, streams)
            one_by_one = torch.stack([denoiser(x, seeds.generator(7, k)) for k in range(4)])
            labels = VotingLabeler(denoiser, Threshold(), 4)(x, torch.Generator().manual_seed(3))
            loop = VotingLabeler(lambda images, g: denoiser(images, g), Threshold(), 4)(x, torch.Generator().manual_seed(3))
        assert together.shape == (4, 5, 1, 8, 8)
        torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=0)
        assert not torch.allclose(together[0], together[1])  # the votes differ
        assert torch.equal(labels, loop)
    assert denoiser.network_evaluations_of_votes(10) == 1 + 10 * 2  # against 10 x 3 vote by vote
    one_shot = SmoothingDenoiser(eps_model, schedule, 0.5, tstar_rule="nearest")
    with torch.no_grad():
        assert torch.equal(one_shot.purify_votes(x, streams)[2], one_shot(x))
