"""RobustBench's `DMWideResNet` (`robustbench/model_zoo/architectures/dm_wide_resnet.py`, DeepMind's
`adversarial_robustness/pytorch/model_zoo.py` WideResNet): the network of RDC's adversarial-training baselines.

RDC compares with RobustBench's CIFAR-10 `Wang2023Better_WRN-70-16` (AT-EDM) and
`Rebuffi2021Fixing_70_16_cutmix_ddpm`, both ℓ∞ and ℓ2. RobustBench builds all four as
`DMWideResNet(num_classes=10, depth=70, width=16, activation_fn=..., mean=CIFAR10_MEAN, std=CIFAR10_STD)`; the
activation is DeepMind's `Swish` for Rebuffi et al. and `nn.SiLU` for Wang et al. (the same function, x·sigmoid(x)).

How it differs from RobustBench's other WideResNet (`networks/wrn.py`, the `Standard` model):
- it takes images in [0, 1] and normalises them itself, (x - mean) / std with CIFAR-10's channel statistics; `mean`
  and `std` are buffers that are not saved (`persistent=False`), so checkpoints carry no such keys;
- Swish (or SiLU) instead of ReLU;
- a stride-2 convolution pads TensorFlow's "SAME" way, one row and column at the bottom and right only, and a
  stride-1 one one pixel all round (DeepMind trained these networks in JAX, whose "SAME" padding this is);
- the final linear layer is `logits`, the stem `init_conv`, the three groups `layer.0..2`, each a `block` Sequential.

Attribute names and registration order follow the official classes, so `state_dict()` has the checkpoint's keys in
its order (`init_conv.weight`, `layer.0.block.0.batchnorm_0.weight`, ..., `layer.0.block.0.shortcut.weight`, ...,
`batchnorm.num_batches_tracked`, `logits.weight`, `logits.bias`). The manifest
`tests/fixtures/architectures/robustbench_cifar10_dm_wrn70_16.json` was made with RobustBench 1.1.1.
"""

import torch
from torch import nn
from torch.nn import functional as F

# DeepMind's / RobustBench's channel statistics of the CIFAR-10 training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class Swish(nn.Module):
    """x·sigmoid(x), computed as DeepMind's `Swish` computes its forward pass. (DeepMind's custom autograd function
    recomputes the sigmoid in the backward pass to save memory; autograd here gives the same derivative.)"""

    def forward(self, x):
        return x * torch.sigmoid(x)


# RobustBench's `activation_fn` classes by the names the registry uses.
ACTIVATIONS = {"Swish": Swish, "SiLU": nn.SiLU, "ReLU": nn.ReLU}

# F.pad amounts (left, right, top, bottom) before a 3x3 convolution: "SAME" padding as TensorFlow computes it.
SAME_PADDING = {1: (1, 1, 1, 1), 2: (0, 1, 0, 1)}


class Block(nn.Module):
    """Pre-activation residual block: BN-act-conv3x3(stride)-BN-act-conv3x3, plus a shortcut.

    A block that changes width has a 1x1 `shortcut` convolution, applied (like the main path) to the pre-activated
    input act(bn(x)); a block that keeps it adds the raw input x.
    """

    def __init__(self, in_planes, out_planes, stride, activation):
        super().__init__()
        if stride not in SAME_PADDING:
            raise ValueError(f"DMWideResNet blocks have stride 1 or 2, got {stride}")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = activation()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = activation()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        # As in the official code the width alone decides; in a WRN every stride-2 block also widens.
        self.shortcut = None if in_planes == out_planes else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        self.same_padding = SAME_PADDING[stride]

    def forward(self, x):
        activated = self.relu_0(self.batchnorm_0(x))
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv_0(F.pad(activated, self.same_padding))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return residual + out


class BlockGroup(nn.Module):
    """`num_blocks` Blocks, stored as `.block`; only the first changes width and stride."""

    def __init__(self, num_blocks, in_planes, out_planes, stride, activation):
        super().__init__()
        self.block = nn.Sequential(*[
            Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, activation)
            for i in range(num_blocks)
        ])

    def forward(self, x):
        return self.block(x)


class DMWideResNet(nn.Module):
    """WRN-depth-width for 32x32 images in [0, 1] (normalised inside), returning logits.

    `padding` pads the input on every side first (DeepMind's MNIST models: 28 -> 32 px); `mean` and `std` are one
    value per input channel, or one value for all.
    """

    def __init__(self, num_classes=10, depth=28, width=10, activation_fn="ReLU", mean=CIFAR10_MEAN,
                 std=CIFAR10_STD, padding=0, num_input_channels=3):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"DMWideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ..., 70), got {depth}")
        if activation_fn not in ACTIVATIONS:
            raise ValueError(f"DMWideResNet activation_fn {activation_fn!r}; choose one of {', '.join(ACTIVATIONS)}")
        activation = ACTIVATIONS[activation_fn]
        # not persistent: the official state dicts carry no normalisation tensors
        self.register_buffer("mean", self._per_channel(mean, num_input_channels), persistent=False)
        self.register_buffer("std", self._per_channel(std, num_input_channels), persistent=False)
        self.padding = int(padding)
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = nn.Conv2d(num_input_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(*[
            BlockGroup(blocks_per_group, widths[group], widths[group + 1], 1 if group == 0 else 2, activation)
            for group in range(3)
        ])
        self.batchnorm = nn.BatchNorm2d(widths[3])
        self.relu = activation()
        self.logits = nn.Linear(widths[3], num_classes)
        self.num_channels = widths[3]

    @staticmethod
    def _per_channel(value, channels):
        """A (channels, 1, 1) float32 tensor from one number or one number per channel."""
        tensor = torch.as_tensor(value, dtype=torch.float32).reshape(-1, 1, 1)
        if tensor.shape[0] not in (1, channels):
            raise ValueError(f"DMWideResNet mean/std need 1 or {channels} values, got {tensor.shape[0]}")
        return tensor.expand(channels, 1, 1).clone()

    def forward(self, x):
        if self.padding > 0:
            x = F.pad(x, (self.padding,) * 4)
        out = self.init_conv((x - self.mean) / self.std)
        out = self.layer(out)
        out = self.relu(self.batchnorm(out))
        out = F.avg_pool2d(out, 8)  # 32x32 input -> 8x8 after two stride-2 groups -> global average
        return self.logits(out.view(-1, self.num_channels))


# RobustBench's constructor keywords and defaults, so that a registry config reads like model_zoo/cifar10.py.
DM_WRN_DEFAULTS = dict(num_classes=10, depth=28, width=10, activation_fn="ReLU", mean=list(CIFAR10_MEAN),
                       std=list(CIFAR10_STD), padding=0, num_input_channels=3)


def build_robustbench_dm_wrn(config):
    """`DMWideResNet` from RobustBench's keywords (`num_classes`, `depth`, `width`, `activation_fn` by name: Swish,
    SiLU or ReLU, `mean`, `std`, `padding`, `num_input_channels`); unset keys take RobustBench's defaults."""
    unknown = sorted(set(config) - set(DM_WRN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown robustbench_dm_wrn config keys: {', '.join(unknown)}; "
                         f"known: {', '.join(DM_WRN_DEFAULTS)}")
    return DMWideResNet(**{**DM_WRN_DEFAULTS, **config})
