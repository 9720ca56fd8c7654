"""Small image classifiers that the CPU presets (mini, smoke) train themselves.

`SmallResNet` is a pre-activation ResNet in the CIFAR layout of He et al. (three stages of basic blocks at full,
half and quarter resolution, widths w, 2w, 4w, global average pooling, one linear layer): depth 6n + 2 as in their
ResNet-20/32/110, the family Cohen et al. certify. It takes images in [0, 1] (N x C x H x W; any H, W divisible by
4) and returns logits; the one input normalisation it needs (centring [0, 1] around 0) is built in, so that callers
can hand it the same [0, 1] images they give every other classifier of the project.
"""

from torch import nn
from torch.nn import functional as F

from diffrobust import imagespace

SMALL_RESNET_DEFAULTS = {"in_channels": 3, "num_classes": 10, "width": 16, "depth": 8}


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus a shortcut (1x1 strided conv on the activated input when the
    shape changes, the identity otherwise)."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if changes_shape else None

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class SmallResNet(nn.Module):
    """Pre-activation ResNet-(6n+2) for small images in [0, 1]; returns logits."""

    def __init__(self, in_channels=3, num_classes=10, width=16, depth=8):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"SmallResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        if width < 1:
            raise ValueError(f"SmallResNet width must be positive, got {width}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        layers, channels = [], width
        for stage, stage_width in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(PreActBlock(channels, stage_width, stride))
                channels = stage_width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x01):
        # Centre the [0, 1] input with a fixed affine map, so that the interface stays "images in [0, 1]".
        out = self.blocks(self.stem(imagespace.to_model_space(x01)))
        out = F.relu(self.bn(out))
        return self.fc(out.mean(dim=(2, 3)))


def build_small_resnet(config):
    """`SmallResNet` from `{in_channels, num_classes, width, depth}` (defaults 3, 10, 16, 8)."""
    unknown = sorted(set(config) - set(SMALL_RESNET_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown small_resnet config keys: {', '.join(unknown)}; known: {', '.join(SMALL_RESNET_DEFAULTS)}")
    return SmallResNet(**{**SMALL_RESNET_DEFAULTS, **config})
