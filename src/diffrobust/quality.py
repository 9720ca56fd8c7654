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
import torch
import torch.nn.functional as F
from torch import nn

VERDICTS = ("holds", "fails", "inconclusive")

# OpenCV's COLOR_BGR2GRAY on uint8 (ITU-R BT.601 luma, 0.299 R + 0.587 G + 0.114 B) in its fixed-point form, as
# OpenCV 4.x computes it (imgproc color.hpp RY15/GY15/BY15, gray_shift 15; Q15 since opencv PR #13440, 2018):
# Y = (9798 R + 19235 G + 3735 B + 2^14) >> 15. Diff-Protect's env.yml pins opencv-python 4.1.2.30, which gives
# exactly this on all 2^24 colours; the 3.4 branch's 14-bit (4899, 9617, 1868) differs by one level on 43,864.
BT601_FIXED_POINT_RGB = (9798, 19235, 3735)
_BT601_SHIFT = 15


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
    levels (cv2 reads a gray PNG as three equal channels, whose weights sum to 2^15)."""
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


# --- feature extractors --------------------------------------------------------------------------------------------

class PenultimateFeatures(nn.Module):
    """The input of a classifier's layer `layer` (default "fc", the final linear layer of the project's SmallResNet
    and WideResNet: the globally pooled features), flattened to (N, D): a feature extractor for the measures below.

    It runs the whole classifier and reads the layer's input with a forward pre-hook that exists only during the
    call, so the classifier is unchanged and can still be used (and hooked) elsewhere. Gradients and train/eval
    mode are the caller's: put a classifier with batch norm in eval mode first."""

    def __init__(self, classifier, layer="fc"):
        super().__init__()
        modules = dict(classifier.named_modules())
        if layer not in modules:
            linear = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
            raise ValueError(f"the classifier has no layer {layer!r}; its linear layers: {', '.join(linear) or 'none'}")
        # the layer is looked up by name at each call rather than kept as an attribute, which would register it a
        # second time (its weights twice in the state dict)
        self.classifier, self.layer = classifier, layer

    def forward(self, x01):
        captured = []
        layer = self.classifier.get_submodule(self.layer)
        handle = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self.classifier(x01)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"layer {self.layer!r} was not called in the classifier's forward")
        return captured[-1].flatten(1)


def penultimate_features(classifier, layer="fc"):
    """A feature extractor, [0, 1] images -> (N, D), reading the input of `classifier`'s layer `layer`
    (`PenultimateFeatures`)."""
    return PenultimateFeatures(classifier, layer)


@torch.no_grad()
def extract_features(extractor, images01, batch_size=250):
    """(N, D) float64 CPU features of `images01` under `extractor`, in batches of `batch_size` (None: one batch)."""
    chunks = [images01] if batch_size is None else images01.split(batch_size)
    return torch.cat([extractor(chunk).flatten(1).to(torch.float64).cpu() for chunk in chunks])


def _features(feats, name):
    matrix = torch.as_tensor(feats).detach().to(device="cpu", dtype=torch.float64)
    if matrix.dim() != 2:
        raise ValueError(f"{name} must be (N, D) features, got shape {tuple(matrix.shape)}")
    return matrix


def _feature_pair(feats_a, feats_b):
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape != b.shape:
        raise ValueError(f"per-image feature measures need features of the same images: {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return a, b


# --- feature measures: per image -----------------------------------------------------------------------------------

def feature_distance(feats_a, feats_b):
    """Per-image LPIPS-like distance: ‖a/‖a‖ - b/‖b‖‖², the squared L2 distance of the unit-normalised feature
    vectors (0 for the same direction, 2 for orthogonal ones, 4 for opposite ones; equals 2 - 2·cosine).

    Like LPIPS it normalises features per image and squares their difference; unlike LPIPS it uses one global
    feature vector, with neither per-layer, per-location normalisation nor learned channel weights, so its numbers
    are not LPIPS numbers."""
    a, b = _feature_pair(feats_a, feats_b)
    return (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1)


def cosine_similarity(feats_a, feats_b):
    """Per-image cosine similarity of two feature vectors (CLIP image-image similarity when they are CLIP image
    embeddings, as Diff-Protect's `clip_sim`)."""
    a, b = _feature_pair(feats_a, feats_b)
    return F.cosine_similarity(a, b, dim=1)


# --- feature measures: between sets --------------------------------------------------------------------------------

def feature_statistics(feats):
    """(mean, covariance) of (N, D) features as FID uses them: float64 numpy, covariance with N - 1 (np.cov)."""
    matrix = _features(feats, "feats").numpy()
    return matrix.mean(axis=0), np.cov(matrix, rowvar=False)


def frechet_distance_from_stats(mu1, cov1, mu2, cov2, eps=1e-6):
    """Fréchet distance of two Gaussians, ‖mu1 - mu2‖² + tr(cov1 + cov2 - 2 (cov1 cov2)^½), as pytorch-fid
    computes it: scipy.linalg.sqrtm of the product; when that is not finite (a singular product), sqrtm of
    (cov1 + eps·I)(cov2 + eps·I) instead; a complex square root keeps its real part, and an imaginary diagonal
    larger than 1e-3 is an error (the covariances are then not covariances)."""
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: means {mu1.shape}, {mu2.shape}; covariances {cov1.shape}, "
                         f"{cov2.shape}")
    with warnings.catch_warnings():
        # a singular product makes sqrtm warn; the finiteness check below decides what to do about it
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov1 @ cov2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(cov1)) * eps
            covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm of the covariance product has an imaginary diagonal up to "
                             f"{np.abs(np.diagonal(covmean).imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def frechet_distance(feats_a, feats_b):
    """Fréchet distance (FID's formula) between the Gaussians fitted to two sets of (N, D) features
    (`feature_statistics`, `frechet_distance_from_stats`); the sets may differ in size. It is biased upwards for
    small N and needs N > D for a full-rank covariance.

    With fewer images than feature dimensions (the Pixel is a Barrier sets: 100 or fewer against Inception's 2,048)
    the covariances have rank N - 1 and tr((cov_a cov_b)^½) is exactly the nuclear norm of the N_a x N_b matrix
    A Bᵀ (A, B the centred features over √(N - 1)): the eigenvalues of cov_a cov_b = AᵀA BᵀB are the squared
    singular values of A Bᵀ. That is milliseconds where pytorch-fid's sqrtm of the 2,048² product takes about 15 s on
    2 cores, and agrees with it to about 2e-7 relative (tests/test_quality.py)."""
    a = _features(feats_a, "feats_a").numpy().astype(np.float64)
    b = _features(feats_b, "feats_b").numpy().astype(np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance needs features of the same size, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if min(len(a), len(b)) < 2 or max(len(a), len(b)) > a.shape[1]:
        return frechet_distance_from_stats(*feature_statistics(a), *feature_statistics(b))
    centred_a = (a - a.mean(axis=0)) / np.sqrt(len(a) - 1)
    centred_b = (b - b.mean(axis=0)) / np.sqrt(len(b) - 1)
    trace_sqrt_product = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum()
    diff = a.mean(axis=0) - b.mean(axis=0)
    return float(diff @ diff + (centred_a ** 2).sum() + (centred_b ** 2).sum() - 2 * trace_sqrt_product)


class KernelDistance(NamedTuple):
    """KID over random subsets: the mean and the population standard deviation (torchmetrics') of the subsets'
    unbiased MMD² estimates."""
    mean: float
    std: float


def _polynomial_kernel(x, y):
    # KID's kernel k(x, y) = (x·y / d + 1)^3 (Bińkowski et al.; torchmetrics' defaults degree 3, gamma 1/d, coef 1)
    return (x @ y.T / x.shape[1] + 1) ** 3


def _unbiased_mmd2(x, y):
    # Unbiased MMD² of two equal-size samples: the within-sample kernel means leave out the diagonal (m(m - 1)
    # pairs), the cross term averages all m² pairs (torchmetrics' maximum_mean_discrepancy).
    m = len(x)
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / m ** 2


def kernel_inception_distance(feats_a, feats_b, subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance as torchmetrics defines it, on any features: for each of `subsets` rounds, draw
    `subset_size` rows of each set without replacement and take their unbiased MMD² under the cubic polynomial
    kernel (x·y/d + 1)^3; returns the mean and population std over the rounds (`KernelDistance`). The draws are
    torch.randperm of a CPU generator seeded `seed`, a's permutation then b's in each round (torchmetrics' order,
    but its global RNG replaced by the seeded generator)."""
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features of different widths: {a.shape[1]} and {b.shape[1]}")
    if not 2 <= subset_size <= min(len(a), len(b)):
        raise ValueError(f"subset_size must be at least 2 and at most the size of each set ({len(a)}, {len(b)}), "
                         f"got {subset_size}")
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        rows_a = torch.randperm(len(a), generator=generator)[:subset_size]
        rows_b = torch.randperm(len(b), generator=generator)[:subset_size]
        scores.append(_unbiased_mmd2(a[rows_a], b[rows_b]))
    scores = torch.stack(scores)
    return KernelDistance(scores.mean().item(), scores.std(unbiased=False).item())


# --- paired statistics ---------------------------------------------------------------------------------------------

def mean_difference(x, y, axis=-1):
    """mean(x - y) along `axis`: the default statistic of `paired_bootstrap_ci` (vectorised, as scipy wants)."""
    return np.mean(np.asarray(x) - np.asarray(y), axis=axis)


@dataclass(frozen=True)
class PairedInterval:
    """A statistic of paired per-image values and its bootstrap interval."""
    estimate: float      # the statistic on all images
    low: float           # interval bounds (percentile bootstrap)
    high: float
    confidence: float    # e.g. 0.95
    n_images: int
    n_resamples: int


def _per_image_values(values, name):
    array = np.asarray(values.detach().cpu() if torch.is_tensor(values) else values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one value per image, got shape {array.shape}")
    if not np.isfinite(array).all():
        # e.g. the PSNR of two identical images is inf: a mean over it says nothing
        raise ValueError(f"{name} has non-finite values at images {np.flatnonzero(~np.isfinite(array)).tolist()}")
    return array


def paired_bootstrap_ci(x, y, statistic=mean_difference, n_resamples=10000, confidence=0.95, seed=0):
    """Percentile bootstrap interval of statistic(x, y) over paired per-image values (x[i], y[i] belong to image i).

    Each resample draws N image indices with replacement and takes both values of each drawn image (the pairing is
    kept); the interval is the (1 - confidence)/2 and (1 + confidence)/2 quantiles (linear interpolation) of the
    n_resamples resampled statistics. This is scipy.stats.bootstrap(paired=True, method='percentile') with
    rng = numpy.random.default_rng(seed), so a seed gives the same interval everywhere. `statistic(x, y, axis)` must
    be vectorised along `axis` (as `mean_difference`). Needs at least two images and finite values."""
    import scipy.stats

    x, y = _per_image_values(x, "x"), _per_image_values(y, "y")
    if len(x) != len(y):
        raise ValueError(f"paired values need one pair per image: {len(x)} and {len(y)} values")
    if len(x) < 2:
        raise ValueError(f"a bootstrap needs at least two images, got {len(x)}")
    with warnings.catch_warnings():
        # identical differences on every image give a degenerate (zero-width) interval, which is the right answer
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        result = scipy.stats.bootstrap((x, y), statistic, n_resamples=n_resamples, paired=True, vectorized=True,
                                       confidence_level=confidence, method="percentile",
                                       rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    return PairedInterval(float(statistic(x, y, axis=-1)), float(interval.low), float(interval.high),
                          confidence, len(x), n_resamples)


# --- claim verdicts ------------------------------------------------------------------------------------------------

def format_interval(estimate, low, high):
    """"estimate [low, high]" with as many decimals as give the interval's width two significant digits (a
    zero-width interval: three significant digits), so that a difference is shown at the precision it is known to.
    """
    width = high - low
    if not width > 0:
        return f"{estimate:.3g} [{low:.3g}, {high:.3g}]"
    decimals = max(0, 1 - math.floor(math.log10(width)))

    def text(value):
        formatted = f"{value:.{decimals}f}"
        return formatted[1:] if formatted.startswith("-") and float(formatted) == 0 else formatted  # no "-0.000"

    return f"{text(estimate)} [{text(low)}, {text(high)}]"


@dataclass(frozen=True)
class ClaimVerdict:
    """The verdict on one paired claim, with the numbers it rests on."""
    label: str                 # what is measured, e.g. "PDM edit SSIM"
    difference: str            # which difference the interval is of, e.g. "attacked − control"
    interval: PairedInterval   # of the mean difference
    criterion: str             # the claim in words, e.g. "within ±0.05"
    verdict: str               # one of VERDICTS

    @property
    def sentence(self):
        """One line: label, difference, estimate [low, high], the interval's kind, criterion and verdict."""
        iv = self.interval
        return (f"{self.label}: {self.difference} = {format_interval(iv.estimate, iv.low, iv.high)} "
                f"({iv.confidence * 100:g}% paired bootstrap, {iv.n_images} images); {self.criterion}: "
                f"{self.verdict}")


def _check_margin(margin):
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")


def degrades_beyond(metric_attacked, metric_control, higher_is_better, margin=0.0, *, label="quality",
                    names=("attacked", "control"), n_resamples=10000, confidence=0.95, seed=0):
    """Claim: quality under the attack is worse than under the control (the random ±eps perturbation) by more than
    `margin`, from per-image values of one metric for the same images (`paired_bootstrap_ci` of attacked - control).

    Let [lo, hi] be the interval of the degradation D = control - attacked when higher is better (SSIM, PSNR,
    cosine), attacked - control otherwise (distances); D > 0 means the attack made things worse. Then
    - holds when lo > margin: the whole interval is worse by more than the margin;
    - fails when hi <= margin: the whole interval is at most `margin` worse, i.e. better, no different, or inside
      the equivalence margin (with margin 0: the whole interval on the other side of, or at, zero);
    - inconclusive otherwise (the interval straddles the margin).
    The sentence reports attacked - control itself, not D."""
    _check_margin(margin)
    interval = paired_bootstrap_ci(metric_attacked, metric_control, n_resamples=n_resamples, confidence=confidence,
                                   seed=seed)
    worse_low, worse_high = sorted((-interval.low, -interval.high) if higher_is_better else
                                   (interval.low, interval.high))
    verdict = "holds" if worse_low > margin else "fails" if worse_high <= margin else "inconclusive"
    better = "higher" if higher_is_better else "lower"
    return ClaimVerdict(label, f"{names[0]} − {names[1]}", interval,
                        f"{names[0]} worse than {names[1]} by more than {margin:g} ({better} is better)", verdict)


def equivalent_within(metric_a, metric_b, margin, *, label="quality", names=("a", "b"), n_resamples=10000,
                      confidence=0.95, seed=0):
    """Claim: two conditions give the same quality within ±margin, from per-image values of one metric for the same
    images (`paired_bootstrap_ci` of a - b). Equivalence testing through the interval (TOST): holds when the whole
    interval lies in [-margin, margin]; fails when it lies entirely outside (low > margin or high < -margin);
    inconclusive otherwise. A 95% interval inside the margin is TOST at level 0.025 per side (the usual
    alpha = 0.05 TOST reads a 90% interval: pass confidence=0.90 for it)."""
    _check_margin(margin)
    interval = paired_bootstrap_ci(metric_a, metric_b, n_resamples=n_resamples, confidence=confidence, seed=seed)
    if -margin <= interval.low and interval.high <= margin:
        verdict = "holds"
    elif interval.low > margin or interval.high < -margin:
        verdict = "fails"
    else:
        verdict = "inconclusive"
    return ClaimVerdict(label, f"{names[0]} − {names[1]}", interval, f"within ±{margin:g}", verdict)


__all__ = ["VERDICTS", "BT601_FIXED_POINT_RGB", "psnr", "diffprotect_grayscale", "ssim", "PenultimateFeatures",
           "penultimate_features", "extract_features", "feature_distance", "cosine_similarity",
           "feature_statistics", "frechet_distance_from_stats", "frechet_distance", "KernelDistance",
           "kernel_inception_distance", "mean_difference", "PairedInterval", "paired_bootstrap_ci",
           "format_interval", "ClaimVerdict", "degrades_beyond", "equivalent_within"]
