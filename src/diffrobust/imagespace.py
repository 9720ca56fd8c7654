"""The one place where image-space conventions are converted.

Files and public interfaces hold images in [0, 1] (float, NCHW). Diffusion networks work in [-1, 1];
randomized smoothing adds noise of standard deviation sigma in [0, 1] space, which is 2*sigma in [-1, 1]
space (Carlini et al., issue #2 of ethz-spylab/diffusion_denoised_smoothing).
"""

import numpy as np
import torch


def to_model_space(x01):
    """[0, 1] -> [-1, 1]."""
    return x01 * 2.0 - 1.0


def to_image_space(xm):
    """[-1, 1] -> [0, 1] (no clipping; callers clip where the papers do)."""
    return (xm + 1.0) / 2.0


def sigma_to_model_space(sigma):
    """Noise level in [0, 1] space -> the same noise measured in [-1, 1] space."""
    return 2.0 * sigma


def uint8_to_float(images):
    """uint8 NCHW array or tensor in 0..255 -> float32 tensor in [0, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    return images.to(torch.float32) / 255.0


def float_to_uint8(x01):
    """float tensor in [0, 1] -> uint8 numpy array (rounded, clipped)."""
    return (x01.detach().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
