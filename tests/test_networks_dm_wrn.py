"""RobustBench's DMWideResNet (RDC's adversarial-training baselines): the registry networks have the official
state-dict layout, and a small network reproduces the official outputs and input gradients (fixtures made with
RobustBench 1.1.1, tests/make_fixtures/robustbench_dm_wrn.py)."""

import json

import pytest
import torch
import yaml
from torch.nn import functional as F

from diffrobust import models
from diffrobust.models import ModelFileError
from diffrobust.networks import build_network
from diffrobust.networks import dm_wrn

# The registry entries RDC compares with: RobustBench model-zoo key -> registry name.
RDC_BASELINES = {
    "cifar10/Linf/Wang2023Better_WRN-70-16": "robustbench_cifar10_linf_wang2023better_wrn70_16",
    "cifar10/L2/Wang2023Better_WRN-70-16": "robustbench_cifar10_l2_wang2023better_wrn70_16",
    "cifar10/Linf/Rebuffi2021Fixing_70_16_cutmix_ddpm": "robustbench_cifar10_linf_rebuffi2021fixing_70_16_cutmix_ddpm",
    "cifar10/L2/Rebuffi2021Fixing_70_16_cutmix_ddpm": "robustbench_cifar10_l2_rebuffi2021fixing_70_16_cutmix_ddpm",
}


def layout(module):
    return [[key, list(value.shape), str(value.dtype).removeprefix("torch.")]
            for key, value in module.state_dict().items()]


@pytest.fixture(scope="module")
def manifest(fixtures_dir):
    return json.loads((fixtures_dir / "architectures" / "robustbench_cifar10_dm_wrn70_16.json").read_text())


@pytest.fixture(scope="module")
def small(fixtures_dir):
    return torch.load(fixtures_dir / "architectures" / "robustbench_dm_wrn_small.pt", weights_only=True)


def small_network(small, activation_fn):
    network = dm_wrn.build_robustbench_dm_wrn({**small["config"], "activation_fn": activation_fn})
    network.load_state_dict(small["state_dict"], strict=True)
    return network.eval()


def output_and_gradient(network, x, cotangent):
    x = x.clone().requires_grad_(True)
    out = network(x)
    (grad,) = torch.autograd.grad((out * cotangent).sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("entry", sorted(RDC_BASELINES))
def test_registry_networks_have_the_robustbench_state_dict_layout(manifest, repo_root, entry):
    registry = yaml.safe_load((repo_root / "config" / "checkpoints.yaml").read_text())
    architecture = registry[RDC_BASELINES[entry]]["architecture"]
    assert architecture["family"] == "robustbench_dm_wrn"
    # the registry's keywords are RobustBench's, with the activation its model zoo gives this entry
    activation = manifest["entries"][entry]["activation_fn"]
    assert architecture["config"] == {**manifest["config"], "activation_fn": activation}
    with torch.device("meta"):  # 267M parameters: no memory on the meta device
        network = build_network(architecture)
    assert isinstance(network, dm_wrn.DMWideResNet)
    assert layout(network) == manifest["state_dict"]  # keys (incl. BN running stats), order, shapes, dtypes
    assert sum(p.numel() for p in network.parameters()) == manifest["num_params"] == 266_796_506
    # mean and std are buffers that the checkpoints do not carry
    assert {name: list(buffer.shape) for name, buffer in network.named_buffers() if "." not in name} == \
        manifest["not_in_state_dict"]


def test_the_four_baselines_use_the_activations_robustbench_gives_them(manifest):
    activations = {entry: value["activation_fn"] for entry, value in manifest["entries"].items()}
    assert activations == {
        "cifar10/Linf/Wang2023Better_WRN-70-16": "SiLU", "cifar10/L2/Wang2023Better_WRN-70-16": "SiLU",
        "cifar10/Linf/Rebuffi2021Fixing_70_16_cutmix_ddpm": "Swish",
        "cifar10/L2/Rebuffi2021Fixing_70_16_cutmix_ddpm": "Swish"}


@pytest.mark.parametrize("activation_fn", ["Swish", "SiLU"])
def test_small_network_reproduces_the_official_outputs_and_input_gradients(small, activation_fn):
    network = small_network(small, activation_fn)
    out, grad = output_and_gradient(network, small["x"], small["cotangent"])
    expected = small[f"out_{activation_fn.lower()}"]
    assert out.shape == (4, 10) and expected.std(dim=0).mean() > 0.02  # the logits depend on the image
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # the attacks differentiate through it: the input gradient is the official one too
    torch.testing.assert_close(grad, small[f"grad_{activation_fn.lower()}"], rtol=1e-4, atol=1e-7)


def test_the_fixture_notices_symmetric_padding_of_the_stride_2_convolutions(small):
    """The official blocks pad stride-2 convolutions at the bottom and right only (TensorFlow's SAME); padding
    both sides, as a PyTorch Conv2d(padding=1) would, gives the same output size on a grid shifted by one pixel,
    and the fixture tells the two apart."""
    network = small_network(small, "Swish")
    for group in network.layer[1:]:
        group.block[0].same_padding = (1, 1, 1, 1)
    with torch.no_grad():
        shifted = network(small["x"])
    assert shifted.shape == small["out_swish"].shape
    assert (shifted - small["out_swish"]).abs().max() > 1e-3


def test_the_input_is_normalised_inside_with_cifar10_statistics(small):
    network = small_network(small, "Swish")
    x = small["x"]
    mean = torch.tensor(dm_wrn.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(dm_wrn.CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        normalised = (x - mean) / std
        expected = network.init_conv(normalised)
        stem = F.conv2d((x - network.mean) / network.std, network.init_conv.weight, padding=1)
    torch.testing.assert_close(stem, expected, rtol=0, atol=0)
    assert network.mean.flatten().tolist() == pytest.approx([0.4914, 0.4822, 0.4465])
    assert "mean" not in network.state_dict() and "std" not in network.state_dict()


def test_a_widening_block_sends_the_preactivated_input_through_the_shortcut(small):
    network = small_network(small, "SiLU")
    widening, keeping = network.layer[1].block  # depth 16: two blocks per group; 32 -> 64 channels, stride 2
    assert widening.shortcut is not None and keeping.shortcut is None
    with torch.no_grad():
        widening.conv_1.weight.zero_()
        keeping.conv_1.weight.zero_()
        x = torch.randn(2, 32, 16, 16)
        expected = F.conv2d(F.silu(widening.batchnorm_0(x)), widening.shortcut.weight, stride=2)
        torch.testing.assert_close(widening(x), expected)
        y = torch.randn(2, 64, 8, 8)
        assert torch.equal(keeping(y), y)  # identity shortcut on the raw input


def test_a_robustbench_checkpoint_loads_strictly_through_the_registry(small, tmp_path):
    """RobustBench saves some checkpoints wrapped ({"state_dict": ...}) with DataParallel's `module.` prefix; the
    registry loader unwraps both, loads strictly, and gives the official network's logits."""
    config = {**small["config"], "activation_fn": "Swish"}
    (tmp_path / "rb").mkdir()
    wrapped = {"state_dict": {f"module.{key}": value for key, value in small["state_dict"].items()}}
    torch.save(wrapped, tmp_path / "rb" / "weights.pt")
    registry = {"rb": {"description": "d", "paper": ["RDC"], "license": "MIT", "source": "s",
                       "files": [{"path": "weights.pt", "urls": []}],
                       "architecture": {"family": "robustbench_dm_wrn", "config": config}}}
    loaded = models.load_registry_checkpoint("rb", root=tmp_path, registry=registry)
    assert loaded.kind == "classifier"
    with torch.no_grad():
        torch.testing.assert_close(models.classifier(loaded)(small["x"]), small["out_swish"], rtol=1e-5, atol=1e-6)
    truncated = dict(small["state_dict"])
    truncated.pop("logits.bias")
    torch.save(truncated, tmp_path / "rb" / "weights.pt")
    with pytest.raises(ModelFileError, match=r"do not fit the network(.|\n)*Missing key(.|\n)*logits.bias"):
        models.load_registry_checkpoint("rb", root=tmp_path, registry=registry)


@pytest.mark.parametrize("config, message", [
    ({"depth": 26}, r"depth must be 6n\+4 .*got 26"),
    ({"activation_fn": "GELU"}, "activation_fn 'GELU'; choose one of Swish, SiLU, ReLU"),
    ({"widen_factor": 10}, "unknown robustbench_dm_wrn config keys: widen_factor"),
    ({"mean": [0.5, 0.5]}, "mean/std need 1 or 3 values, got 2"),
])
def test_bad_configs_are_refused_naming_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        dm_wrn.build_robustbench_dm_wrn({"depth": 10, "width": 1, **config})
