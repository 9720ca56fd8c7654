"""The image-processing purifiers Pixel-is-a-Barrier compares PDM-Pure with (its Appendix D): JPEG compression at
quality 65 and a 20% crop resized back. Both are purifiers (x01, generator) -> x01 and deterministic."""

import io

import numpy as np
from torch.nn import functional as F

from diffrobust import imagespace


class JPEGCompression:
    """Encode and decode every image as JPEG at `quality` (Pillow, 4:2:0 chroma subsampling for RGB)."""

    def __init__(self, quality=65):
        if not 1 <= int(quality) <= 95:
            raise ValueError(f"JPEG quality must lie in 1..95, got {quality}")
        self.quality = int(quality)

    def __call__(self, x01, generator=None):
        from PIL import Image

        pixels = imagespace.float_to_uint8(x01)
        out = []
        for image in pixels:
            array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
            out.append(decoded[None] if decoded.ndim == 2 else decoded.transpose(2, 0, 1))
        return imagespace.uint8_to_float(np.stack(out)).to(x01.device)


class CropResize:
    """Keep the central (1 - crop) of each side and resize back bilinearly (the paper's "20% crop")."""

    def __init__(self, crop=0.2):
        if not 0.0 < crop < 1.0:
            raise ValueError(f"crop fraction must lie in (0, 1), got {crop}")
        self.crop = float(crop)

    def __call__(self, x01, generator=None):
        size = x01.shape[-1]
        keep = max(1, round(size * (1.0 - self.crop)))
        start = (size - keep) // 2
        cropped = x01[..., start:start + keep, start:start + keep]
        return F.interpolate(cropped, size=x01.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)


def identity(x01, generator=None):
    """No purification (the "none" row of the purification table)."""
    return x01


__all__ = ["CropResize", "JPEGCompression", "identity"]
