"""diffrobust.evaluation, the figures of notebooks/models_report, on tiny inputs whose right answers are known."""

import math

import pytest
import torch

from diffrobust import diffusion as dp
from diffrobust import evaluation, imagespace
from diffrobust.defenses import SmoothingDenoiser

LABELS = torch.tensor([0, 1, 1, 2, 1])


class Constant(torch.nn.Module):
    """A classifier that says `label` for every image."""

    def __init__(self, label, num_classes=3):
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full((len(x),), self.label), self.num_classes).float()


def brightness(x):
    """Class 0 for a dark image, 1 for a bright one (mean pixel below or above 0.5)."""
    mean = x.flatten(1).mean(1)
    return torch.stack([0.5 - mean, mean - 0.5], dim=1)


def two_tone(labels, size=4):
    """Class 0 images black, class 1 white."""
    return labels.float().view(-1, 1, 1, 1).expand(-1, 1, size, size).clone()


# --- classifiers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [None, 1, 2, 250])
def test_a_constant_classifier_scores_the_frequency_of_its_class(batch_size):
    images = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert evaluation.accuracy(Constant(1), images, LABELS, batch_size) == pytest.approx(3 / 5)
    assert evaluation.accuracy(Constant(2), images, LABELS.numpy(), batch_size) == pytest.approx(1 / 5)
    assert evaluation.predict(Constant(0), images, batch_size).tolist() == [0] * 5


def test_predictions_keep_the_order_of_the_images_across_batches():
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1])
    assert evaluation.predict(brightness, two_tone(labels), batch_size=3).tolist() == labels.tolist()
    assert evaluation.accuracy(brightness, two_tone(labels), 1 - labels, batch_size=2) == 0.0
    with pytest.raises(ValueError, match="7 images but 5 labels"):
        evaluation.accuracy(brightness, two_tone(labels), LABELS)


# --- image quality -------------------------------------------------------------------------------------------------

def test_psnr_of_known_arrays():
    zeros = torch.zeros(2, 1, 4, 4)
    assert evaluation.psnr(torch.full_like(zeros, 0.1), zeros) == pytest.approx(20.0)  # MSE 0.01
    # the mean of the per-image values (20 and 40 dB), not the PSNR of the mean MSE (~23 dB)
    pair = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.01)])
    assert evaluation.psnr(pair, zeros) == pytest.approx(30.0)
    assert evaluation.psnr(zeros, zeros) == pytest.approx(100.0)  # the MSE floor of 1e-10
    assert evaluation.psnr(torch.full_like(zeros, 51.0), zeros, peak=255.0) == pytest.approx(20 * math.log10(5))


def test_top_rows_mean_reads_the_background_of_the_top_rows():
    images = torch.zeros(2, 1, 6, 5)
    images[:, :, :3] = 0.25
    images[:, :, 3:] = 1.0
    assert evaluation.top_rows_mean(images) == pytest.approx(0.25)
    assert evaluation.top_rows_mean(images, rows=6) == pytest.approx(0.625)


# --- diffusion models ----------------------------------------------------------------------------------------------

SCHEDULE = dp.GaussianDiffusion.linear(100)


def test_smoothing_sigma_inverts_densepure_alpha_bar():
    for t in (1, 10, 37, 100):
        sigma = evaluation.smoothing_sigma(SCHEDULE, t)
        assert dp.alpha_bar_for_sigma(sigma) == pytest.approx(SCHEDULE.alpha_bar(t))
    a = SCHEDULE.alpha_bar(50)
    assert evaluation.smoothing_sigma(SCHEDULE, 50) == pytest.approx(math.sqrt((1 - a) / a) / 2)
    assert evaluation.denoising_times(SCHEDULE, (0.001, 0.02, 0.5, 0.7)) == [1, 2, 50, 70]


def oracle_eps(x0_model, schedule):
    """The exact eps of q_sample(x0, t, .) for known clean images x0 (model space)."""
    def eps(x_t, t_model, y=None):
        a = schedule.alpha_bar(float(t_model[0]) / schedule.timestep_scale + 1)  # timestep t - 1 is time t
        return (x_t - a ** 0.5 * x0_model) / (1 - a) ** 0.5
    return eps


def test_eps_error_is_zero_for_the_true_noise_and_the_noise_rms_for_a_zero_network():
    images = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    x0 = imagespace.to_model_space(images)
    assert evaluation.eps_error_rms(oracle_eps(x0, SCHEDULE), SCHEDULE, images, 100, seed=5) < 1e-4
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
    zero = evaluation.eps_error_rms(lambda x, t, y=None: torch.zeros_like(x), SCHEDULE, images, 100, seed=5)
    assert zero == pytest.approx(noise.pow(2).mean().sqrt().item())


def test_denoising_quality_rows_of_an_oracle_denoiser():
    images = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1
    x0 = imagespace.to_model_space(images)
    rows = evaluation.denoising_quality(oracle_eps(x0, SCHEDULE), SCHEDULE, images, (0.1, 0.5), seed=3)
    assert [row["t"] for row in rows] == [10, 50]
    for row in rows:
        t = row["t"]
        assert row["sigma"] == pytest.approx(evaluation.smoothing_sigma(SCHEDULE, t))
        assert row["PSNR denoised (dB)"] > 80  # the oracle recovers x up to float rounding
        # the noisy input: the same draw (seed + t), rescaled to the clean image's scale, clipped
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(3 + t))
        x_t = SCHEDULE.q_sample(x0, t, noise)
        noisy = imagespace.to_image_space(x_t / SCHEDULE.alpha_bar(t) ** 0.5).clamp(0, 1)
        assert row["PSNR noisy (dB)"] == pytest.approx(evaluation.psnr(noisy, images))
    assert rows[0]["PSNR noisy (dB)"] > rows[1]["PSNR noisy (dB)"]


def test_smoothing_accuracies_of_a_constant_and_of_a_brightness_classifier():
    labels = torch.tensor([0, 1, 1, 0, 1])
    images = two_tone(labels, size=8)
    identity = lambda x, t, y=None: torch.zeros_like(x)  # noqa: E731 - eps = 0: one-shot returns x_t/sqrt(a)
    rows = evaluation.smoothing_accuracies(Constant(1, 2), identity, SCHEDULE, images, labels, [0.05, 0.5],
                                           seed=0, batch_size=2)
    assert [(row["sigma"], row["input"]) for row in rows] == [
        (0.0, "clean"), (0.05, "noisy"), (0.05, "one-shot denoised"), (0.5, "noisy"), (0.5, "one-shot denoised")]
    assert all(row["accuracy"] == pytest.approx(0.6) for row in rows)  # 3 of 5 images are class 1
    for row in rows:
        if row["input"] == "one-shot denoised":
            assert row["t_star"] == SmoothingDenoiser(identity, SCHEDULE, row["sigma"],
                                                      tstar_rule="first_at_least").t_star
        else:
            assert row["t_star"] is None
    rows = evaluation.smoothing_accuracies(brightness, identity, SCHEDULE, images, labels, [0.05], seed=0)
    assert [row["accuracy"] for row in rows] == [1.0, 1.0, 1.0]  # 64 pixels of noise 0.05 cannot flip a mean


def test_multihead_agreement_measures_the_heads_distance_from_the_teacher():
    images = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    seen = []

    def teacher(x_t, t_model):  # [N, K=2, C_out=2 (learned sigma), H, W]: only the first channel is eps
        seen.append((x_t, t_model))
        return torch.stack([torch.cat([x_t, torch.full_like(x_t, 9.0)], 1)] * 2, dim=1)

    def heads(x_t, t_model):
        return teacher(x_t, t_model) + torch.tensor([0.1, 5.0]).view(1, 1, 2, 1, 1)  # off by 0.1 on eps only

    rows = evaluation.multihead_agreement(heads, teacher, SCHEDULE, images, (0.1, 0.3), seed=7)
    assert [row["t"] for row in rows] == [10, 30]
    for row, (x_t, t_model) in zip(rows, seen[1::2]):
        assert row["MSE(multi-head, conditional)"] == pytest.approx(0.01)
        assert row["MSE(conditional, 0) for scale"] == pytest.approx(x_t.pow(2).mean().item())
        assert torch.all(t_model == SCHEDULE.time_to_model_timestep(row["t"]))
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7 + row["t"]))
        assert torch.allclose(x_t, SCHEDULE.q_sample(imagespace.to_model_space(images), row["t"], noise))


# --- training logs -------------------------------------------------------------------------------------------------

def test_loss_log_summary_reads_the_last_logged_row(tmp_path):
    path = tmp_path / "loss.tsv"
    path.write_text("step\tloss\tseconds\n20\t0.5\t1.25\n40\t0.125\t2.5\n")
    assert evaluation.loss_log_summary(path) == {"steps": 40, "final_loss": 0.125, "seconds": 2.5}
    path.write_text("step\tloss\tseconds\n")
    with pytest.raises(ValueError, match="no logged steps"):
        evaluation.loss_log_summary(path)


def test_network_parameters_counts_every_tensor():
    network = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1, bias=False))
    network[1].requires_grad_(False)
    assert evaluation.network_parameters(network) == 3 * 2 + 2 + 2
