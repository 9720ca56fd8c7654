"""RobustBench WideResNet: the `Standard` CIFAR-10 model's state-dict layout, and the block semantics it relies on."""

import json

import pytest
import torch
import yaml
from torch.nn import functional as F

from diffrobust.networks import build_network
from diffrobust.networks import wrn


def layout(module):
    return [[key, list(value.shape), str(value.dtype).removeprefix("torch.")]
            for key, value in module.state_dict().items()]


def small_wrn(**overrides):
    torch.manual_seed(0)
    net = wrn.build_robustbench_wrn({"depth": 10, "widen_factor": 2, "num_classes": 10, **overrides})
    # Non-trivial batch-norm statistics, so that eval mode differs visibly from batch statistics.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def test_standard_registry_network_has_the_robustbench_state_dict_layout(fixtures_dir, repo_root):
    expected = json.loads((fixtures_dir / "architectures" / "robustbench_cifar10_standard_wrn28_10.json").read_text())
    entry = yaml.safe_load((repo_root / "config" / "checkpoints.yaml").read_text())[
        "robustbench_cifar10_standard_wrn28_10"]
    assert entry["architecture"]["config"] == expected["config"]
    with torch.device("meta"):
        net = build_network(entry["architecture"])
    assert isinstance(net, wrn.WideResNet)
    assert layout(net) == expected["state_dict"]  # keys (incl. BN running stats), order, shapes, dtypes
    assert sum(p.numel() for p in net.parameters()) == expected["num_params"] == 36_479_194


def test_small_wrn_gives_logits_deterministically_in_eval_mode():
    net = small_wrn()
    torch.manual_seed(1)
    x = torch.rand(4, 3, 32, 32)  # images in [0, 1]
    with torch.no_grad():
        first, second = net(x), net(x)
        alone = net(x[:1])
    assert first.shape == (4, 10) and first.dtype == torch.float32
    assert torch.equal(first, second)
    # Eval mode uses running statistics, so a sample's logits do not depend on the rest of the batch ...
    torch.testing.assert_close(alone, first[:1], rtol=1e-5, atol=1e-5)
    # ... whereas training mode normalises with batch statistics and gives different logits.
    with torch.no_grad():
        batch_stats = net.train()(x)
    assert (batch_stats - first).abs().max().item() > 1e-3
    assert first.std(dim=0).max().item() > 1e-4  # different images, different logits


def test_block_shortcut_uses_preactivated_input_when_width_changes():
    net = small_wrn(depth=16)  # two blocks per group
    widening = net.block2.layer[0]  # 32 -> 64 channels, stride 2
    keeping = net.block2.layer[1]  # 64 -> 64 channels
    assert widening.convShortcut is not None and keeping.convShortcut is None
    with torch.no_grad():
        widening.conv2.weight.zero_()
        keeping.conv2.weight.zero_()
        x = torch.randn(2, 32, 16, 16)
        expected = F.conv2d(F.relu(widening.bn1(x)), widening.convShortcut.weight, stride=2)
        torch.testing.assert_close(widening(x), expected)
        y = torch.randn(2, 64, 8, 8)
        assert torch.equal(keeping(y), y)  # identity shortcut on the raw input


def test_sub_block1_adds_unused_keys_between_block1_and_block2():
    plain = small_wrn()
    with_sub = small_wrn(sub_block1=True)
    keys = list(with_sub.state_dict())
    sub_keys = [key for key in keys if key.startswith("sub_block1.")]
    assert [key.replace("sub_block1.", "block1.", 1) for key in sub_keys] == \
        [key for key in keys if key.startswith("block1.")]
    assert keys.index(sub_keys[-1]) + 1 == keys.index("block2.layer.0.bn1.weight")
    with_sub.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(with_sub(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("depth", [26, 27, 4])
def test_depth_must_be_6n_plus_4(depth):
    with pytest.raises(ValueError, match=rf"depth must be 6n\+4 .*got {depth}"):
        wrn.build_robustbench_wrn({"depth": depth, "widen_factor": 2, "num_classes": 10})


def test_unknown_config_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown robustbench_wrn config keys: width"):
        wrn.build_robustbench_wrn({"depth": 28, "width": 10})
