"""RobustBench's WideResNet (`robustbench/model_zoo/architectures/wide_resnet.py`), the `Standard` CIFAR-10 model.

RobustBench's CIFAR-10 `Standard` entry is `WideResNet(depth=28, widen_factor=10)` with nothing around it: unlike
many other entries of its model zoo it has no normalisation layer (no `mu`/`sigma` buffers), so it takes images in
[0, 1] as they come from `transforms.ToTensor()` and returns 10 logits. DiffPure and RDC use it as their WRN-28-10.
RDC's adversarially trained WRN-70-16s are another RobustBench class, `DMWideResNet` (`networks/dm_wrn.py`).

Attribute names and registration order follow RobustBench's, so `state_dict()` has the checkpoint's keys in the
checkpoint's order (`conv1.weight`, `block1.layer.0.bn1.weight`, ..., `block1.layer.0.convShortcut.weight`, ...,
`fc.bias`). RobustBench's own loader strips a `module.` prefix and unwraps a `state_dict` entry before loading;
that belongs to the checkpoint loader, not here.
"""

from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, plus a shortcut.

    When the width (or stride) changes, RobustBench applies the 1x1 `convShortcut` to the *pre-activated* input
    relu(bn1(x)), not to x; when it does not, the shortcut is the raw input. Both are reproduced here.
    """

    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        # RobustBench decides by width alone: a stride-2 block always changes width in a WRN, so this suffices.
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.equal_in_out else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """`num_layers` BasicBlocks; only the first changes width and stride. Stored as `.layer` (a Sequential)."""

    def __init__(self, num_layers, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(num_layers)
        ])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs in [0, 1] (no input normalisation), returning logits.

    `sub_block1` adds an unused copy of the first group (`sub_block1.*` keys), present in some checkpoints that
    RobustBench loads (e.g. TRADES-style WRNs); it never takes part in the forward pass. `Standard` has none.
    """

    def __init__(self, depth=28, num_classes=10, widen_factor=10, sub_block1=False, dropRate=0.0, bias_last=True):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}")
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks_per_group, widths[0], widths[1], 1, dropRate)
        if sub_block1:
            self.sub_block1 = NetworkBlock(blocks_per_group, widths[0], widths[1], 1, dropRate)
        self.block2 = NetworkBlock(blocks_per_group, widths[1], widths[2], 2, dropRate)
        self.block3 = NetworkBlock(blocks_per_group, widths[2], widths[3], 2, dropRate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes, bias=bias_last)
        self.num_features = widths[3]
        self._initialise()

    def _initialise(self):
        """RobustBench's initialisation (He-normal convs with fan-out, unit BN, zero biases); only matters for
        training from scratch, since checkpoints overwrite it."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x):
        out = self.conv1(x)
        out = self.block1(out)
        out = self.block2(out)
        out = self.block3(out)
        out = F.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)  # 32x32 input -> 8x8 after two stride-2 groups -> global average
        return self.fc(out.view(-1, self.num_features))


# RobustBench's constructor defaults; the registry uses these names so configs compare with theirs line by line.
WRN_DEFAULTS = dict(depth=28, widen_factor=10, num_classes=10, sub_block1=False, dropRate=0.0, bias_last=True)


def build_robustbench_wrn(config):
    """`WideResNet` from `{depth, widen_factor, num_classes}` and optionally `sub_block1`, `dropRate`, `bias_last`
    (RobustBench's names and defaults: 28, 10, 10, False, 0.0, True)."""
    unknown = sorted(set(config) - set(WRN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown robustbench_wrn config keys: {', '.join(unknown)}; "
                         f"known: {', '.join(WRN_DEFAULTS)}")
    return WideResNet(**{**WRN_DEFAULTS, **config})
