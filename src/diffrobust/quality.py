"""Edit-quality measures and the paired statistics behind the claims of "Pixel is a Barrier" (Xue & Chen, arXiv
2404.13320): how much a protective perturbation spoils an SDEdit edit, and whether a purifier undoes it.

Images are [0, 1] float tensors, N x C x H x W, on the CPU or a CUDA device. The per-image measures (`psnr`, `ssim`,
`feature_distance`, `cosine_similarity`) return one value per image as a float64 CPU tensor of length N, computed in
float64; the claims are tested with paired statistics over those values.

Pixel measures follow Diff-Protect's evaluation (xavihart/Diff-Protect `code/utils.py`, `ssim_` and `psnr_`), minus
its PSNR bug (see `psnr`). Feature measures take (N, D) features of a feature extractor, an nn.Module mapping [0, 1]
images to (N, D): on the mini preset the penultimate layer of the classifier the DAG trains (`penultimate_features`),
at paper scale Inception (FID, KID) or CLIP (image-image similarity) loaded from user-provided files.
`extract_features` runs an extractor in batches.

The claims compare two conditions image by image (an attacked edit and its random +-eps control, or two purifiers):
`paired_bootstrap_ci` gives a percentile interval of the mean difference, and `degrades_beyond` and
`equivalent_within` turn it into a `ClaimVerdict` ('holds', 'fails' or 'inconclusive') with a one-line sentence.
"""

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

VERDICTS = ("holds", "fails", "inconclusive")

# OpenCV's COLOR_BGR2GRAY on uint8 (ITU-R BT.601 luma, 0.299 R + 0.587 G + 0.114 B) in its fixed-point form:
# Y = (4899 R + 9617 G + 1868 B + 2^13) >> 14 (imgproc/src/color.hpp, R2Y/G2Y/B2Y, yuv_shift 14).
BT601_FIXED_POINT_RGB = (4899, 9617, 1868)
_BT601_SHIFT = 14


def _pair(a, b):
    if a.shape != b.shape:
        raise ValueError(f"images of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() != 4:
        raise ValueError(f"images must be N x C x H x W, got shape {tuple(a.shape)}")
    return a.to(torch.float64), b.to(torch.float64)


# --- pixel measures ------------------------------------------------------------------------------------------------

def psnr(a, b, data_range=1.0):
    """Per-image PSNR in dB, 10·log10(data_range² / MSE), the MSE over the image's channels and pixels, in float64.

    Identical images give inf (Diff-Protect returns 100 there). Diff-Protect's `psnr_` subtracts the two uint8
    arrays cv2.imread returns, so every negative difference wraps around modulo 256 before it is squared, and it
    reports that number; nothing here reproduces it: the difference is taken in float. Equals
    skimage.metrics.peak_signal_noise_ratio(a_i, b_i, data_range=data_range) per image."""
    a, b = _pair(a, b)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse)).cpu()


def diffprotect_grayscale(images01):
    """What Diff-Protect's SSIM sees of an image: 8-bit levels (x·255 rounded, as `imagespace.float_to_uint8`),
    then OpenCV's BT.601 grayscale in fixed point (`BT601_FIXED_POINT_RGB`), back on [0, 1] (level / 255): a float64
    N x 1 x H x W tensor. Channels are R, G, B (cv2 reads B, G, R and weighs them so); a 1-channel image keeps its
    levels (cv2 reads a gray PNG as three equal channels, whose weights sum to 2^14)."""
    levels = (images01.detach().to(torch.float64).clamp(0, 1) * 255).round().to(torch.int64)
    channels = levels.shape[1]
    if channels == 1:
        return levels.to(torch.float64) / 255
    if channels != 3:
        raise ValueError(f"grayscale needs 1 or 3 channels (R, G, B), got {channels}")
    weights = torch.tensor(BT601_FIXED_POINT_RGB, device=levels.device).view(1, 3, 1, 1)
    gray = ((levels * weights).sum(1, keepdim=True) + (1 << (_BT601_SHIFT - 1))) >> _BT601_SHIFT
    return gray.to(torch.float64) / 255


def _window_means(x, win_size):
    # skimage filters the whole image (scipy uniform_filter, reflected borders) and then crops (win_size - 1) // 2
    # pixels off every border before averaging; what is left are exactly the windows that lie inside the image,
    # i.e. an un-padded box filter.
    return F.avg_pool2d(x, win_size, stride=1)


def ssim(a, b, data_range=1.0, grayscale=False, win_size=7):
    """Per-image mean SSIM as skimage.metrics.structural_similarity computes it by default: a uniform win_size x
    win_size window (7), K1 = 0.01, K2 = 0.03, sample covariances (use_sample_covariance=True, N - 1 in the
    window), the SSIM map averaged over the windows that lie inside the image (skimage's border crop); a
    multi-channel image is the mean over its channels (skimage's channel_axis). Float64, batched, on the inputs'
    device.

    grayscale=True first turns both images into Diff-Protect's 8-bit BT.601 gray (`diffprotect_grayscale`); its
    `ssim_` then calls skimage on the uint8 gray arrays, data_range 255, which is this on levels / 255 with
    data_range 1. Numbers set beside the paper's (the PDM-Pure reports) use grayscale=True, its protocol (on
    1-channel mini images that only rounds to 8 bits); grayscale=False compares the float images as given, channel
    by channel.
    Images smaller than the window are an error, as in skimage."""
    a, b = _pair(a, b)
    if grayscale:
        a, b = diffprotect_grayscale(a), diffprotect_grayscale(b)
    if win_size % 2 != 1 or min(a.shape[-2:]) < win_size:
        raise ValueError(f"SSIM needs an odd win_size no larger than the image, got {win_size} for "
                         f"{a.shape[-2]}x{a.shape[-1]} images")
    n, c, h, w = a.shape
    x, y = a.reshape(n * c, 1, h, w), b.reshape(n * c, 1, h, w)
    sample_covariance = win_size ** 2 / (win_size ** 2 - 1)
    mean_x, mean_y = _window_means(x, win_size), _window_means(y, win_size)
    var_x = sample_covariance * (_window_means(x * x, win_size) - mean_x ** 2)
    var_y = sample_covariance * (_window_means(y * y, win_size) - mean_y ** 2)
    cov_xy = sample_covariance * (_window_means(x * y, win_size) - mean_x * mean_y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
                / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2)))
    return ssim_map.reshape(n, -1).mean(1).cpu()


__all__ = ["VERDICTS", "BT601_FIXED_POINT_RGB", "psnr", "diffprotect_grayscale", "ssim"]
