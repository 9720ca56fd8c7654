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
