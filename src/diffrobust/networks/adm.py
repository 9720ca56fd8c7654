"""The ADM UNet of openai/improved-diffusion and openai/guided-diffusion ("Diffusion Models Beat GANs").

`ADMUNet` builds the same module tree as the official `UNetModel`, so that the published checkpoints
(`cifar10_uncond_50M_500K.pt`, `256x256_diffusion_uncond.pt`, ...) load with `load_state_dict(strict=True)`:
the state-dict keys, their order and their shapes are those of the official code, and the forward pass computes
the same function (GroupNorm in float32, legacy or new QKV head ordering, sinusoidal timestep embedding that
accepts real-valued timesteps).

improved-diffusion's UNet is the guided-diffusion UNet with `num_head_channels=-1`, `resblock_updown=False` and
`use_new_attention_order=False`: its attention block has the same parameters (`norm`, `qkv`, `proj_out`) and
splits the `qkv` channels into heads the way guided-diffusion's `QKVAttentionLegacy` does. One class therefore
serves both; the two builders differ only in which flags they accept and how they derive `channel_mult`.

`build_improved_diffusion_unet(flags)` and `build_guided_diffusion_unet(flags)` take the official scripts' flag
dicts (`model_and_diffusion_defaults()` style, diffusion-only flags allowed and ignored) and derive the UNet's
arguments exactly as the official `script_util.create_model` does.

The CPU fast path (`cpu_fast_path`, on by default): an ADMUNet in eval mode whose input is on the CPU computes the
same function by faster steps (README "Benchmarks"; outputs within ~1e-6 of the official steps'): 2-D activations
in channels-last memory format (`ADMUNet.channels_last`), where oneDNN's convolutions reach the matrix-multiply
peak and no activation changes layout; attention on [N, positions, channels] tokens, with qkv and proj_out
(kernel-1 convolutions in the state dict) as matrix products and the heads through `scaled_dot_product_attention`;
the scale-shift norm as one `addcmul`; SiLUs and residual additions in place whenever no autograd graph goes
through them. Gradients flow through it (attacks). In train mode, on other devices, or after
`set_cpu_fast_path(network, False)`, the network runs the official steps in the official layout, so that training
is bit-identical to the code before the fast path.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

# Both repositories condition class-conditional models on the 1000 ImageNet classes (script_util.NUM_CLASSES).
NUM_CLASSES = 1000

# Flags of each repository's model_and_diffusion_defaults(), with their defaults. A missing flag takes the default,
# as it does when the official scripts build their argparse parser from these dicts.
IMPROVED_DIFFUSION_DEFAULTS = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "attention_resolutions": "16,8",
    "dropout": 0.0,
    "learn_sigma": False,
    "sigma_small": False,
    "class_cond": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": True,
    "rescale_learned_sigmas": True,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
}
GUIDED_DIFFUSION_DEFAULTS = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
    # guided-diffusion's create_gaussian_diffusion() takes sigma_small although the defaults dict omits it.
    "sigma_small": False,
}

# channel_mult that each repository's create_model() picks from image_size when none is given.
IMPROVED_DIFFUSION_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
GUIDED_DIFFUSION_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# Type-checked network flags (a YAML "yes" or 2.5 would otherwise be taken silently). Diffusion-only flags are
# left to the diffusion code.
_BOOLEAN_FLAGS = ("learn_sigma", "class_cond", "use_checkpoint", "use_scale_shift_norm", "resblock_updown",
                  "use_fp16", "use_new_attention_order")
_INTEGER_FLAGS = ("image_size", "num_channels", "num_res_blocks", "num_heads", "num_heads_upsample",
                  "num_head_channels")


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (possibly non-integer) timesteps, [N] -> [N, dim] float32.

    The first half holds cos(t * f_i), the second sin(t * f_i), with f_i = max_period ** (-i / half) for
    i = 0..half-1; an odd `dim` gets a trailing zero column. This is the official layout (cos first), which the
    trained `time_embed` weights depend on.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups that normalises in float32 whatever the input dtype (as the official code)."""

    def __init__(self, channels):
        super().__init__(32, channels)

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def _fast(module, x):
    """Whether `module` (a block with a `cpu_fast_path` attribute) takes the CPU fast path for input `x`."""
    return module.cpu_fast_path and not module.training and x.device.type == "cpu"


def _silu(x):
    """SiLU, in place when no autograd graph goes through `x` (a fresh intermediate: nothing else holds it)."""
    return F.silu(x, inplace=not x.requires_grad)


def _add(x, y):
    """x + y, written into `x` (a fresh intermediate) when no autograd graph goes through either."""
    if x.requires_grad or y.requires_grad:
        return x + y
    return x.add_(y)


def conv_nd(dims, *args, **kwargs):
    """Conv1d/Conv2d/Conv3d by number of spatial dimensions."""
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    return convs[dims](*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """AvgPool1d/AvgPool2d/AvgPool3d by number of spatial dimensions."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    return pools[dims](*args, **kwargs)


def zero_parameters(module):
    """Zero a module's parameters in place (the official init of every layer that ends a residual branch)."""
    for parameter in module.parameters():
        parameter.detach().zero_()
    return module


class TimestepConditioned(nn.Module):
    """Marker base class: forward(x, emb) takes the timestep (+ label) embedding as a second input."""


class TimestepConditionedSequential(nn.Sequential, TimestepConditioned):
    """nn.Sequential that passes the embedding to the children that take one.

    A subclass of nn.Sequential so that children are keyed 0, 1, 2, ... as in the official state dict
    (`input_blocks.5.1.qkv.weight` is the attention block, second child of input block 5).
    """

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepConditioned) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then an optional 3x3 convolution (`conv`).

    For dims=3 only the inner two (spatial) dimensions are upsampled, as in the official code.
    """

    cpu_fast_path = True  # see the module docstring; set per network with set_cpu_fast_path

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        elif self.dims == 2 and _fast(self, x) and x.is_contiguous() and not x.requires_grad:
            # Fast path, standard layout: nearest 2x as one broadcast copy, bit for bit the values of
            # F.interpolate, whose CPU kernel for this layout is ~10x slower than for channels-last. Not under
            # autograd, where the backward's summation order could differ.
            n, c, h, w = x.shape
            x = x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution (`op`) or, without a convolution, 2x2 average pooling."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without a convolution cannot change the number of channels")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        return self.op(x)


class ResidualBlock(TimestepConditioned):
    """The ADM residual block: GroupNorm-SiLU-conv, embedding injection, GroupNorm-SiLU-dropout-conv, skip.

    The embedding is either added to the features (`use_scale_shift_norm=False`) or, as in the published models,
    split into a scale and a shift applied after the second GroupNorm: norm(h) * (1 + scale) + shift.
    `up`/`down` make it guided-diffusion's resampling block (`resblock_updown`): the features are resampled
    between the first activation and the first convolution, the skip path resampled likewise, both without
    parameters, so the keys are those of a plain block.
    """

    cpu_fast_path = True  # see the module docstring; set per network with set_cpu_fast_path

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_scale_shift_norm=False,
                 dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint

        self.in_layers = nn.Sequential(
            GroupNorm32(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.resamples = up or down
        if up:
            self.resample_features = Upsample(channels, False, dims)
            self.resample_skip = Upsample(channels, False, dims)
        elif down:
            self.resample_features = Downsample(channels, False, dims)
            self.resample_skip = Downsample(channels, False, dims)
        else:
            self.resample_features = self.resample_skip = nn.Identity()

        emb_out_channels = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_parameters(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        if self.use_checkpoint and torch.is_grad_enabled():
            return activation_checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        if _fast(self, x):
            return self._fast_forward(x, emb)
        if self.resamples:
            norm_and_activation, conv = self.in_layers[:-1], self.in_layers[-1]
            h = conv(self.resample_features(norm_and_activation(x)))
            x = self.resample_skip(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - emb_out.dim())))
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h

    def _fast_forward(self, x, emb):
        """`_forward`'s steps one by one (no Sequential calls): SiLUs and the skip addition in place when no
        autograd graph goes through them, the scale-shift as one addcmul."""
        norm, _, conv = self.in_layers
        h = _silu(norm(x))
        if self.resamples:
            h = self.resample_features(h)
            x = self.resample_skip(x)
        h = conv(h)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - emb_out.dim())))
        norm, _, dropout, conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = torch.addcmul(shift, norm(h), 1 + scale)  # norm(h) * (1 + scale) + shift
        else:
            h = norm(_add(h, emb_out))
        h = conv(dropout(_silu(h)))
        return _add(h, self.skip_connection(x))  # skip + h: a sum of two terms does not depend on their order


def qkv_attention(qkv, num_heads, new_order):
    """Multi-head dot-product attention over positions, [N, 3*H*C, T] -> [N, H*C, T].

    The two checkpoint families lay the 3*H*C channels of `qkv` out differently:
    - legacy order (improved-diffusion, and guided-diffusion unless use_new_attention_order): head-major,
      [q_0 k_0 v_0 | q_1 k_1 v_1 | ...];
    - new order: [q_0 q_1 ... | k_0 k_1 ... | v_0 v_1 ...].
    Queries and keys are each scaled by C**-0.25 before the product (the official fp16-friendly form), and the
    softmax is taken in float32.
    """
    batch, width, length = qkv.shape
    head_channels = width // (3 * num_heads)
    if new_order:
        q, k, v = (part.reshape(batch * num_heads, head_channels, length) for part in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(batch * num_heads, 3 * head_channels, length).split(head_channels, dim=1)
    scale = 1 / math.sqrt(math.sqrt(head_channels))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    attended = torch.einsum("bts,bcs->bct", weight, v)
    return attended.reshape(batch, -1, length)


def token_attention(qkv, num_heads, new_order):
    """`qkv_attention` on tokens: [N, T, 3*H*C] -> [N, T, H*C], the channel layouts as there.

    Each head's q, k and v are strided views of `qkv` (no copies), attended by `scaled_dot_product_attention`
    (on the CPU a fused kernel that never stores the T x T weights and accumulates the softmax in float32). Its
    scale C**-0.5 on q.k is the official C**-0.25 on q and on k, applied once.
    """
    batch, length, width = qkv.shape
    head_channels = width // (3 * num_heads)
    if new_order:
        per_head = qkv.view(batch, length, 3, num_heads, head_channels).permute(2, 0, 3, 1, 4)
    else:
        per_head = qkv.view(batch, length, num_heads, 3, head_channels).permute(3, 0, 2, 1, 4)
    q, k, v = per_head.unbind(0)  # each [N, H, T, C]
    attended = F.scaled_dot_product_attention(q, k, v)  # [N, H, T, C]
    return attended.transpose(1, 2).reshape(batch, length, num_heads * head_channels)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions with a residual connection (`norm`, `qkv`, `proj_out`).

    The number of heads is `num_heads`, or channels // num_head_channels when num_head_channels != -1
    (guided-diffusion's 256x256 model uses 64 channels per head).
    """

    cpu_fast_path = True  # see the module docstring; set per network with set_cpu_fast_path

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False,
                 use_new_attention_order=False):
        super().__init__()
        if num_head_channels == -1:
            if num_heads < 1 or channels % num_heads:
                raise ValueError(f"num_heads={num_heads} does not divide the {channels} attention channels")
            self.num_heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(
                    f"num_head_channels={num_head_channels} does not divide the {channels} attention channels"
                )
            self.num_heads = channels // num_head_channels
        self.channels = channels
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = GroupNorm32(channels)
        # 1-D convolutions with kernel 1 (not Linear) because the checkpoints store [out, in, 1] weights.
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_parameters(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        if self.use_checkpoint and torch.is_grad_enabled():
            return activation_checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x):
        if _fast(self, x):
            return self._fast_forward(x)
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.use_new_attention_order)
        h = self.proj_out(h)
        return (x + h).reshape(batch, channels, *spatial)

    def _fast_forward(self, x):
        """`_forward` on [N, T, C] tokens (a view of channels-last features, a copy of others): qkv and proj_out
        as matrix products over all positions at once, `token_attention` between them. Returns channels-last
        features for channels-last input, standard contiguous ones for others."""
        batch, channels, *spatial = x.shape

        def tokens(features):
            return features.movedim(1, -1).reshape(batch, -1, channels)

        qkv = F.linear(tokens(self.norm(x)), self.qkv.weight[:, :, 0], self.qkv.bias)
        h = token_attention(qkv, self.num_heads, self.use_new_attention_order)
        h = F.linear(h, self.proj_out.weight[:, :, 0], self.proj_out.bias)
        h = _add(h, tokens(x))  # the official x + h
        h = h.reshape(batch, *spatial, channels).movedim(-1, 1)  # channels-last strides
        return h if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else h.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# The UNet


class ADMUNet(nn.Module):
    """The ADM UNet, argument for argument the official `UNetModel` (guided-diffusion's superset).

    :param in_channels: channels of the input image.
    :param model_channels: base channel count (`num_channels` flag).
    :param out_channels: output channels (6 for learned-sigma models: eps and the variance interpolation).
    :param num_res_blocks: residual blocks per resolution level.
    :param attention_resolutions: downsample rates (1, 2, 4, ...) at which attention blocks are inserted.
    :param dropout: dropout probability inside residual blocks.
    :param channel_mult: channel multiplier per level (may hold 0.5, as guided-diffusion's 512x512 model).
    :param conv_resample: learned convolutions for up/downsampling (otherwise nearest/average pooling).
    :param dims: 1, 2 or 3 spatial dimensions.
    :param num_classes: class-conditional with this many classes (adds `label_emb`), or None.
    :param use_checkpoint: activation checkpointing of residual and attention blocks (saves memory when
        differentiating through the network; the result is unchanged).
    :param use_fp16: accepted for compatibility and recorded; the network always computes in float32.
    :param num_heads: attention heads, when num_head_channels is -1.
    :param num_head_channels: channels per attention head (overrides num_heads), or -1.
    :param num_heads_upsample: heads in the decoder's attention blocks; -1 means num_heads.
    :param use_scale_shift_norm: FiLM-style conditioning of the residual blocks on the embedding.
    :param resblock_updown: resample with parameter-free residual blocks instead of Downsample/Upsample.
    :param use_new_attention_order: q/k/v-major qkv layout instead of the legacy head-major one.
    :param image_size: recorded only (guided-diffusion's UNetModel takes it but does not use it).
    :param patch_size: not in the official code (1 = the official network): the UNet works on p x p pixel
        patches stacked into channels (pixel-unshuffle in, pixel-shuffle out), so every level runs at 1/p of the
        image resolution. It cuts the cost of the mini preset's CPU training about 3x; in_channels, out_channels
        and image_size still describe the image.

    `cpu_fast_path` (not an argument, True unless set with `set_cpu_fast_path`): in eval mode on the CPU, the fast
    steps of the module docstring; the state dict, the parameters' layout and the function are those of the
    official network either way. Inputs and outputs are standard contiguous tensors. Attribute `channels_last`
    (set from the widths; may be changed): whether the fast path keeps 2-D activations channels-last.
    """

    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None,
                 use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False,
                 image_size=None, patch_size=1):
        super().__init__()
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.dims = dims
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.use_new_attention_order = use_new_attention_order
        self.patch_size = patch_size
        # Fast path's layout: channels-last where every GroupNorm group has at least 4 channels; with fewer (the
        # mini preset's 32-channel UNet), PyTorch's channels-last GroupNorm costs more than the convolutions gain.
        self.channels_last = dims == 2 and int(min(self.channel_mult) * model_channels) // 32 >= 4
        patch_pixels = patch_size * patch_size

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def residual_block(channels, out_channels=None, up=False, down=False):
            return ResidualBlock(channels, time_embed_dim, dropout, out_channels=out_channels,
                                 use_scale_shift_norm=use_scale_shift_norm, dims=dims,
                                 use_checkpoint=use_checkpoint, up=up, down=down)

        def attention_block(channels, heads):
            return AttentionBlock(channels, num_heads=heads, num_head_channels=num_head_channels,
                                  use_checkpoint=use_checkpoint,
                                  use_new_attention_order=use_new_attention_order)

        # Encoder. `skip_channels` records each block's output width, which the decoder pops in reverse.
        ch = input_ch = int(self.channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepConditionedSequential(conv_nd(dims, in_channels * patch_pixels, ch, 3, padding=1))]
        )
        skip_channels = [ch]
        downsample_rate = 1
        last_level = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers = [residual_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if downsample_rate in self.attention_resolutions:
                    layers.append(attention_block(ch, num_heads))
                self.input_blocks.append(TimestepConditionedSequential(*layers))
                skip_channels.append(ch)
            if level != last_level:
                if resblock_updown:
                    resample = residual_block(ch, ch, down=True)
                else:
                    resample = Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                self.input_blocks.append(TimestepConditionedSequential(resample))
                skip_channels.append(ch)
                downsample_rate *= 2

        self.middle_block = TimestepConditionedSequential(
            residual_block(ch),
            attention_block(ch, num_heads),
            residual_block(ch),
        )

        # Decoder: num_res_blocks + 1 blocks per level, each taking the matching encoder output concatenated.
        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [residual_block(ch + skip_channels.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if downsample_rate in self.attention_resolutions:
                    layers.append(attention_block(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(residual_block(ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    downsample_rate //= 2
                self.output_blocks.append(TimestepConditionedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch),
            nn.SiLU(),
            zero_parameters(conv_nd(dims, input_ch, out_channels * patch_pixels, 3, padding=1)),
        )

    def forward(self, x, timesteps, y=None):
        """Predict from `x` [N, C, ...] at `timesteps` ([N] or a scalar, real values allowed), labels `y` [N].

        Returns [N, out_channels, ...]; for learned-sigma models channels [:C] are eps and [C:] the variance
        interpolation values. The timesteps are used as given: rescaling to 0..1000 (rescale_timesteps) is the
        diffusion wrapper's job, as in the official code.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass labels y if and only if the model is class-conditional "
                             f"(num_classes={self.num_classes})")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        skips = []
        fast = _fast(self, x)
        h = x.type(self.time_embed[0].weight.dtype)
        if self.patch_size > 1:
            h = F.pixel_unshuffle(h, self.patch_size)
        if fast and self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)  # the blocks keep this layout
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        if fast:
            norm, _, conv = self.out
            out = conv(_silu(norm(h.type(x.dtype))))
        else:
            out = self.out(h.type(x.dtype))
        if self.patch_size > 1:
            # output channel c*p*p + k is pixel k of the patch of image channel c: heads and the learned-sigma
            # halves stay in the image channel order
            out = F.pixel_shuffle(out, self.patch_size)
        return out.contiguous() if fast else out

    @property
    def cpu_fast_path(self):
        return all(module.cpu_fast_path for module in self.modules()
                   if isinstance(module, (ResidualBlock, AttentionBlock, Upsample)))


def set_cpu_fast_path(module, enabled):
    """Switch the CPU fast path (module docstring) of every ADMUNet in `module` (a network or a wrapper of one) on
    or off; returns `module`. Off: the official steps, bit-identical to the code before the fast path."""
    for block in module.modules():
        if isinstance(block, (ResidualBlock, AttentionBlock, Upsample)):
            block.cpu_fast_path = bool(enabled)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Builders from the official flag dicts


def _complete_flags(flags, defaults, repository):
    """Fill missing flags with the repository's defaults; reject unknown flags and wrongly typed values."""
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown {repository} flag(s) {', '.join(map(repr, unknown))} "
            f"(known flags: {', '.join(sorted(defaults))})"
        )
    complete = {**defaults, **flags}
    for name in _BOOLEAN_FLAGS:
        if name in complete and not isinstance(complete[name], bool):
            raise ValueError(f"flag {name!r} must be true or false, got {complete[name]!r}")
    for name in _INTEGER_FLAGS:
        value = complete.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"flag {name!r} must be an integer, got {value!r}")
    if not isinstance(complete["dropout"], (int, float)) or not 0 <= complete["dropout"] < 1:
        raise ValueError(f"flag 'dropout' must be a probability in [0, 1), got {complete['dropout']!r}")
    return complete


def _parse_int_list(flags, name):
    """Comma string of integers (or a list of them) -> tuple of ints, with an error naming the flag."""
    value = flags[name]
    try:
        if isinstance(value, str):
            return tuple(int(part) for part in value.split(",") if part.strip())
        return tuple(int(part) for part in value)
    except (TypeError, ValueError):
        raise ValueError(f"flag {name!r} must be a comma-separated list of integers, got {value!r}") from None


def _channel_mult(flags, defaults_by_size):
    """The per-level channel multipliers: the flag if given, else the official default for image_size."""
    given = flags.get("channel_mult", "")
    if given not in ("", None, ()):
        return _parse_int_list(flags, "channel_mult")
    image_size = flags["image_size"]
    if image_size not in defaults_by_size:
        raise ValueError(
            f"flag 'image_size'={image_size} has no default channel_mult "
            f"(sizes with one: {', '.join(map(str, sorted(defaults_by_size)))})"
        )
    return defaults_by_size[image_size]


def _attention_downsample_rates(flags, num_levels):
    """attention_resolutions (image resolutions, "16,8") -> downsample rates (image_size // resolution).

    The official code divides without checking; a resolution that no level of the UNet has would silently
    give a model without those attention blocks, so it is rejected here.
    """
    image_size = flags["image_size"]
    rates = []
    for resolution in _parse_int_list(flags, "attention_resolutions"):
        rate = image_size // resolution if resolution > 0 else 0
        if resolution <= 0 or image_size % resolution or rate not in {2**level for level in range(num_levels)}:
            raise ValueError(
                f"flag 'attention_resolutions': {resolution} is not the resolution of a UNet level "
                f"(image_size {image_size}, {num_levels} levels)"
            )
        rates.append(rate)
    return tuple(rates)


def build_improved_diffusion_unet(flags):
    """openai/improved-diffusion `create_model(**flags)`: ADMUNet from a model_and_diffusion_defaults()-style dict.

    Diffusion-only flags (diffusion_steps, noise_schedule, ...) are accepted and ignored. improved-diffusion has no
    channel_mult flag: it is derived from image_size (32, 64 or 256).
    """
    flags = _complete_flags(dict(flags), IMPROVED_DIFFUSION_DEFAULTS, "improved-diffusion")
    channel_mult = _channel_mult(flags, IMPROVED_DIFFUSION_CHANNEL_MULT)
    return ADMUNet(
        image_size=flags["image_size"],
        in_channels=3,
        model_channels=flags["num_channels"],
        out_channels=6 if flags["learn_sigma"] else 3,
        num_res_blocks=flags["num_res_blocks"],
        attention_resolutions=_attention_downsample_rates(flags, len(channel_mult)),
        dropout=flags["dropout"],
        channel_mult=channel_mult,
        num_classes=NUM_CLASSES if flags["class_cond"] else None,
        use_checkpoint=flags["use_checkpoint"],
        num_heads=flags["num_heads"],
        num_heads_upsample=flags["num_heads_upsample"],
        use_scale_shift_norm=flags["use_scale_shift_norm"],
    )


def build_guided_diffusion_unet(flags):
    """openai/guided-diffusion `create_model(**flags)`: ADMUNet from a model_and_diffusion_defaults()-style dict.

    Diffusion-only flags are accepted and ignored. channel_mult "" takes the official default for image_size
    (64, 128, 256 or 512); otherwise it is a comma string such as "1,2,2,2".
    """
    flags = _complete_flags(dict(flags), GUIDED_DIFFUSION_DEFAULTS, "guided-diffusion")
    channel_mult = _channel_mult(flags, GUIDED_DIFFUSION_CHANNEL_MULT)
    return ADMUNet(
        image_size=flags["image_size"],
        in_channels=3,
        model_channels=flags["num_channels"],
        out_channels=6 if flags["learn_sigma"] else 3,
        num_res_blocks=flags["num_res_blocks"],
        attention_resolutions=_attention_downsample_rates(flags, len(channel_mult)),
        dropout=flags["dropout"],
        channel_mult=channel_mult,
        num_classes=NUM_CLASSES if flags["class_cond"] else None,
        use_checkpoint=flags["use_checkpoint"],
        use_fp16=flags["use_fp16"],
        num_heads=flags["num_heads"],
        num_head_channels=flags["num_head_channels"],
        num_heads_upsample=flags["num_heads_upsample"],
        use_scale_shift_norm=flags["use_scale_shift_norm"],
        resblock_updown=flags["resblock_updown"],
        use_new_attention_order=flags["use_new_attention_order"],
    )
