"""The papers' pretrained image classifiers behind the project's classifier interface ([0, 1] images -> logits).

DensePure and Carlini et al. classify the denoised image with off-the-shelf transformers: CIFAR-10 with the Hugging
Face ViT-B/16 `aaraki/vit-base-patch16-224-in21k-finetuned-cifar10` at 224 px, ImageNet with BEiT-L/16 at 512 px
(timm `beit_large_patch16_512`, weights from microsoft/unilm). The preprocessing (resize to the classifier's
resolution, normalise with mean = std = 0.5) lives here, inside the network, so every defense hands the classifier
[0, 1] images as it does for the other families. Two pipelines, chosen by name (`CLASSIFIER_PREPROCESS`):

- `carlini` (default): bicubic with antialiasing, then (x - 0.5)/0.5 — Carlini et al.'s `DRM.py`, both datasets.
- `densepure`: what DensePure's `eval_certified_densepure.py` does. CIFAR-10 (hf_vit, the old `ViTFeatureExtractor`
  path the aaraki ViT was fine-tuned with): x·255 truncated to uint8, PIL bilinear to 224 (PIL's two-pass
  fixed-point resampling, reproduced exactly by `PILBilinearUint8`), /255, normalise. ImageNet (timm_beit): bicubic
  256 -> 512 without antialiasing (torch's antialiased bicubic is another kernel), normalise. Today's transformers
  image processors do something else on float input, so the steps are written out here.

Registry `architecture` blocks:
- family `hf_vit`: `config` holds the Hugging Face ViTConfig fields (as in the checkpoint's config.json) and
  `input` ({size, mean, std, interpolation}). The checkpoint is the Hugging Face folder (config.json,
  pytorch_model.bin); it is read with transformers' own `from_pretrained`, which also renames the legacy
  (transformers 4.x) weight names, and any missing, unexpected or mis-shaped weight is an error.
- family `timm_beit`: `config` holds `model_name` (a timm model), timm keyword arguments and `input`. The unilm
  `.pth` ({"model": state_dict}) goes through timm's BEiT checkpoint filter (it drops the relative-position index
  buffers, which timm recomputes) and is loaded strictly.
- family `torchvision_classifier`: DiffPure's ImageNet ResNet-50 / WideResNet-50-2, `config` holds `model_name`
  (a torchvision.models builder: resnet50, wide_resnet50_2), `num_classes` and `input`. The checkpoint is
  torchvision's released state dict (download.pytorch.org), loaded strictly.
- family `timm_deit`: DiffPure's DeiT-S, `config` holds `model_name` (timm deit_small_patch16_224) and `input`; the
  facebookresearch/deit release ({"model": state_dict}, timm's key layout) is loaded strictly.
DiffPure (eval_sde_adv.py, utils.get_image_classifier) feeds these 224 px images normalised with the ImageNet mean
and std and resizes 224 -> 256 (bilinear, no antialias) before purification and 256 -> 224 after it; the project's
ImageNet images are 256 px, so the classifier's `input` is bilinear 256 -> 224 without antialias
(`antialias: false`) and then the ImageNet normalisation.
"""

import torch
import torch.nn.functional as F
from torch import nn

INPUT_KEYS = {"size", "mean", "std", "interpolation"}
OPTIONAL_INPUT_KEYS = {"antialias"}  # default True (Carlini et al.'s resize); DiffPure's bilinear resize has none
CLASSIFIER_PREPROCESS = ("carlini", "densepure")


class ResizeNormalize(nn.Module):
    """[0, 1] images -> the classifier's input: resize to size x size, then (x - mean) / std. `antialias` True is
    Carlini et al.'s resize; DensePure's ImageNet path has none."""

    def __init__(self, size, mean, std, interpolation="bicubic", antialias=True):
        super().__init__()
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"input interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
        self.size, self.interpolation, self.antialias = int(size), interpolation, bool(antialias)
        # not persistent: the official state dicts carry no such buffers
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def resize(self, x01):
        if x01.shape[-2:] == (self.size, self.size):
            return x01
        return F.interpolate(x01, size=(self.size, self.size), mode=self.interpolation, align_corners=False,
                             antialias=self.antialias)

    def forward(self, x01):
        return (self.resize(x01) - self.mean) / self.std


# PIL's resampling keeps filter coefficients in fixed point with this many fractional bits (Imaging/Resample.c).
_PIL_PRECISION_BITS = 32 - 8 - 2


def pil_bilinear_coefficients(in_size, out_size):
    """PIL's BILINEAR resampling matrix (out_size x in_size) in its fixed-point integers, as Resample.c computes
    it: triangle filter of support max(scale, 1), centres at (i + 0.5)·scale, weights normalised, then rounded."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filterscale  # the bilinear (triangle) filter has support 1
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for out in range(out_size):
        center = (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)  # C's (int) cast truncates; both bounds are >= 0 after max/min
        last = min(int(center + support + 0.5), in_size)
        weights = torch.tensor([max(0.0, 1.0 - abs((i + first - center + 0.5) / filterscale))
                                for i in range(last - first)], dtype=torch.float64)
        if weights.sum() != 0:
            weights = weights / weights.sum()
        one = float(1 << _PIL_PRECISION_BITS)
        matrix[out, first:last] = torch.where(weights < 0, torch.trunc(weights * one - 0.5),
                                              torch.trunc(weights * one + 0.5))
    return matrix


class PILBilinearUint8(ResizeNormalize):
    """DensePure's CIFAR-10 input: x·255 truncated to uint8 (numpy astype), PIL bilinear resize (horizontal pass,
    rounding to uint8, vertical pass, rounding), /255, normalise. Equal to PIL to the last bit (tested), batched
    and on any device; not differentiable (the truncation), which certification does not need."""

    def __init__(self, size, mean, std):
        super().__init__(size, mean, std, interpolation="bilinear", antialias=False)

    def resize(self, x01):
        pixels = torch.floor(x01.double().clamp(0, 1) * 255.0)
        half, one = float(1 << (_PIL_PRECISION_BITS - 1)), float(1 << _PIL_PRECISION_BITS)
        rows = pil_bilinear_coefficients(x01.shape[-1], self.size).to(pixels.device)
        columns = pil_bilinear_coefficients(x01.shape[-2], self.size).to(pixels.device)
        pixels = torch.floor((pixels @ rows.T + half) / one).clamp(0, 255)  # horizontal pass, to uint8
        pixels = torch.floor((columns @ pixels + half) / one).clamp(0, 255)  # vertical pass, to uint8
        return (pixels / 255.0).to(x01.dtype)


def preprocess_for(family, spec, mode="carlini"):
    """The preprocessing module of a pretrained classifier: `spec` is its registry `input` block, `mode` one of
    CLASSIFIER_PREPROCESS (see the module docstring)."""
    if mode == "carlini":
        return ResizeNormalize(**spec)
    if mode == "densepure":
        if family == "hf_vit":
            return PILBilinearUint8(spec["size"], spec["mean"], spec["std"])
        return ResizeNormalize(spec["size"], spec["mean"], spec["std"], interpolation="bicubic", antialias=False)
    raise ValueError(f"classifier preprocessing {mode!r}; choose one of {', '.join(CLASSIFIER_PREPROCESS)}")


def set_preprocess(network, architecture, mode):
    """Give a pretrained classifier (`PretrainedClassifier`) the named preprocessing; returns the network. Other
    classifiers (the mini ResNet, WRN) see images at their own resolution and have none: `carlini` leaves them as
    they are, `densepure` is refused for them rather than ignored."""
    if isinstance(network, PretrainedClassifier):
        network.preprocess = preprocess_for(architecture["family"], architecture["config"]["input"], mode)
        return network.to(next(network.parameters()).device)
    if mode != "carlini":
        raise ValueError(f"classifier preprocessing {mode!r} is for the papers' pretrained transformers; this "
                         f"classifier ({architecture.get('family')}) takes images as they are: use 'carlini'")
    return network


def reads_class_token_only(network):
    """Whether `network` is a Hugging Face ViTForImageClassification laid out as the pinned transformers writes it
    (vit.embeddings, vit.layers with q/k/v/o projections and mlp, vit.layernorm, classifier), whose logits read the
    class token alone, so `vit_class_token_logits` may compute them."""
    vit = getattr(network, "vit", None)
    layers = getattr(vit, "layers", None)
    if type(network).__name__ != "ViTForImageClassification" or layers is None or len(layers) == 0:
        return False
    last = layers[-1]
    attention = getattr(last, "attention", None)
    return (all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
            and all(hasattr(last, name) for name in ("layernorm_before", "layernorm_after", "mlp"))
            and hasattr(vit, "embeddings") and hasattr(vit, "layernorm") and hasattr(network, "classifier"))


def vit_class_token_logits(network, pixel_values):
    """ViTForImageClassification's logits, computing only what they read. The head classifies the class token of
    the last layer's output, so in the last layer only that token's query, attention output and MLP are needed
    (keys and values still come from every token): 196 of 197 tokens skip about 5/6 of one of the 12 layers,
    about 7% of ViT-B/16's work. The same arithmetic as the full forward (within 1e-6 in float32, tested); no
    dropout (eval only)."""
    vit = network.vit
    hidden = vit.embeddings(pixel_values.to(vit.embeddings.patch_embeddings.projection.weight.dtype))
    *first, last = vit.layers
    for layer in first:
        hidden = layer(hidden, None)
    attention, normed = last.attention, last.layernorm_before(hidden)
    batch, tokens, _ = normed.shape

    def heads(states):
        return states.view(batch, states.shape[1], -1, attention.head_dim).transpose(1, 2)

    query = heads(attention.q_proj(normed[:, :1]))
    attended = F.scaled_dot_product_attention(query, heads(attention.k_proj(normed)), heads(attention.v_proj(normed)),
                                              scale=attention.scaling)
    token = attention.o_proj(attended.transpose(1, 2).reshape(batch, 1, -1)) + hidden[:, :1]
    token = last.mlp(last.layernorm_after(token)) + token
    return network.classifier(vit.layernorm(token)[:, 0])


class PretrainedClassifier(nn.Module):
    """preprocess, then the pretrained network; returns logits (Hugging Face outputs are unwrapped). A ViT in eval
    mode computes only the class token in its last layer (`vit_class_token_logits`), as its head reads no other."""

    def __init__(self, preprocess, network):
        super().__init__()
        self.preprocess = preprocess
        self.network = network
        self.class_token_only = reads_class_token_only(network)

    def forward(self, x01):
        pixels = self.preprocess(x01)
        if self.class_token_only and not self.network.training:
            return vit_class_token_logits(self.network, pixels)
        out = self.network(pixels)
        return out.logits if hasattr(out, "logits") else out


def _split_input(config, family):
    config = dict(config)
    spec = config.pop("input", None)
    if not isinstance(spec, dict) or not INPUT_KEYS <= set(spec) <= INPUT_KEYS | OPTIONAL_INPUT_KEYS:
        raise ValueError(f"{family} config needs an `input` block with the keys {sorted(INPUT_KEYS)} and optionally "
                         f"{sorted(OPTIONAL_INPUT_KEYS)} (the classifier's resolution and normalisation), got {spec!r}")
    return config, ResizeNormalize(**spec)


# --- Hugging Face ViT ---------------------------------------------------------------------------------------------

def build_hf_vit(config):
    """An untrained HF ViTForImageClassification from its config.json fields, behind ResizeNormalize."""
    from transformers import ViTConfig, ViTForImageClassification

    config, preprocess = _split_input(config, "hf_vit")
    return PretrainedClassifier(preprocess, ViTForImageClassification(ViTConfig(**config)))


def from_pretrained_checked(model_class, folder, config, unused_prefixes=()):
    """`model_class.from_pretrained(folder)` offline and strict: every weight must fit (weights under
    `unused_prefixes`, e.g. CLIP's text tower for its image encoder, may be left over), and every structural field
    of the registry's `config` must equal the downloaded config.json's."""
    network, info = model_class.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    info = {**info, "unexpected_keys": [key for key in info.get("unexpected_keys", [])
                                        if not key.startswith(tuple(unused_prefixes))]}
    problems = {name: info.get(name) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if info.get(name)}
    if problems:
        raise ValueError(f"{folder}: the weights do not fit {model_class.__name__}: {problems}")
    for key, expected in config.items():
        actual = getattr(network.config, key, None)
        if actual != expected:
            raise ValueError(f"{folder}/config.json: {key} = {actual!r}, but the registry's architecture says "
                             f"{expected!r}; fix config/checkpoints.yaml or the download")
    return network


def load_hf_vit(config, folder):
    """The HF ViT in `folder` (config.json + weights) via transformers' from_pretrained, offline and strict."""
    from transformers import ViTForImageClassification

    config, preprocess = _split_input(config, "hf_vit")
    return PretrainedClassifier(preprocess, from_pretrained_checked(ViTForImageClassification, folder, config))


# --- CLIP image encoder (Pixel is a Barrier's image similarity at paper scale) ------------------------------------

class ImageFeatures(nn.Module):
    """preprocess, then a Hugging Face CLIP vision tower with its projection: [0, 1] images -> image embeddings."""

    def __init__(self, preprocess, network):
        super().__init__()
        self.preprocess = preprocess
        self.network = network

    def forward(self, x01):
        return self.network(pixel_values=self.preprocess(x01)).image_embeds


def build_hf_clip_vision(config):
    """An untrained CLIPVisionModelWithProjection from its vision-config fields, behind ResizeNormalize."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config, preprocess = _split_input(config, "hf_clip_vision")
    return ImageFeatures(preprocess, CLIPVisionModelWithProjection(CLIPVisionConfig(**config)))


def load_hf_clip_vision(config, folder):
    """The CLIP image encoder of a Hugging Face CLIP folder (openai/clip-vit-base-patch32: config.json and the whole
    CLIPModel's weights; the text tower's weights are the only ones left unused), offline."""
    from transformers import CLIPVisionModelWithProjection

    config, preprocess = _split_input(config, "hf_clip_vision")
    network = from_pretrained_checked(CLIPVisionModelWithProjection, folder, config,
                                      unused_prefixes=("text_model.", "text_projection", "logit_scale"))
    return ImageFeatures(preprocess, network)


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


# --- DiffPure's ImageNet classifiers: torchvision ResNets, DeiT-S ------------------------------------------------

# torchvision builder -> its bottleneck width_per_group: both are ResNet(Bottleneck, [3, 4, 6, 3]) with these widths
# (torchvision.models.resnet50 / wide_resnet50_2), so their state dicts share the key layout.
TORCHVISION_CLASSIFIERS = {"resnet50": 64, "wide_resnet50_2": 128}


def build_torchvision_classifier(config):
    """An untrained torchvision ImageNet ResNet (`model_name` of TORCHVISION_CLASSIFIERS; `width_per_group`
    defaults to the model's own, a smaller one is the rehearsal's reduced file), behind its input."""
    from torchvision.models.resnet import Bottleneck, ResNet

    config, preprocess = _split_input(config, "torchvision_classifier")
    name = config.pop("model_name", None)
    if name not in TORCHVISION_CLASSIFIERS:
        raise ValueError(f"torchvision_classifier config needs model_name, one of {', '.join(TORCHVISION_CLASSIFIERS)}"
                         f", got {name!r}")
    config.setdefault("width_per_group", TORCHVISION_CLASSIFIERS[name])
    return PretrainedClassifier(preprocess, ResNet(Bottleneck, [3, 4, 6, 3], **config))


def build_timm_deit(config):
    """An untrained timm DeiT (`model_name` plus timm keyword arguments), behind its input."""
    import timm

    config, preprocess = _split_input(config, "timm_deit")
    name = config.pop("model_name", None)
    if not isinstance(name, str) or not name.startswith("deit"):
        raise ValueError(f"timm_deit config needs model_name, a timm DeiT model (e.g. deit_small_patch16_224), got {name!r}")
    return PretrainedClassifier(preprocess, timm.create_model(name, pretrained=False, **config))


def prefixed_network_state_dict(state_dict):
    """An official classifier state dict keyed for PretrainedClassifier (its weights live under `network.`)."""
    return {f"network.{key}": value for key, value in state_dict.items()}


# --- LPIPS and FID's Inception (Pixel is a Barrier's perceptual metrics at paper scale) -----------------------------

def _slice_of(index, bounds=(2, 5, 8, 10, 12)):
    return next(k for k, bound in enumerate(bounds, start=1) if index < bound)


def load_lpips_alex(alexnet_file, device="cpu"):
    """LPIPS (Zhang et al., the `lpips` package's v0.1 linear heads, which its wheel ships) on AlexNet features read
    from torchvision's `alexnet-owt-7be5be79.pth` at `alexnet_file` (the package would download it). Returns the
    lpips.LPIPS module: it takes images in [-1, 1]."""
    import lpips

    model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(alexnet_file, map_location="cpu", weights_only=True)
    # torchvision's features.<i>.<p> live in lpips' five slices as slice<k>.<i>.<p>
    features = {f"slice{_slice_of(int(key.split('.')[1]))}.{key.split('.', 1)[1]}": value
                for key, value in state.items() if key.startswith("features.")}
    model.net.load_state_dict(features, strict=True)
    return model.to(device).eval().requires_grad_(False)


FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class FIDInceptionFeatures(nn.Module):
    """pytorch-fid's InceptionV3 (the TF FID Inception's weights) as a feature extractor: [0, 1] images ->
    (N, 2048) pool features, resized to 299 inside, as pytorch-fid computes FID."""

    def __init__(self, inception):
        super().__init__()
        self.inception = inception

    def forward(self, x01):
        x = x01.expand(-1, 3, -1, -1) if x01.shape[1] == 1 else x01
        return self.inception(x)[0].flatten(1)


def load_fid_inception(weights_file, device="cpu"):
    """FIDInceptionFeatures with pytorch-fid's weights read from `weights_file` (pytorch-fid fetches them through
    torch.hub: the file is put where torch.hub looks, a `checkpoints/` folder of a private hub directory, so nothing
    is downloaded)."""
    import shutil
    import tempfile
    from pathlib import Path

    from pytorch_fid.inception import InceptionV3

    weights_file = Path(weights_file)
    if not weights_file.is_file():
        raise FileNotFoundError(f"FID Inception weights {weights_file} not found; see config/checkpoints.yaml "
                                "pytorch_fid_inception")
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:
        (Path(hub) / "checkpoints").mkdir()
        target = Path(hub) / "checkpoints" / FID_WEIGHTS_FILE
        try:
            target.symlink_to(weights_file.resolve())
        except OSError:
            shutil.copyfile(weights_file, target)
        torch.hub.set_dir(hub)
        try:
            inception = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True,
                                    use_fid_inception=True)
        finally:
            torch.hub.set_dir(previous)
    return FIDInceptionFeatures(inception).to(device).eval().requires_grad_(False)
