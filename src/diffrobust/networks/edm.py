"""NVlabs/edm networks: `SongUNet` (DDPM++ / NCSN++) behind VP or EDM preconditioning, and a safe pickle reader.

The modules below reproduce NVlabs/edm `training/networks.py` closely enough that the published checkpoints
(`edm-cifar10-32x32-{cond,uncond}-vp.pkl`) load unchanged: every submodule has the attribute name, registration
order and tensor shapes of the official code, so `state_dict()` keys match theirs (`model.enc.32x32_conv.weight`, ...).
The arithmetic follows theirs operation by operation (same reshapes, same order of additions), so outputs agree with
the official network to float32 rounding.

Which wrapper: the `-vp` of the released file names is the DDPM++ *architecture* (train.py `--arch=ddpmpp`), not
the preconditioning. Those files were trained with train.py's default `--precond=edm`, so they are
`EDMPrecond(SongUNet)`; only `baseline/baseline-cifar10-32x32-uncond-vp.pkl` (converted from score_sde) is
`VPPrecond`. The two wrappers have identical state-dict keys but different denoisers (c_skip, c_out, c_in,
c_noise), so the wrapper is a config key of its own, `precond` ('edm' | 'vp', train.py's flag), and the registry
loader checks it against the class that the pickle names.

Conventions (as in EDM): `x` is an image in the data space [-1, 1] plus Gaussian noise of standard deviation
`sigma`; `net(x, sigma, class_labels)` returns the denoised estimate D(x; sigma, y) in that same space, and
`net.noise_prediction(x, sigma, class_labels)` the noise estimate (x - D(x; sigma, y)) / sigma.
`class_labels` are one-hot rows of width `label_dim`.

`MultiheadEDMPrecond` (family `edm_multihead_songunet`) is this project's, not NVlabs': EDMPrecond around a SongUNet
without label input whose output holds one image per class, RDC's multi-head idea on EDM's network; its forward and
noise prediction return [N, heads, C, H, W]. `training.distill_edm_multihead` makes one from a conditional model.

The published networks are pickles made with NVlabs' `torch_utils.persistence`, which embeds the Python source of
the network classes and executes it on load. `read_edm_network_pickle` reads such a file with a restricted
unpickler that never runs that source; it only rebuilds tensors and returns the network's class name, constructor
arguments and state dict.
"""

import _compat_pickle
import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# --------------------------------------------------------------------------------------------------------------
# Layers. EDM writes its own Linear/Conv2d/GroupNorm instead of using torch.nn's, and the checkpoints depend on
# that: the resampling filter is a buffer of the convolution (`conv0.resample_filter`), and a convolution may have
# no weight at all (kernel 0: pure up/down-sampling).


def initial_weight(shape, mode, fan_in, fan_out):
    """A random tensor of `shape` drawn as EDM's `weight_init` draws it (only matters when training from scratch)."""
    if mode == "xavier_uniform":
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown weight initialisation mode {mode!r}")


class Linear(nn.Module):
    """Fully connected layer; the weight is cast to the input's dtype so that an fp16 forward keeps fp32 weights."""

    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(initial_weight([out_features, in_features], **fans) * init_weight)
        bias_value = nn.Parameter(initial_weight([out_features], **fans) * init_bias) if bias else None
        self.register_parameter("bias", bias_value)

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x


def resample_filter_2d(taps):
    """The separable FIR filter of EDM's up/down-sampling, normalised to sum 1, shaped (1, 1, k, k)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square()).reshape(1, 1, len(taps), len(taps))


class Conv2d(nn.Module):
    """Convolution with optional 2x up- or down-sampling by a FIR filter.

    `kernel=0` gives a weightless layer that only resamples. `fused_resample` applies the filter after the
    convolution (down) or before it (up) with combined padding, as EDM's NCSN++ residual encoder does; the result
    differs from the unfused order at the borders, so the flag must match the checkpoint's.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 fused_resample=False, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        if up and down:
            raise ValueError("a Conv2d cannot both up- and down-sample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        weight = nn.Parameter(initial_weight([out_channels, in_channels, kernel, kernel], **fans) * init_weight) \
            if kernel else None
        bias_value = nn.Parameter(initial_weight([out_channels], **fans) * init_bias) if kernel and bias else None
        self.register_parameter("weight", weight)
        self.register_parameter("bias", bias_value)
        # Registered (as None) even without resampling, so the buffer sits after weight/bias as in the checkpoint.
        self.register_buffer("resample_filter", resample_filter_2d(resample_filter) if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                   stride=2, padding=w_pad + f_pad)
            x = F.conv2d(x, w)
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                # The filter sums to 1; times 4 keeps the mean under 2x zero-insertion upsampling.
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                             padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with at most 32 groups and at least 4 channels per group (EDM's rule)."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                            bias=self.bias.to(x.dtype), eps=self.eps)


def attention_weights(q, k):
    """softmax over keys of q^T k / sqrt(channels), computed in float32 whatever the input dtype (as EDM does)."""
    scaled_k = k / np.sqrt(k.shape[1])
    logits = torch.einsum("ncq,nck->nqk", q.to(torch.float32), scaled_k.to(torch.float32))
    return logits.softmax(dim=2).to(q.dtype)


class UNetBlock(nn.Module):
    """EDM's residual block: GroupNorm-SiLU-conv, noise embedding added (or scale/shift), dropout, conv, skip,
    then optional single-layer self-attention. Up/down-sampling happens in the first conv and in the skip."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=(1, 1),
                 resample_proj=False, adaptive_scale=True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero if init_zero is not None else {"init_weight": 0})
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        # Attribute order below fixes the state-dict order: norm0, conv0, affine, norm1, conv1, skip, norm2, qkv, proj.
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter,
                            **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            # qkv channels are interleaved per head as (channel, {q,k,v}); the reshape must match the checkpoint's.
            q, k, v = self.qkv(self.norm2(x)).reshape(
                x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1).unbind(2)
            w = attention_weights(q, k)
            a = torch.einsum("nqk,nck->ncq", w, v)
            x = self.proj(a.reshape(*x.shape)) + x
            x = x * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal noise-level embedding of DDPM++ ([cos | sin], frequencies 1 .. 1/max_positions)."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        freqs = torch.arange(start=0, end=self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier-feature noise embedding of NCSN++; the frequencies are a buffer saved in the checkpoint."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class SongUNet(nn.Module):
    """EDM's re-implementation of the DDPM++ / NCSN++ U-Net of Song et al. (score_sde).

    Module names encode resolution and role (`enc.32x32_block0`, `dec.16x16_up`, `dec.32x32_aux_conv`), exactly as
    in the checkpoints. `encoder_type` 'standard' | 'skip' | 'residual' adds auxiliary input paths (the latter is
    NCSN++); `decoder_type` 'skip' sums an RGB output at every resolution instead of only at the top one.
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                 label_dropout=0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                 decoder_type="standard", resample_filter=(1, 1)):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type must be 'fourier' or 'positional', not {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', not {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', not {decoder_type!r}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise level (+ class label, + augmentation label) -> embedding vector.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        # Every non-auxiliary encoder output is kept for a decoder block; their widths size the decoder inputs.
        skip_channels = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skip_channels.pop()
                cout = model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels, class_labels, augment_labels, batch_size, device):
        """The embedding vector that conditions every block on noise level, class and augmentation."""
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos | sin] -> [sin | cos], as trained
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([batch_size, 1], device=device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            # One-hot labels scaled by sqrt(label_dim) so that the input has unit mean square.
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.embed(noise_labels, class_labels, augment_labels, x.shape[0], x.device)

        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                # `{res}_blockN` takes the matching encoder output concatenated on channels; `in0/in1/up` do not.
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


# --------------------------------------------------------------------------------------------------------------
# Preconditioning: D(x; sigma) = c_skip * x + c_out * F(c_in * x; c_noise), with F the U-Net.


class _Preconditioned(nn.Module):
    """Common part of the EDM wrappers; subclasses give the four coefficients. The U-Net is `self.model`, hence the
    `model.` prefix of every checkpoint key. `precond` is the subclass's value of the config key of that name."""

    precond = None

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type="SongUNet",
                 out_channels=None, **model_kwargs):
        super().__init__()
        if model_type != "SongUNet":
            raise ValueError(f"model_type {model_type!r} is not implemented here; only 'SongUNet' (DDPM++/NCSN++)")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        # out_channels: the U-Net's output width, img_channels in EDM; the multi-head wrapper asks for one per head
        self.model = SongUNet(img_resolution=img_resolution, in_channels=img_channels,
                              out_channels=img_channels if out_channels is None else out_channels,
                              label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) for sigma of shape (N, 1, 1, 1)."""
        raise NotImplementedError

    def eps_coefficients(self, sigma):
        """(a, b) with (x - D(x; sigma)) / sigma = a * x + b * F, written so that nothing cancels at small sigma."""
        raise NotImplementedError

    def _inputs(self, x, sigma, class_labels, force_fp32):
        """x, sigma (N, 1, 1, 1), class labels and compute dtype as EDM's forward prepares them."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if sigma.shape[0] == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0], 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        # EDM runs fp16 only on CUDA; on CPU the network always computes in float32.
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32
        return x, sigma, class_labels, dtype

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        """Denoised D(x; sigma, y). `sigma`: scalar or (N,); `class_labels`: (N, label_dim) one-hot, or None, which
        for a conditional model means all-zero labels (EDM's convention)."""
        x, sigma, class_labels, dtype = self._inputs(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def noise_prediction(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        """The noise estimate eps = (x - D(x; sigma, y)) / sigma of the same network pass as `forward`, in closed
        form (no subtraction of two O(1) numbers to get an O(sigma) one). Same arguments as `forward`."""
        x, sigma, class_labels, dtype = self._inputs(x, sigma, class_labels, force_fp32)
        _, _, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        a, b = self.eps_coefficients(sigma)
        return a * x + b * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        """Identity: these wrappers accept any continuous sigma (EDM's samplers call this)."""
        return torch.as_tensor(sigma)


class VPPrecond(_Preconditioned):
    """VP preconditioning (score_sde's variance-preserving SDE in EDM's sigma parametrisation; `precond: vp`).

    The U-Net predicts the noise eps: D = x - sigma * F(x / sqrt(1 + sigma^2); (M - 1) * t(sigma)), where t(sigma)
    inverts sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1). Of NVlabs' CIFAR-10 files only
    `baseline/baseline-cifar10-32x32-uncond-vp.pkl` (converted from score_sde) has this wrapper.
    """

    precond = "vp"

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim=label_dim, use_fp16=use_fp16,
                         model_type=model_type, **model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # float32 like EDM's float(self.sigma(epsilon_t)), so the values are identical to theirs (in float32
        # exp(1e-6) - 1 rounds to 2^-20, so sigma_min is 2^-10, 2.4% below the exact 1.0005e-3); forced onto the
        # CPU so that building under torch.device("meta") works.
        with torch.device("cpu"):
            self.sigma_min = float(self.sigma(epsilon_t))
            self.sigma_max = float(self.sigma(1))

    def sigma(self, t):
        """Noise level sigma(t) of the VP schedule at time t in [epsilon_t, 1]."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """Time t with sigma(t) = sigma (the positive root of the quadratic in t)."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

    def eps_coefficients(self, sigma):
        # c_skip = 1, c_out = -sigma: (x - D) / sigma = F exactly; the U-Net predicts the noise.
        return 0, 1


class EDMPrecond(_Preconditioned):
    """EDM's own preconditioning (Karras et al. 2022, Table 1) with data standard deviation `sigma_data`
    (`precond: edm`): the wrapper of the released `edm-cifar10-32x32-{cond,uncond}-vp.pkl` and of RDC's networks.

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
    c_noise = ln(sigma) / 4. The U-Net's output is neither the noise nor the image but a mix of both; the noise
    estimate is `noise_prediction`.
    """

    precond = "edm"

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim=label_dim, use_fp16=use_fp16,
                         model_type=model_type, **model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def eps_coefficients(self, sigma):
        # (1 - c_skip) / sigma = sigma / (sigma^2 + sd^2) and c_out / sigma = sd / sqrt(sigma^2 + sd^2).
        sd = self.sigma_data
        return sigma / (sigma ** 2 + sd ** 2), -sd / (sigma ** 2 + sd ** 2).sqrt()


# --------------------------------------------------------------------------------------------------------------
# RDC's multi-head idea on EDM's preconditioning (this project's; no official multi-head EDM network exists).


class MultiheadEDMPrecond(EDMPrecond):
    """EDMPrecond around a SongUNet without label input whose output holds one image per head: head k is U-Net
    output channels k·C .. (k+1)·C - 1, and D_k(x; sigma) = c_skip·x + c_out·F_k(c_in·x; c_noise), EDM's
    preconditioning applied to each head (the same float32 arithmetic as EDMPrecond's forward for one head). One
    pass gives the denoised image of every class, so RDC's diffusion classifier needs one evaluation per sigma
    instead of K. `forward` and `noise_prediction` return [N, heads, C, H, W]; they take no class labels.
    """

    def __init__(self, img_resolution, img_channels, heads, use_fp16=False, sigma_min=0, sigma_max=float("inf"),
                 sigma_data=0.5, model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim=0, use_fp16=use_fp16, sigma_min=sigma_min,
                         sigma_max=sigma_max, sigma_data=sigma_data, model_type=model_type,
                         out_channels=heads * img_channels, **model_kwargs)
        self.heads = heads

    def _heads(self, x, sigma, class_labels, force_fp32, model_kwargs):
        """(x, sigma, F) with x and sigma shaped to broadcast over heads ([N, 1, C, H, W], [N, 1, 1, 1, 1]) and the
        U-Net output split into heads, F [N, heads, C, H, W] in float32."""
        if class_labels is not None:
            raise ValueError("a multi-head EDM network has no label input: every head is one class")
        x, sigma, _, dtype = self._inputs(x, sigma, None, force_fp32)
        _, _, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=None, **model_kwargs)
        F_x = F_x.to(torch.float32).reshape(x.shape[0], self.heads, *x.shape[1:])
        return x[:, None], sigma[:, None], F_x

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        """Denoised D_k(x; sigma) of every head k: [N, heads, C, H, W]. `sigma`: scalar or (N,)."""
        x, sigma, F_x = self._heads(x, sigma, class_labels, force_fp32, model_kwargs)
        c_skip, c_out, _, _ = self.coefficients(sigma)
        return c_skip * x + c_out * F_x

    def noise_prediction(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        """The noise estimate (x - D_k(x; sigma)) / sigma of every head, in closed form: [N, heads, C, H, W]."""
        x, sigma, F_x = self._heads(x, sigma, class_labels, force_fp32, model_kwargs)
        a, b = self.eps_coefficients(sigma)
        return a * x + b * F_x


# --------------------------------------------------------------------------------------------------------------
# Building from a registry config.

# NVlabs/edm train.py with --arch=ddpmpp (and its --dropout default). augment_dim is 0 here although train.py sets
# it to 9 whenever --augment > 0 (its default 0.12), as in the released CIFAR-10 pickles: the registry's CIFAR-10
# configs (like the manifest) leave it out, and the registry loader drops the pickles' `model.map_augment.weight`,
# which no defense uses (the map only acts when augmentation labels are passed; see models._edm_pickle_state_dict).
# Give augment_dim: 9 explicitly to keep the map.
DDPMPP_DEFAULTS = dict(
    label_dim=0, use_fp16=False, model_type="SongUNet", augment_dim=0, model_channels=128, channel_mult=[2, 2, 2],
    channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], dropout=0.13, label_dropout=0,
    embedding_type="positional", channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
    resample_filter=[1, 1],
)
VP_SCHEDULE_KEYS = ("beta_d", "beta_min", "M", "epsilon_t")
EDM_PRECOND_KEYS = ("sigma_min", "sigma_max", "sigma_data")
REQUIRED_KEYS = ("img_resolution", "img_channels")

# The `precond` config key: train.py's --precond flag -> the wrapper class it trains and the keys that class adds.
PRECONDITIONINGS = {"edm": (EDMPrecond, EDM_PRECOND_KEYS), "vp": (VPPrecond, VP_SCHEDULE_KEYS)}
DEFAULT_PRECOND = "edm"  # train.py's default, which the released edm-cifar10-32x32-*-vp.pkl were trained with
# NVlabs/edm wrapper class names (as the pickles record them) -> the `precond` value; None: not implemented here.
PRECOND_OF_CLASS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": None, "iDDPMPrecond": None}


def precond_of_class(class_name):
    """The `precond` value of a wrapper class name as an EDM pickle records it ('EDMPrecond' or a qualified
    'training.networks.EDMPrecond'); None for EDM wrappers that are not implemented here (VE, iDDPM) and for names
    that are no EDM wrapper at all."""
    return PRECOND_OF_CLASS.get(str(class_name).rsplit(".", 1)[-1])


def build_edm_vp_songunet(config):
    """`EDMPrecond(SongUNet)` or `VPPrecond(SongUNet)` from a config with EDM's own argument names (see
    config/checkpoints.yaml). The family name's `vp` is the DDPM++ configuration of the released files
    (`*-vp.pkl`), not the preconditioning.

    Keys: img_resolution, img_channels (required); `precond`: 'edm' (EDMPrecond, train.py's default and the
    released CIFAR-10 files') or 'vp' (VPPrecond, score_sde's VP SDE); label_dim, use_fp16, model_type
    ('SongUNet'), embedding_type, encoder_type, decoder_type, channel_mult_noise, resample_filter, model_channels,
    channel_mult, num_blocks, attn_resolutions, dropout, augment_dim, label_dropout, channel_mult_emb (defaults:
    DDPMPP_DEFAULTS); for 'edm' sigma_min, sigma_max, sigma_data (defaults 0, inf, 0.5); for 'vp' the VP schedule
    beta_d, beta_min, M, epsilon_t (defaults 19.9, 0.1, 1000, 1e-5).
    """
    config = dict(config)
    precond = config.pop("precond", DEFAULT_PRECOND)
    if precond not in PRECONDITIONINGS:
        raise ValueError(f"edm_vp_songunet config key 'precond' must be one of {', '.join(sorted(PRECONDITIONINGS))} "
                         f"(NVlabs/edm train.py's --precond), got {precond!r}")
    wrapper, wrapper_keys = PRECONDITIONINGS[precond]
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise ValueError(f"edm_vp_songunet config lacks {', '.join(missing)}")
    known = set(REQUIRED_KEYS) | set(DDPMPP_DEFAULTS) | set(wrapper_keys)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown edm_vp_songunet config keys for precond {precond!r}: {', '.join(unknown)}; "
                         f"known: precond, {', '.join(sorted(known))}")
    kwargs = {**DDPMPP_DEFAULTS, **config}
    for key in ("channel_mult", "attn_resolutions", "resample_filter"):
        kwargs[key] = list(kwargs[key])
    return wrapper(**kwargs)


# Keys of an `edm_multihead_songunet` config besides `heads`: the EDMPrecond ones without the label input.
MULTIHEAD_KEYS = (set(REQUIRED_KEYS) | set(DDPMPP_DEFAULTS) | set(EDM_PRECOND_KEYS)) - {"label_dim", "label_dropout"}


def build_edm_multihead_songunet(config):
    """`MultiheadEDMPrecond` from a config with EDM's argument names (as `build_edm_vp_songunet` with precond
    'edm', without label_dim and label_dropout) plus `heads` (a positive integer, one per class)."""
    config = dict(config)
    heads = config.pop("heads", None)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"edm_multihead_songunet config key 'heads' must be a positive integer, got {heads!r}")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise ValueError(f"edm_multihead_songunet config lacks {', '.join(missing)}")
    unknown = sorted(set(config) - MULTIHEAD_KEYS)
    if unknown:
        raise ValueError(f"unknown edm_multihead_songunet config keys: {', '.join(unknown)}; known: heads, "
                         f"{', '.join(sorted(MULTIHEAD_KEYS))}")
    kwargs = {key: value for key, value in {**DDPMPP_DEFAULTS, **config}.items()
              if key not in ("label_dim", "label_dropout")}
    for key in ("channel_mult", "attn_resolutions", "resample_filter"):
        kwargs[key] = list(kwargs[key])
    return MultiheadEDMPrecond(heads=heads, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Reading EDM's pickles without executing them.
#
# A network pickle is `pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=dict(...)))`.
# Each instance of an `@persistence.persistent_class` is reduced to
#     torch_utils.persistence._reconstruct_persistent_obj(meta)
# with meta = dict(type='class', version=6, module_src=<source of training/networks.py>, class_name=..., state=...)
# where `state` is the instance __dict__ (for a torch module: _parameters, _buffers, _modules, ...; the persistence
# decorator adds _init_args/_init_kwargs). The official reconstruction exec()s module_src; here it becomes a
# PersistentObject that only keeps class_name and state. Tensors are pickled by torch itself as
# _rebuild_parameter(_rebuild_tensor_v2(_load_from_bytes(<legacy torch.save of the storage>), ...), ...).


class EDMPickleError(pickle.UnpicklingError):
    """The file is not an EDM network pickle this reader can read safely."""


class PersistentObject:
    """Stand-in for an object of a class whose source the pickle embeds; its source is never run."""

    def __init__(self, class_name, state, version=None, module_src_chars=0):
        self.class_name = class_name
        self.state = state
        self.version = version
        self.module_src_chars = module_src_chars

    def __repr__(self):
        return f"PersistentObject({self.class_name!r})"


def _reconstruct_persistent_stand_in(meta):
    """Replaces torch_utils.persistence._reconstruct_persistent_obj: keep the state, ignore module_src."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise EDMPickleError("malformed persistent-object record: expected dict(type='class', class_name, state)")
    return PersistentObject(str(meta.get("class_name")), meta["state"], meta.get("version"),
                            len(meta.get("module_src") or ""))


class OpaqueObject:
    """Stand-in for a plainly pickled class of torch.nn containers or of EDM's packages (torch_utils, training,
    dnnlib): records the constructor arguments and the state, runs nothing."""

    qualified_name = "?"
    # Pickle's NEWOBJ path creates instances without calling __init__; these defaults stand in until BUILD.
    args = ()
    kwargs = {}
    state = None

    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs
        self.state = {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state if isinstance(state, dict) else {"state": state}

    def __repr__(self):
        return f"OpaqueObject({self.qualified_name})"


class _DictStandIn(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access): a plain dict suffices here."""


def _load_storage_from_bytes(data):
    """Replaces torch.storage._load_from_bytes, which calls torch.load with weights_only=False."""
    if not isinstance(data, (bytes, bytearray)):
        raise EDMPickleError("tensor storage record is not a byte string")
    return torch.load(io.BytesIO(bytes(data)), weights_only=True)


def _rebuild_tensor_stand_in(storage, storage_offset, size, stride, *unused_requires_grad_hooks_metadata):
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter_stand_in(data, *unused_requires_grad_hooks_state):
    # A state dict holds plain tensors; gradient flags and (always empty) backward hooks are irrelevant.
    return data


def _numpy_scalar_stand_in(dtype, data=None):
    """Replaces numpy's scalar reconstructor (numbers in _init_kwargs, e.g. skip_scale=np.sqrt(0.5))."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, (bytes, bytearray)):
        raise EDMPickleError(f"refusing a non-numeric numpy scalar of dtype {dtype!r}")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0].item()


def _latin1_bytes_stand_in(text, encoding="latin1"):
    """Replaces _codecs.encode, through which pickle protocols 0-2 store bytes (the storage blobs)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise EDMPickleError("refusing _codecs.encode other than latin1 text -> bytes")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _latin1_bytes_stand_in,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_stand_in,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_stand_in,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter_stand_in,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_stand_in,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar_stand_in,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar_stand_in,
    ("dnnlib.util", "EasyDict"): _DictStandIn,
    ("dnnlib", "EasyDict"): _DictStandIn,
}
# Plain (non-persistent) classes that may appear by reference; each gets its own OpaqueObject subclass.
_OPAQUE_MODULE_PREFIXES = ("torch.nn.modules.container", "torch_utils", "training", "dnnlib")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self._opaque_classes = {}

    def find_class(self, module, name):
        # Protocols 0-2 write Python 2 names (__builtin__.set); translate them as pickle's own find_class does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if any(module == prefix or module.startswith(prefix + ".") for prefix in _OPAQUE_MODULE_PREFIXES) \
                and name[:1].isupper():
            qualified = f"{module}.{name}"
            if qualified not in self._opaque_classes:
                self._opaque_classes[qualified] = type(name, (OpaqueObject,), {"qualified_name": qualified})
            return self._opaque_classes[qualified]
        raise EDMPickleError(
            f"refusing to load global {module}.{name}: an EDM network pickle should only reference torch's tensor "
            "rebuild functions, torch_utils.persistence, torch.nn containers and numpy scalars"
        )

    def persistent_load(self, pid):
        raise EDMPickleError("unexpected persistent id in an EDM network pickle (is this a torch.save file?)")


def _module_state_dict(node, prefix, out):
    """Walk a module's pickled __dict__ in torch's state_dict order: own parameters, own persistent buffers,
    then submodules."""
    state = node.state
    if not isinstance(state, dict) or "_parameters" not in state or "_modules" not in state:
        raise EDMPickleError(f"{prefix or 'network'} ({node!r}) is not a torch module")
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, tensor in state["_parameters"].items():
        if tensor is not None:
            out[prefix + name] = tensor
    for name, tensor in (state.get("_buffers") or {}).items():
        if tensor is not None and name not in non_persistent:
            out[prefix + name] = tensor
    for name, child in state["_modules"].items():
        if child is not None:
            _module_state_dict(child, f"{prefix}{name}.", out)
    return out


@dataclass
class EDMNetworkPickle:
    """What `read_edm_network_pickle` found: the network's class name, its constructor keyword arguments as
    recorded by torch_utils.persistence, and its state dict."""

    class_name: str
    init_kwargs: dict = field(default_factory=dict)
    state_dict: "OrderedDict[str, torch.Tensor]" = field(default_factory=OrderedDict)


def read_edm_network_pickle(path, key="ema"):
    """Read network `key` of an NVlabs/edm `.pkl` without executing the source code embedded in it."""
    with open(path, "rb") as f:
        try:
            data = _RestrictedUnpickler(f).load()
        except EDMPickleError:
            raise
        except Exception as error:  # truncated file, foreign format, ...
            raise EDMPickleError(f"{path}: not a readable EDM network pickle ({error})") from error
    if not isinstance(data, dict) or key not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise EDMPickleError(f"{path}: expected a dict with key {key!r} (EDM's network snapshot); found {found}")
    network = data[key]
    if not isinstance(network, (PersistentObject, OpaqueObject)):
        raise EDMPickleError(f"{path}: {key!r} is a {type(network).__name__}, not a pickled network")
    class_name = getattr(network, "class_name", None) or type(network).__name__
    state_dict = _module_state_dict(network, "", OrderedDict())  # raises unless network.state is a module's
    init_kwargs = dict(network.state.get("_init_kwargs") or {})
    return EDMNetworkPickle(class_name, init_kwargs, state_dict)


def load_edm_pickle_state_dict(path, key="ema"):
    """State dict of network `key` ('ema' by default) of an EDM `.pkl`, keys as in `EDMPrecond.state_dict()`
    (`model.map_label.weight`, ...; VPPrecond's are the same). Refuses, with EDMPickleError, any pickle that
    references other globals."""
    return read_edm_network_pickle(path, key=key).state_dict
