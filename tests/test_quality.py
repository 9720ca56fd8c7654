"""diffrobust.quality: the edit-quality measures of "Pixel is a Barrier" against skimage and closed forms, and the
paired statistics and verdicts of its claims on synthetic cases whose answers are known."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffrobust import quality
from diffrobust.networks.classifiers import SmallResNet


def uniform(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def noisy_copy(images, scale=0.1, seed=1):
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (images + scale * noise).clamp(0, 1)


def structured(size_h, size_w):
    """A bright disc on black, a horizontal ramp and a checkerboard: MNIST-like and high-contrast structure."""
    rows, cols = torch.meshgrid(torch.arange(size_h, dtype=torch.float64), torch.arange(size_w, dtype=torch.float64),
                                indexing="ij")
    disc = (((rows - size_h / 2) ** 2 + (cols - size_w / 2) ** 2) < (min(size_h, size_w) / 3) ** 2).double()
    ramp = cols / max(size_w - 1, 1)
    checker = ((rows + cols) % 2).double()
    return torch.stack([disc, ramp, checker])[:, None]


# --- PSNR ----------------------------------------------------------------------------------------------------------

def test_psnr_per_image_by_hand():
    zeros = torch.zeros(2, 1, 4, 4)
    images = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.01)])
    assert quality.psnr(images, zeros).tolist() == pytest.approx([20.0, 40.0])  # MSE 1e-2 and 1e-4
    # half the pixels off by 0.2: MSE 0.02, PSNR 10 log10(1 / 0.02)
    half = torch.zeros(1, 1, 4, 4)
    half[..., :2, :] = 0.2
    assert quality.psnr(half, zeros[:1]).item() == pytest.approx(10 * math.log10(50))
    assert quality.psnr(images * 255, zeros * 255, data_range=255).tolist() == pytest.approx([20.0, 40.0])


def test_psnr_matches_skimage_per_image():
    a = uniform(4, 3, 16, 12)
    b = noisy_copy(a)
    expected = [peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(), data_range=1.0) for i in range(4)]
    assert quality.psnr(a, b).numpy() == pytest.approx(expected, abs=1e-10)


def test_psnr_of_identical_images_is_infinite():
    a = uniform(2, 1, 8, 8)
    assert quality.psnr(a, a).tolist() == [math.inf, math.inf]


def test_psnr_differences_are_taken_in_float_not_modulo_256():
    # 8-bit levels 10 and 20: Diff-Protect's uint8 subtraction gives 10 - 20 = 246 (mod 256); the real error is 10
    a, b = torch.full((1, 3, 4, 4), 10 / 255), torch.full((1, 3, 4, 4), 20 / 255)
    assert quality.psnr(a, b).item() == pytest.approx(20 * math.log10(255 / 10))
    assert quality.psnr(a, b).item() == pytest.approx(quality.psnr(b, a).item())


# --- SSIM ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(28, 28), (8, 8), (7, 7), (32, 17), (9, 31)])
def test_ssim_matches_skimage_on_random_grayscale_images(size):
    a = uniform(3, 1, *size)
    b = noisy_copy(a)
    expected = [structural_similarity(a[i, 0].numpy(), b[i, 0].numpy(), data_range=1.0) for i in range(3)]
    assert quality.ssim(a, b).numpy() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("size", [(28, 28), (8, 8), (16, 11)])
def test_ssim_matches_skimage_on_structured_images(size):
    a = structured(*size)
    b = torch.roll(a, shifts=1, dims=-1) * 0.8 + 0.1  # shifted, contrast-reduced
    expected = [structural_similarity(a[i, 0].numpy(), b[i, 0].numpy(), data_range=1.0) for i in range(3)]
    assert quality.ssim(a, b).numpy() == pytest.approx(expected, abs=1e-9)
    # the comparison must see structure: SSIM far from 1 on the checkerboard, and not the same for every image
    assert len(set(np.round(expected, 6))) == 3 and min(expected) < 0.9


def test_ssim_with_other_windows_and_data_ranges_matches_skimage():
    a = uniform(2, 1, 12, 12) * 255
    b = noisy_copy(a / 255) * 255
    for win_size in (3, 5, 11):
        expected = [structural_similarity(a[i, 0].numpy(), b[i, 0].numpy(), data_range=255, win_size=win_size)
                    for i in range(2)]
        assert quality.ssim(a, b, data_range=255, win_size=win_size).numpy() == pytest.approx(expected, abs=1e-9)


def test_ssim_of_colour_images_is_skimage_channel_mean():
    a = uniform(2, 3, 20, 20)
    b = noisy_copy(a)
    expected = [structural_similarity(a[i].numpy(), b[i].numpy(), data_range=1.0, channel_axis=0)
                for i in range(2)]
    assert quality.ssim(a, b).numpy() == pytest.approx(expected, abs=1e-9)


def test_grayscale_is_opencv_bt601_on_8_bit_levels():
    # cv2.cvtColor(COLOR_BGR2GRAY) of pure red, green, blue, white and black on uint8: 76, 150, 29, 255, 0
    colours = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.float64)
    images = colours.view(5, 3, 1, 1).expand(5, 3, 2, 2)
    gray = quality.diffprotect_grayscale(images)
    assert gray.shape == (5, 1, 2, 2)
    assert (gray[:, 0, 0, 0] * 255).round().tolist() == [76, 150, 29, 255, 0]
    # any colour: within one level of 0.299 R + 0.587 G + 0.114 B on the rounded levels
    levels = (uniform(4, 3, 6, 6) * 255).round()
    luma = (0.299 * levels[:, 0] + 0.587 * levels[:, 1] + 0.114 * levels[:, 2])[:, None]
    assert ((quality.diffprotect_grayscale(levels / 255) * 255 - luma).abs() <= 1).all()
    # a gray image only goes to 8 bits
    one_channel = uniform(2, 1, 5, 5)
    assert torch.equal(quality.diffprotect_grayscale(one_channel), (one_channel * 255).round() / 255)


def test_ssim_grayscale_is_what_diff_protect_computes_on_uint8_gray():
    # Diff-Protect: ssim(cv2 gray uint8, cv2 gray uint8), data_range from the uint8 dtype (255)
    a = uniform(3, 3, 24, 24)
    b = noisy_copy(a, scale=0.05)
    gray_a = (quality.diffprotect_grayscale(a) * 255).round().to(torch.uint8).numpy()
    gray_b = (quality.diffprotect_grayscale(b) * 255).round().to(torch.uint8).numpy()
    expected = [structural_similarity(gray_a[i, 0], gray_b[i, 0]) for i in range(3)]
    assert quality.ssim(a, b, grayscale=True).numpy() == pytest.approx(expected, abs=1e-9)
    # and it is a different number from the colour SSIM
    assert not np.allclose(quality.ssim(a, b).numpy(), expected, atol=1e-4)


def test_ssim_of_an_image_with_itself_is_one_and_batches_keep_their_order():
    a = uniform(5, 1, 28, 28)
    assert quality.ssim(a, a).tolist() == pytest.approx([1.0] * 5, abs=1e-12)
    b = noisy_copy(a)
    singles = [quality.ssim(a[i:i + 1], b[i:i + 1]).item() for i in range(5)]
    assert quality.ssim(a, b).tolist() == pytest.approx(singles, abs=1e-15)
    assert quality.ssim(a.float(), b.float()).dtype == torch.float64


def test_ssim_refuses_images_smaller_than_the_window_and_mismatched_shapes():
    with pytest.raises(ValueError, match="win_size"):
        quality.ssim(uniform(1, 1, 6, 6), uniform(1, 1, 6, 6))
    with pytest.raises(ValueError, match="win_size"):
        quality.ssim(uniform(1, 1, 8, 8), uniform(1, 1, 8, 8), win_size=4)
    with pytest.raises(ValueError, match="different shapes"):
        quality.ssim(uniform(1, 1, 8, 8), uniform(1, 1, 8, 9))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        quality.ssim(uniform(1, 2, 8, 8), uniform(1, 2, 8, 8), grayscale=True)


# --- feature extractors --------------------------------------------------------------------------------------------

def test_penultimate_features_of_the_mini_classifier_are_the_pooled_input_of_fc():
    torch.manual_seed(0)
    classifier = SmallResNet(in_channels=1, num_classes=10, width=4, depth=8).eval()
    images = uniform(3, 1, 28, 28).float()
    extractor = quality.penultimate_features(classifier)
    features = extractor(images)
    assert features.shape == (3, 16)
    assert torch.allclose(classifier.fc(features), classifier(images), atol=1e-6)
    assert len(classifier.fc._forward_pre_hooks) == 0  # the hook lives only during a call
    assert extractor.state_dict().keys() == {f"classifier.{key}" for key in classifier.state_dict()}
    batched = quality.extract_features(extractor, images, batch_size=2)
    assert batched.dtype == torch.float64 and torch.allclose(batched, features.double(), atol=1e-6)


def test_penultimate_features_names_the_linear_layers_of_an_unknown_layer():
    with pytest.raises(ValueError, match="no layer 'head'.*fc"):
        quality.penultimate_features(SmallResNet(in_channels=1, width=4), layer="head")


# --- feature measures: per image -----------------------------------------------------------------------------------

def test_feature_distance_and_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 5.0], [6.0, 8.0], [-2.0, -2.0], [1.0, 1.0]])
    # orthogonal, same direction, opposite, 45 degrees
    assert quality.feature_distance(a, b).tolist() == pytest.approx([2.0, 0.0, 4.0, 2 - math.sqrt(2)])
    assert quality.cosine_similarity(a, b).tolist() == pytest.approx([0.0, 1.0, -1.0, 1 / math.sqrt(2)])
    assert quality.feature_distance(a, b).numpy() == pytest.approx(2 - 2 * quality.cosine_similarity(a, b).numpy())
    with pytest.raises(ValueError, match="same images"):
        quality.feature_distance(a, b[:3])


# --- Fréchet distance ----------------------------------------------------------------------------------------------

def diagonal_frechet(mu1, var1, mu2, var2):
    """‖mu1 - mu2‖² + Σ (var1 + var2 - 2 sqrt(var1 var2)) for diagonal covariances."""
    mu1, var1, mu2, var2 = map(np.asarray, (mu1, var1, mu2, var2))
    return float(((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum())


def test_frechet_distance_from_stats_is_the_closed_form():
    mu1, var1, mu2, var2 = [0.0, 1.0, -2.0], [1.0, 4.0, 0.25], [1.0, 1.0, 0.0], [9.0, 1.0, 0.25]
    expected = 1 + 0 + 4 + (1 + 9 - 6) + (4 + 1 - 4) + 0
    assert diagonal_frechet(mu1, var1, mu2, var2) == pytest.approx(expected)
    assert quality.frechet_distance_from_stats(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected)
    # one dimension: (mu1 - mu2)² + (s1 - s2)²; a rotation of both covariances changes nothing
    assert quality.frechet_distance_from_stats([2.0], [[4.0]], [-1.0], [[1.0]]) == pytest.approx(9 + 1)
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rotated = [rotation @ np.diag(v) @ rotation.T for v in (var1, var2)]
    assert quality.frechet_distance_from_stats(rotation @ mu1, rotated[0], rotation @ mu2, rotated[1]) == \
        pytest.approx(expected, abs=1e-9)


def test_frechet_distance_of_large_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, sd1, mu2, sd2 = np.array([0.0, 1.0, 0.5, -1.0]), np.array([1.0, 2.0, 0.5, 1.0]), \
        np.array([0.5, 1.0, -0.5, -1.0]), np.array([1.5, 1.0, 0.5, 3.0])
    a = rng.normal(mu1, sd1, size=(50000, 4))
    b = rng.normal(mu2, sd2, size=(40000, 4))
    expected = diagonal_frechet(mu1, sd1 ** 2, mu2, sd2 ** 2)  # 7.0
    assert quality.frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert quality.frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_offsets_a_product_whose_square_root_does_not_exist():
    # two rank-2 covariances whose product has a 2x2 Jordan block at 0: scipy's sqrtm of it is not finite
    cov1 = np.array([[4.0, 4.0, 0.0], [4.0, 5.0, 2.0], [0.0, 2.0, 4.0]])
    cov2 = np.array([[1.0, -1.0, -1.0], [-1.0, 1.0, 1.0], [-1.0, 1.0, 2.0]])
    mu = np.zeros(3)
    distance = quality.frechet_distance_from_stats(mu, cov1, mu, cov2)
    with pytest.warns(scipy.linalg.LinAlgWarning):
        assert not np.isfinite(scipy.linalg.sqrtm(cov1 @ cov2)).all()
    offset = np.eye(3) * 1e-6
    root_with_offset = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    with_offset = np.trace(cov1) + np.trace(cov2) - 2 * np.trace(root_with_offset).real
    assert distance == pytest.approx(with_offset, abs=1e-12)
    # close to the exact value tr(cov1) + tr(cov2) - 2 tr((cov1^½ cov2 cov1^½)^½)
    root = scipy.linalg.sqrtm(cov1).real
    exact = np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(np.linalg.eigvalsh(root @ cov2 @ root).clip(0)).sum()
    assert distance == pytest.approx(exact, abs=0.01)


def test_frechet_distance_refuses_mismatched_statistics():
    with pytest.raises(ValueError, match="mismatched"):
        quality.frechet_distance_from_stats([0.0, 0.0], np.eye(2), [0.0, 0.0, 0.0], np.eye(3))


# --- KID -----------------------------------------------------------------------------------------------------------

def hand_unbiased_mmd2(x, y):
    """Unbiased MMD² with k(u, v) = (u·v/d + 1)^3, written as sums over pairs."""
    m, d = len(x), len(x[0])
    k = lambda u, v: (sum(p * q for p, q in zip(u, v)) / d + 1) ** 3  # noqa: E731
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    return within - 2 * cross


def test_kid_on_a_whole_tiny_set_is_the_unbiased_mmd():
    x = [[0.0, 1.0, 2.0], [1.0, -1.0, 0.5], [0.3, 0.2, 0.1], [2.0, 0.0, -1.0]]
    y = [[1.0, 1.0, 1.0], [0.0, 0.0, 0.5], [-1.0, 2.0, 0.0], [0.5, 0.5, 3.0]]
    # a subset of every row is the whole set, whatever the permutation: every round gives the same MMD²
    kid = quality.kernel_inception_distance(torch.tensor(x, dtype=torch.float64), np.array(y), subsets=5,
                                            subset_size=4, seed=3)
    assert kid.mean == pytest.approx(hand_unbiased_mmd2(x, y), abs=1e-12)
    assert kid.std == pytest.approx(0.0, abs=1e-12)


def test_kid_subsets_are_seeded_and_separate_shifted_features():
    rng = np.random.default_rng(0)
    a, same, shifted = rng.normal(size=(60, 8)), rng.normal(size=(50, 8)), rng.normal(1.0, 1.0, size=(50, 8))
    first = quality.kernel_inception_distance(a, shifted, subsets=20, subset_size=30, seed=0)
    assert first == quality.kernel_inception_distance(a, shifted, subsets=20, subset_size=30, seed=0)
    assert first != quality.kernel_inception_distance(a, shifted, subsets=20, subset_size=30, seed=1)
    null = quality.kernel_inception_distance(a, same, subsets=20, subset_size=30, seed=0)
    assert first.std > 0 and abs(null.mean) < 0.1 * first.mean
    with pytest.raises(ValueError, match="subset_size"):
        quality.kernel_inception_distance(a, same, subset_size=51)


# --- paired bootstrap ----------------------------------------------------------------------------------------------

def paired_sample(n=40, shift=0.3, noise=0.1, seed=0):
    """Per-image values y (spread across images) and x = y + shift + small per-image noise."""
    rng = np.random.default_rng(seed)
    y = rng.uniform(0.2, 0.9, size=n)
    return y + shift + rng.normal(0, noise, size=n), y


def test_bootstrap_is_the_percentile_interval_of_jointly_resampled_images():
    x, y = paired_sample()
    interval = quality.paired_bootstrap_ci(x, y, n_resamples=2000, confidence=0.9, seed=7)
    indices = np.random.default_rng(7).integers(0, len(x), (2000, len(x)))
    resampled = (x[indices] - y[indices]).mean(axis=1)
    assert (interval.low, interval.high) == pytest.approx(tuple(np.quantile(resampled, [0.05, 0.95])), abs=1e-12)
    assert interval.estimate == pytest.approx((x - y).mean())
    assert (interval.confidence, interval.n_images, interval.n_resamples) == (0.9, 40, 2000)


def test_bootstrap_is_deterministic_under_its_seed():
    x, y = paired_sample()
    first = quality.paired_bootstrap_ci(x, y, n_resamples=1000, seed=0)
    assert first == quality.paired_bootstrap_ci(torch.from_numpy(x), list(y), n_resamples=1000, seed=0)
    assert first != quality.paired_bootstrap_ci(x, y, n_resamples=1000, seed=1)


def test_bootstrap_interval_covers_the_true_mean_difference():
    covered = 0
    for seed in range(100):
        x, y = paired_sample(n=50, shift=0.3, noise=0.1, seed=seed)
        interval = quality.paired_bootstrap_ci(x, y, n_resamples=1000, seed=seed)
        covered += interval.low <= 0.3 <= interval.high
    # nominal 95%; the percentile interval runs a little short at n = 50
    assert 88 <= covered <= 100


def test_pairing_narrows_the_interval_when_images_differ_more_than_conditions():
    x, y = paired_sample(noise=0.01)
    paired = quality.paired_bootstrap_ci(x, y, n_resamples=2000)
    unpaired = quality.paired_bootstrap_ci(x, np.random.default_rng(1).permutation(y), n_resamples=2000)
    assert (paired.high - paired.low) < 0.2 * (unpaired.high - unpaired.low)


def test_bootstrap_refuses_unpaired_single_or_infinite_values():
    with pytest.raises(ValueError, match="one pair per image"):
        quality.paired_bootstrap_ci([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least two"):
        quality.paired_bootstrap_ci([1.0], [2.0])
    with pytest.raises(ValueError, match=r"non-finite values at images \[1\]"):
        quality.paired_bootstrap_ci([30.0, math.inf], [20.0, 25.0])


# --- verdicts ------------------------------------------------------------------------------------------------------

def attacked_and_control(shift, noise, n=32, seed=0):
    """Control values in [0.6, 0.95] and attacked = control + shift + per-image noise of mean exactly 0 (so the mean
    difference is `shift` and the interval sits around it, whatever the resampling draws)."""
    rng = np.random.default_rng(seed)
    control = rng.uniform(0.6, 0.95, size=n)
    deviations = rng.normal(0, noise, size=n)
    return control + shift + deviations - deviations.mean(), control


@pytest.mark.parametrize("shift, noise, margin, verdict", [
    (-0.10, 0.01, 0.0, "holds"),          # clearly worse under the attack
    (-0.10, 0.01, 0.05, "holds"),         # and worse by more than the margin
    (+0.10, 0.01, 0.0, "fails"),          # the attack made it better
    (-0.01, 0.005, 0.05, "fails"),        # worse, but inside the margin
    (0.0, 0.10, 0.0, "inconclusive"),     # no clear difference either way
    (-0.05, 0.05, 0.05, "inconclusive"),  # straddles the margin
])
def test_degrades_beyond_each_branch(shift, noise, margin, verdict):
    attacked, control = attacked_and_control(shift, noise)
    higher = quality.degrades_beyond(attacked, control, higher_is_better=True, margin=margin, n_resamples=2000)
    assert higher.verdict == verdict
    # a distance (lower is better) that moves the other way gives the same verdict
    lower = quality.degrades_beyond(1 - attacked, 1 - control, higher_is_better=False, margin=margin,
                                    n_resamples=2000)
    assert lower.verdict == verdict
    assert lower.interval.estimate == pytest.approx(-higher.interval.estimate) == pytest.approx(-shift)


def test_degrades_beyond_fails_when_the_attack_changes_nothing():
    control = np.linspace(0.5, 0.9, 10)
    assert quality.degrades_beyond(control, control, higher_is_better=True).verdict == "fails"
    with pytest.raises(ValueError, match="margin"):
        quality.degrades_beyond(control, control, higher_is_better=True, margin=-0.1)


@pytest.mark.parametrize("shift, noise, margin, verdict", [
    (0.001, 0.01, 0.05, "holds"),
    (0.20, 0.01, 0.05, "fails"),
    (-0.20, 0.01, 0.05, "fails"),
    (0.05, 0.02, 0.05, "inconclusive"),
    (0.0, 0.30, 0.05, "inconclusive"),
])
def test_equivalent_within_each_branch(shift, noise, margin, verdict):
    a, b = attacked_and_control(shift, noise)
    assert quality.equivalent_within(a, b, margin, n_resamples=2000).verdict == verdict


def test_verdict_sentences_carry_the_numbers():
    control = np.linspace(0.6, 0.9, 32)
    equivalent = quality.equivalent_within(control - 0.004, control, 0.05, label="PDM edit SSIM",
                                           names=("attacked", "control"))
    assert equivalent.sentence == ("PDM edit SSIM: attacked − control = -0.004 [-0.004, -0.004] "
                                   "(95% paired bootstrap, 32 images); within ±0.05: holds")
    degraded = quality.degrades_beyond(control - 0.12, control, higher_is_better=True, label="edit SSIM")
    assert degraded.sentence == ("edit SSIM: attacked − control = -0.12 [-0.12, -0.12] (95% paired bootstrap, "
                                 "32 images); attacked worse than control by more than 0 (higher is better): holds")
    assert degraded.verdict in quality.VERDICTS


def test_intervals_are_shown_at_the_precision_of_their_width():
    assert quality.format_interval(-0.0043, -0.0112, 0.0021) == "-0.004 [-0.011, 0.002]"
    assert quality.format_interval(-0.1, -0.1032, -0.0966) == "-0.1000 [-0.1032, -0.0966]"
    assert quality.format_interval(-2.345, -3.1, -1.6) == "-2.3 [-3.1, -1.6]"
    assert quality.format_interval(3e-18, -0.0324, 0.0339) == "0.000 [-0.032, 0.034]"
    assert quality.format_interval(-3e-18, -0.0324, 0.0339) == "0.000 [-0.032, 0.034]"
    assert quality.format_interval(12.0, 12.0, 12.0) == "12 [12, 12]"


@pytest.mark.parametrize("sizes", [(2, 2), (12, 7), (40, 40)])
def test_frechet_distance_with_fewer_images_than_features_equals_pytorch_fids_sqrtm(sizes):
    # the nuclear-norm form used below D images against the sqrtm of the covariance product (pytorch-fid's way)
    rng = np.random.default_rng(sum(sizes))
    a = rng.normal(size=(sizes[0], 256))
    b = rng.normal(0.1, 1.3, size=(sizes[1], 256))
    via_sqrtm = quality.frechet_distance_from_stats(*quality.feature_statistics(a), *quality.feature_statistics(b))
    assert quality.frechet_distance(a, b) == pytest.approx(via_sqrtm, rel=1e-6)
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="same size"):
        quality.frechet_distance(a, b[:, :255])
