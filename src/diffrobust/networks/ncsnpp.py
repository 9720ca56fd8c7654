"""score_sde's NCSN++ (Song et al., ICLR'21): the score network of DiffPure's CIFAR-10 purifier.

DiffPure (`runners/diffpure_sde.py`) purifies CIFAR-10 with score_sde's `vp/cifar10_ddpmpp_deep_continuous`
checkpoint: an `NCSNpp` network (DiffPure's vendored `score_sde/models/ncsnpp.py`, config `configs/cifar10.yml`)
with BigGAN-style residual blocks, DDPM attention and a sinusoidal time embedding. The modules below rebuild that
network so that the published `checkpoint_8.pth` loads unchanged:

- the official network keeps every layer in ONE flat `nn.ModuleList`, `all_modules`, and walks it with a running
  index in `forward`; the checkpoint's keys are therefore positional (`all_modules.17.Conv_2.weight`), and the order
  in which layers are appended IS the file format. `NCSNpp` appends them in the official order and records, per
  layer, how the forward pass feeds it (`_Step`), instead of re-deriving the walk with an index;
- each layer has the official attribute names (`GroupNorm_0`, `Conv_0`, `Dense_0`, `NIN_0`, ...; `NIN` stores its
  1x1 weight as `W` with shape (in, out) and its bias as `b`), so `state_dict()` keys, shapes and order, and
  `parameters()` order (which the checkpoint's EMA list follows), are the official ones;
- the arithmetic follows the official operations (same normalisations, same 1/sqrt(2) skip rescaling, the time
  embedding as [sin | cos]), so outputs agree with the official network to float32 rounding.

Conventions (as in score_sde for continuous VP training): `net(x, time_cond)` takes images x in [-1, 1]
(`centered: true`; otherwise [0, 1], mapped to [-1, 1] first) and a time label per sample, t·(N - 1) = t·999 for
SDE time t in [1e-5, 1] (not floored); the output is the noise prediction eps, from which the score is
-eps / std(t) (`score_sde/models/utils.py:get_score_fn`).

Config (`build_score_sde_ncsnpp`): ONE flat dict with the official YAML names: the keys of the YAML's `model:` block
plus `image_size`, `num_channels` and `centered` from its `data:` block (config/checkpoints.yaml uses this form).
`flat_config` turns DiffPure's nested YAML (as a dict) into it. Missing keys take DiffPure's `configs/cifar10.yml`
values (`CIFAR10_DDPMPP_DEEP_CONTINUOUS`). Only the code path DiffPure's CIFAR-10 network takes is implemented
(BigGAN blocks without FIR filters, no progressive growing, positional embedding); any other value of those keys is
refused with a ValueError naming the key. The official `op/` package (CUDA kernels compiled at import, for FIR
resampling and fused activations) is not needed: `fir: false` never calls it.
"""

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# DiffPure's configs/cifar10.yml (= score_sde configs/vp/cifar10_ddpmpp_deep_continuous.py), flat: the data keys
# the network reads, then the model block in the YAML's order.
CIFAR10_DDPMPP_DEEP_CONTINUOUS = {
    "image_size": 32, "num_channels": 3, "centered": True,
    "sigma_min": 0.01, "sigma_max": 50, "num_scales": 1000, "beta_min": 0.1, "beta_max": 20.0, "dropout": 0.1,
    "name": "ncsnpp", "scale_by_sigma": False, "ema_rate": 0.9999, "normalization": "GroupNorm",
    "nonlinearity": "swish", "nf": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 8, "attn_resolutions": [16],
    "resamp_with_conv": True, "conditional": True, "fir": False, "fir_kernel": [1, 3, 3, 1], "skip_rescale": True,
    "resblock_type": "biggan", "progressive": "none", "progressive_input": "none", "progressive_combine": "sum",
    "attention_type": "ddpm", "init_scale": 0.0, "embedding_type": "positional", "fourier_scale": 16,
    "conv_size": 3,
}
DATA_KEYS = ("image_size", "num_channels", "centered")

# score_sde's layers.get_act names -> activation.
ACTIVATIONS = {"swish": F.silu, "elu": F.elu, "relu": F.relu, "lrelu": lambda x: F.leaky_relu(x, 0.2)}

# Keys whose other official values select code this module does not implement: key -> (allowed values, why).
# The official code lower-cases these strings before comparing, and so does the builder.
IMPLEMENTED_CHOICES = {
    "name": (("ncsnpp",), "only score_sde's NCSN++ is implemented"),
    "fir": ((False,), "FIR up/down-sampling (the official op/ CUDA kernels) is not implemented"),
    "resblock_type": (("biggan",), "only BigGAN residual blocks are implemented (DDPM++ 'ddpm' blocks are not)"),
    "progressive": (("none",), "progressive output growing is not implemented"),
    "progressive_input": (("none",), "progressive input growing is not implemented"),
    "progressive_combine": (("sum", "cat"), "the combiner is unused without progressive input growing"),
    "embedding_type": (("positional",), "Gaussian Fourier time embeddings (VE models) are not implemented"),
    "nonlinearity": (tuple(ACTIVATIONS), "score_sde's activations"),
    # The official NCSNpp ignores the next three (it always builds GroupNorm, DDPM attention and 3x3 convolutions);
    # another value means a config written for other code, so it is refused rather than silently ignored.
    "normalization": (("groupnorm",), "NCSN++ always uses GroupNorm"),
    "attention_type": (("ddpm",), "NCSN++ always uses DDPM attention"),
    "conv_size": ((3,), "NCSN++ always uses 3x3 convolutions"),
}
_LOWERCASED = {"name", "resblock_type", "progressive", "progressive_input", "progressive_combine", "embedding_type",
               "nonlinearity", "normalization", "attention_type"}
_BOOLEAN_KEYS = ("centered", "scale_by_sigma", "resamp_with_conv", "conditional", "fir", "skip_rescale")
_POSITIVE_INT_KEYS = ("image_size", "num_channels", "nf", "num_scales")


# --------------------------------------------------------------------------------------------------------------
# Initialisation: DDPM's variance scaling (fan_avg, uniform). Only matters when training from scratch; loading a
# checkpoint overwrites it.

def ddpm_init_(weight, scale=1.0):
    """Fill `weight` in place as score_sde's `default_init(scale)` draws it (scale 0 means 1e-10, as there).

    Fans are taken with axis 1 as input and axis 0 as output, also for NIN's (in, out)-shaped W (fan_avg is
    symmetric, so that does not matter)."""
    scale = 1e-10 if scale == 0 else scale
    receptive = weight[0, 0].numel() if weight.dim() > 2 else 1
    fan_avg = (weight.shape[0] + weight.shape[1]) * receptive / 2
    bound = math.sqrt(3 * scale / fan_avg)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def conv2d(in_ch, out_ch, kernel=3, init_scale=1.0):
    """score_sde's ddpm_conv3x3 / ddpm_conv1x1: a 'same'-padded convolution with DDPM init and zero bias."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=kernel, padding=kernel // 2)
    ddpm_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def dense(in_features, out_features):
    """A linear layer with DDPM init and zero bias (the time-embedding MLP and each block's Dense_0)."""
    linear = nn.Linear(in_features, out_features)
    ddpm_init_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def group_norm(channels):
    """score_sde's GroupNorm: min(channels // 4, 32) groups, eps 1e-6."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def timestep_embedding(timesteps, dim, max_positions=10000):
    """DDPM's sinusoidal embedding of (real-valued) time labels: [sin | cos] at frequencies 1 .. 1/max_positions
    (geometric, `dim // 2` of them, endpoint included), zero-padded to an odd `dim`. [N] -> [N, dim] float32."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device)
                            * -(math.log(max_positions) / (half - 1)))
    angles = timesteps.float()[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(embedding, (0, dim % 2))


def _rescaled_sum(x, h, skip_rescale):
    """The residual sum; NCSN++ divides it by sqrt(2) (`skip_rescale`) so that activations keep their scale."""
    return (x + h) / math.sqrt(2.0) if skip_rescale else x + h


# --------------------------------------------------------------------------------------------------------------
# Layers (official attribute names: they are the checkpoint's keys)


class NIN(nn.Module):
    """A 1x1 "network in network" layer over channels, stored as the official `W` (in, out) and `b` (out)."""

    def __init__(self, in_dim, num_units, init_scale=0.1):
        super().__init__()
        self.W = nn.Parameter(ddpm_init_(torch.empty(in_dim, num_units), init_scale))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x):
        return torch.einsum("bchw,cd->bdhw", x, self.W) + self.b[None, :, None, None]


class AttentionBlock(nn.Module):
    """DDPM's single-head self-attention over all positions (score_sde's AttnBlockpp), residual, rescaled by
    1/sqrt(2) with skip_rescale. The output projection NIN_3 starts at init_scale (0: the block starts as identity)."""

    def __init__(self, channels, skip_rescale=True, init_scale=0.0):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x):
        batch, channels, height, width = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = (nin(h).reshape(batch, channels, height * width) for nin in (self.NIN_0, self.NIN_1, self.NIN_2))
        weights = F.softmax(torch.einsum("bcq,bck->bqk", q, k) * (int(channels) ** -0.5), dim=-1)
        h = torch.einsum("bqk,bck->bcq", weights, v).reshape(batch, channels, height, width)
        return _rescaled_sum(x, self.NIN_3(h), self.skip_rescale)


class ResnetBlockBigGAN(nn.Module):
    """score_sde's ResnetBlockBigGANpp without FIR filters: GroupNorm-act, optional 2x nearest up / 2x2 mean down
    (applied to the skip path as well), conv, time-embedding bias, GroupNorm-act, dropout, conv; a 1x1 `Conv_2` on
    the skip path whenever channels or resolution change.

    `Dense_0` always exists (the official block receives the embedding width also for unconditional networks) and is
    used only when an embedding is passed."""

    def __init__(self, in_ch, out_ch=None, *, temb_dim, activation, up=False, down=False, dropout=0.1,
                 skip_rescale=True, init_scale=0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv2d(in_ch, out_ch)
        self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv2d(out_ch, out_ch, init_scale=init_scale)
        self.Conv_2 = conv2d(in_ch, out_ch, kernel=1) if in_ch != out_ch or up or down else None
        self.activation, self.up, self.down, self.skip_rescale = activation, up, down, skip_rescale

    def _resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x, temb=None):
        h = self._resample(self.activation(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.activation(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.activation(self.GroupNorm_1(h))))
        if self.Conv_2 is not None:
            x = self.Conv_2(x)
        return _rescaled_sum(x, h, self.skip_rescale)


# --------------------------------------------------------------------------------------------------------------
# The network


@dataclass(frozen=True)
class _Step:
    """How the forward pass feeds one image-path layer of `all_modules` (the official walk, made explicit)."""

    timed: bool = False  # the layer takes the time embedding (residual blocks)
    concat_skip: bool = False  # concatenate the newest saved encoder activation onto the input (decoder blocks)
    save_skip: bool = False  # save the output for the decoder (the end of each encoder stage)
    activate: bool = False  # apply the nonlinearity to the output (the output GroupNorm)


class _Layout:
    """The layers in checkpoint order with their `_Step`s, as NCSNpp's constructor appends them."""

    def __init__(self):
        self.modules, self.steps = [], []

    def add(self, module, **step):
        self.modules.append(module)
        self.steps.append(_Step(**step))

    def save_last(self):
        """The previous layer ends an encoder stage (after its attention block, when there is one)."""
        self.steps[-1] = replace(self.steps[-1], save_skip=True)


class NCSNpp(nn.Module):
    """score_sde's NCSNpp for BigGAN blocks, no FIR, no progressive growing, positional time embedding.

    `forward(x, time_cond)`: x [N, num_channels, image_size, image_size]; time_cond [N] (or a scalar) time labels,
    t·999 for continuous VP. Returns [N, num_channels, H, W]: eps for VP models; divided by sigmas[time_cond] when
    `scale_by_sigma` (discrete SMLD models, where the label is a noise-level index).

    The `sigmas` buffer (SMLD noise levels, geometric from sigma_max to sigma_min, float64) is part of the official
    state dict; a VP model never uses it.
    """

    def __init__(self, *, image_size=32, num_channels=3, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=8,
                 attn_resolutions=(16,), dropout=0.1, conditional=True, centered=True, skip_rescale=True,
                 nonlinearity="swish", scale_by_sigma=False, init_scale=0.0, sigma_min=0.01, sigma_max=50,
                 num_scales=1000):
        super().__init__()
        self.register_buffer("sigmas", torch.tensor(
            np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))))
        self.nf, self.conditional, self.centered = nf, conditional, centered
        self.scale_by_sigma = scale_by_sigma
        self.activation = ACTIVATIONS[nonlinearity]
        self.image_size, self.num_channels = image_size, num_channels

        # The time-embedding MLP comes first in all_modules (absent for an unconditional network).
        embedding = [dense(nf, 4 * nf), dense(4 * nf, 4 * nf)] if conditional else []
        layout = _Layout()
        block_arguments = dict(temb_dim=4 * nf, activation=self.activation, dropout=dropout,
                               skip_rescale=skip_rescale, init_scale=init_scale)

        def block(in_ch, out_ch=None, **resample):
            return ResnetBlockBigGAN(in_ch, out_ch, **block_arguments, **resample)

        def attention(channels):
            return AttentionBlock(channels, skip_rescale=skip_rescale, init_scale=init_scale)

        resolutions = [image_size // 2 ** level for level in range(len(ch_mult))]
        skip_channels = self._add_encoder(layout, block, attention, ch_mult, num_res_blocks, attn_resolutions,
                                          resolutions)
        channels = skip_channels[-1]
        layout.add(block(channels), timed=True)
        layout.add(attention(channels))
        layout.add(block(channels), timed=True)
        channels = self._add_decoder(layout, block, attention, ch_mult, num_res_blocks, attn_resolutions,
                                     resolutions, skip_channels)
        layout.add(group_norm(channels), activate=True)
        layout.add(conv2d(channels, num_channels, init_scale=init_scale))

        self.all_modules = nn.ModuleList(embedding + layout.modules)
        self._first_image_layer = len(embedding)
        self._steps = tuple(layout.steps)

    def _add_encoder(self, layout, block, attention, ch_mult, num_res_blocks, attn_resolutions, resolutions):
        """Input conv, then per level num_res_blocks blocks (+ attention) and a downsampling block (except at the
        last level); every stage's output is saved for the decoder. Returns the saved channel counts in order."""
        nf = self.nf
        layout.add(conv2d(self.num_channels, nf), save_skip=True)
        skip_channels, channels = [nf], nf
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layout.add(block(channels, nf * mult), timed=True)
                channels = nf * mult
                if resolutions[level] in attn_resolutions:
                    layout.add(attention(channels))
                layout.save_last()
                skip_channels.append(channels)
            if level != len(ch_mult) - 1:
                layout.add(block(channels, down=True), timed=True, save_skip=True)
                skip_channels.append(channels)
        return skip_channels

    def _add_decoder(self, layout, block, attention, ch_mult, num_res_blocks, attn_resolutions, resolutions,
                     skip_channels):
        """Per level from the coarsest: num_res_blocks + 1 blocks, each on [h, newest saved activation], then
        attention at the attention resolutions and an upsampling block (except at the finest level). Returns the
        output channels."""
        skip_channels, channels = list(skip_channels), skip_channels[-1]
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                out_channels = self.nf * ch_mult[level]
                layout.add(block(channels + skip_channels.pop(), out_channels), timed=True, concat_skip=True)
                channels = out_channels
            if resolutions[level] in attn_resolutions:
                layout.add(attention(channels))
            if level != 0:
                layout.add(block(channels, up=True), timed=True)
        assert not skip_channels, "every saved encoder activation is consumed"
        return channels

    def time_embedding(self, time_cond):
        """The embedding every residual block receives (None for an unconditional network)."""
        if not self.conditional:
            return None
        temb = self.all_modules[0](timestep_embedding(time_cond, self.nf))
        return self.all_modules[1](self.activation(temb))

    def forward(self, x, time_cond):
        time_cond = torch.as_tensor(time_cond, device=x.device).reshape(-1).expand(x.shape[0])
        temb = self.time_embedding(time_cond)
        h = x if self.centered else 2 * x - 1.0
        saved = []
        for layer, step in zip(self.all_modules[self._first_image_layer:], self._steps):
            if step.concat_skip:
                h = torch.cat([h, saved.pop()], dim=1)
            h = layer(h, temb) if step.timed else layer(h)
            if step.activate:
                h = self.activation(h)
            if step.save_skip:
                saved.append(h)
        if self.scale_by_sigma:
            h = h / self.sigmas[time_cond.long()].to(h.dtype).reshape(-1, 1, 1, 1)
        return h


# --------------------------------------------------------------------------------------------------------------
# Builder from the official config


def flat_config(yaml_config):
    """The builder's flat config from DiffPure's / score_sde's nested YAML as a dict ({'data': ..., 'model': ...,
    'training': ...}): the model block plus data.image_size, data.num_channels, data.centered.

    The network's time input is t·999 only for continuous VP training (training.sde 'vpsde', training.continuous
    true), the convention the `score_sde_ncsnpp` family declares; another training block is refused."""
    training = yaml_config.get("training", {})
    if training.get("sde", "vpsde") != "vpsde" or not training.get("continuous", True):
        raise ValueError(f"score_sde_ncsnpp: training.sde {training.get('sde')!r} / training.continuous "
                         f"{training.get('continuous')!r}: only continuous VP models (t·999 time labels) are supported")
    data = yaml_config.get("data", {})
    return {**{key: data[key] for key in DATA_KEYS if key in data}, **yaml_config.get("model", {})}


def _check_choices(config):
    for key, (allowed, why) in IMPLEMENTED_CHOICES.items():
        value = config[key]
        if key in _LOWERCASED and isinstance(value, str):
            value = value.lower()
        if isinstance(value, bool) != isinstance(allowed[0], bool) or value not in allowed:
            raise ValueError(f"score_sde_ncsnpp config key {key!r} = {config[key]!r} is not implemented "
                             f"(allowed: {', '.join(map(repr, allowed))}): {why}")


def _positive_ints(values):
    return isinstance(values, (list, tuple)) and all(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1 for value in values)


def _check_types(config):
    for key in _BOOLEAN_KEYS:
        if not isinstance(config[key], bool):
            raise ValueError(f"score_sde_ncsnpp config key {key!r} must be true or false, got {config[key]!r}")
    for key in _POSITIVE_INT_KEYS:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"score_sde_ncsnpp config key {key!r} must be a positive integer, got {value!r}")
    num_res_blocks = config["num_res_blocks"]
    if isinstance(num_res_blocks, bool) or not isinstance(num_res_blocks, int) or num_res_blocks < 0:
        raise ValueError(f"score_sde_ncsnpp config key 'num_res_blocks' must be an integer >= 0, "
                         f"got {num_res_blocks!r}")
    for key, least in (("ch_mult", 1), ("attn_resolutions", 0)):
        values = config[key]
        if not _positive_ints(values) or len(values) < least:
            raise ValueError(f"score_sde_ncsnpp config key {key!r} must be a list of {'at least one ' if least else ''}"
                             f"positive integers, got {values!r}")
    if config["image_size"] % 2 ** (len(config["ch_mult"]) - 1):
        raise ValueError(f"score_sde_ncsnpp config key 'image_size' ({config['image_size']}) must be divisible by "
                         f"2**(len(ch_mult) - 1) = {2 ** (len(config['ch_mult']) - 1)}")
    dropout = config["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"score_sde_ncsnpp config key 'dropout' must be in [0, 1), got {config['dropout']!r}")


def validated_config(config):
    """The complete flat config: DiffPure's CIFAR-10 values under `config`, unknown keys and unimplemented or
    malformed values refused with a ValueError naming the key."""
    unknown = sorted(set(config) - set(CIFAR10_DDPMPP_DEEP_CONTINUOUS))
    if unknown:
        hint = " (pass the flat form: networks.ncsnpp.flat_config turns the nested YAML into it)" \
            if set(unknown) & {"data", "model", "training"} else ""
        raise ValueError(f"unknown score_sde_ncsnpp config keys: {', '.join(unknown)}{hint}; known: "
                         f"{', '.join(CIFAR10_DDPMPP_DEEP_CONTINUOUS)}")
    config = {**CIFAR10_DDPMPP_DEEP_CONTINUOUS, **config}
    _check_types(config)
    _check_choices(config)
    return config


def build_score_sde_ncsnpp(config):
    """score_sde's NCSNpp from a flat config with the official YAML names (see the module docstring); DiffPure's
    CIFAR-10 network (106,632,579 parameters) for an empty config. Keys the network does not read (beta_min,
    beta_max: the SDE; ema_rate: training; fir_kernel, fourier_scale, resamp_with_conv, progressive_combine: unused
    on this code path, as in the official code) are accepted and checked only for their type where it matters."""
    config = validated_config(config)
    return NCSNpp(image_size=config["image_size"], num_channels=config["num_channels"], nf=config["nf"],
                  ch_mult=tuple(config["ch_mult"]), num_res_blocks=config["num_res_blocks"],
                  attn_resolutions=tuple(config["attn_resolutions"]), dropout=config["dropout"],
                  conditional=config["conditional"], centered=config["centered"],
                  skip_rescale=config["skip_rescale"], nonlinearity=config["nonlinearity"].lower(),
                  scale_by_sigma=config["scale_by_sigma"], init_scale=config["init_scale"],
                  sigma_min=config["sigma_min"], sigma_max=config["sigma_max"], num_scales=config["num_scales"])
