"""The papers' pretrained image classifiers behind the project's classifier interface ([0, 1] images -> logits).

DensePure and Carlini et al. classify the denoised image with off-the-shelf transformers: CIFAR-10 with the Hugging
Face ViT-B/16 `aaraki/vit-base-patch16-224-in21k-finetuned-cifar10` at 224 px, ImageNet with BEiT-L/16 at 512 px
(timm `beit_large_patch16_512`, weights from microsoft/unilm). Both resize the 32 / 256 px image bicubically (with
antialiasing) to the classifier's resolution and normalise with mean = std = 0.5. That preprocessing lives here,
inside the network, so every defense hands the classifier [0, 1] images as it does for the other families.

Registry `architecture` blocks:
- family `hf_vit`: `config` holds the Hugging Face ViTConfig fields (as in the checkpoint's config.json) and
  `input` ({size, mean, std, interpolation}). The checkpoint is the Hugging Face folder (config.json,
  pytorch_model.bin); it is read with transformers' own `from_pretrained`, which also renames the legacy
  (transformers 4.x) weight names, and any missing, unexpected or mis-shaped weight is an error.
- family `timm_beit`: `config` holds `model_name` (a timm model), timm keyword arguments and `input`. The unilm
  `.pth` ({"model": state_dict}) goes through timm's BEiT checkpoint filter (it drops the relative-position index
  buffers, which timm recomputes) and is loaded strictly.
"""

import torch
import torch.nn.functional as F
from torch import nn

INPUT_KEYS = {"size", "mean", "std", "interpolation"}


class ResizeNormalize(nn.Module):
    """[0, 1] images -> the classifier's input: resize to size x size (antialiased), then (x - mean) / std."""

    def __init__(self, size, mean, std, interpolation="bicubic"):
        super().__init__()
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"input interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
        self.size, self.interpolation = int(size), interpolation
        # not persistent: the official state dicts carry no such buffers
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x01):
        if x01.shape[-2:] != (self.size, self.size):
            x01 = F.interpolate(x01, size=(self.size, self.size), mode=self.interpolation, align_corners=False,
                                antialias=True)
        return (x01 - self.mean) / self.std


class PretrainedClassifier(nn.Module):
    """preprocess, then the pretrained network; returns logits (Hugging Face outputs are unwrapped)."""

    def __init__(self, preprocess, network):
        super().__init__()
        self.preprocess = preprocess
        self.network = network

    def forward(self, x01):
        out = self.network(self.preprocess(x01))
        return out.logits if hasattr(out, "logits") else out


def _split_input(config, family):
    config = dict(config)
    spec = config.pop("input", None)
    if not isinstance(spec, dict) or set(spec) != INPUT_KEYS:
        raise ValueError(f"{family} config needs an `input` block with exactly the keys {sorted(INPUT_KEYS)} "
                         f"(the classifier's resolution and normalisation), got {spec!r}")
    return config, ResizeNormalize(**spec)


# --- Hugging Face ViT ---------------------------------------------------------------------------------------------

def build_hf_vit(config):
    """An untrained HF ViTForImageClassification from its config.json fields, behind ResizeNormalize."""
    from transformers import ViTConfig, ViTForImageClassification

    config, preprocess = _split_input(config, "hf_vit")
    return PretrainedClassifier(preprocess, ViTForImageClassification(ViTConfig(**config)))


def load_hf_vit(config, folder):
    """The HF ViT in `folder` (config.json + weights) via transformers' from_pretrained, offline and strict."""
    from transformers import ViTForImageClassification

    config, preprocess = _split_input(config, "hf_vit")
    network, info = ViTForImageClassification.from_pretrained(str(folder), local_files_only=True,
                                                              output_loading_info=True)
    problems = {name: info.get(name) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if info.get(name)}
    if problems:
        raise ValueError(f"{folder}: the weights do not fit ViTForImageClassification: {problems}")
    for key, expected in config.items():
        actual = getattr(network.config, key, None)
        if actual != expected:
            raise ValueError(f"{folder}/config.json: {key} = {actual!r}, but the registry's architecture says "
                             f"{expected!r}; fix config/checkpoints.yaml or the download")
    return PretrainedClassifier(preprocess, network)


# --- timm BEiT -----------------------------------------------------------------------------------------------------

def build_timm_beit(config):
    """An untrained timm BEiT (`model_name` plus timm keyword arguments), behind ResizeNormalize."""
    import timm

    config, preprocess = _split_input(config, "timm_beit")
    name = config.pop("model_name", None)
    if not isinstance(name, str) or not name.startswith("beit"):
        raise ValueError(f"timm_beit config needs model_name, a timm BEiT model (e.g. beit_large_patch16_512), got {name!r}")
    return PretrainedClassifier(preprocess, timm.create_model(name, pretrained=False, **config))


def timm_beit_state_dict(checkpoint, classifier):
    """The unilm checkpoint ({"model": ...} or a bare state dict) filtered for timm's BEiT, keyed for `classifier`."""
    from timm.models.beit import checkpoint_filter_fn

    filtered = checkpoint_filter_fn(checkpoint, classifier.network)
    return {f"network.{key}": value for key, value in filtered.items()}
