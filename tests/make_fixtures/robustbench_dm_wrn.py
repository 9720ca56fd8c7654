"""Makes the DMWideResNet fixtures with the OFFICIAL code (RobustBench 1.1.1); not run by the tests.

Run it with a Python that has robustbench 1.1.1 importable, outside the project's environment, e.g.

    python3 -m venv /tmp/rbvenv && /tmp/rbvenv/bin/pip install --no-deps robustbench==1.1.1 geotorch torchdiffeq gdown
    # plus torch, timm and an importable `autoattack` (robustbench/__init__ imports it; pyautoattack provides it)
    /tmp/rbvenv/bin/python tests/make_fixtures/robustbench_dm_wrn.py tests/fixtures/architectures

It writes
- robustbench_cifar10_dm_wrn70_16.json: the state-dict manifest of the network RobustBench builds for RDC's four
  adversarial-training baselines (built on the meta device from model_zoo/cifar10.py's own entries);
- robustbench_dm_wrn_small.pt: a small DMWideResNet (depth 16, width 2) with seeded weights and measured batch-norm
  statistics, inputs, and the official outputs and input gradients with both activations (Swish, nn.SiLU).
It imports nothing from diffrobust.
"""

import inspect
import json
import sys
from pathlib import Path

import torch
from torch import nn

import robustbench
import robustbench.model_zoo.cifar10 as zoo
from robustbench.model_zoo.architectures import dm_wide_resnet as dm

# RobustBench model-zoo entries RDC compares with (threat -> names).
ENTRIES = {"Linf": ["Wang2023Better_WRN-70-16", "Rebuffi2021Fixing_70_16_cutmix_ddpm"],
           "L2": ["Wang2023Better_WRN-70-16", "Rebuffi2021Fixing_70_16_cutmix_ddpm"]}
ZOO = {"Linf": zoo.linf, "L2": zoo.l2}
ACTIVATION_NAMES = {dm.Swish: "Swish", nn.SiLU: "SiLU", nn.ReLU: "ReLU"}
FULL = dict(num_classes=10, depth=70, width=16, mean=list(dm.CIFAR10_MEAN), std=list(dm.CIFAR10_STD))
SMALL = dict(num_classes=10, depth=16, width=2, mean=list(dm.CIFAR10_MEAN), std=list(dm.CIFAR10_STD))


def layout(module):
    return [[key, list(value.shape), str(value.dtype).removeprefix("torch.")]
            for key, value in module.state_dict().items()]


def zoo_entry(threat, name):
    """The entry's network on the meta device, its activation's name and its gdrive id, after checking that it is
    DMWideResNet with the FULL keywords (the lambda's source names CIFAR10_MEAN/STD; the layout is compared)."""
    entry = ZOO[threat][name]
    source = inspect.getsource(entry["model"])
    assert "DMWideResNet(" in source and "mean=CIFAR10_MEAN" in source and "std=CIFAR10_STD" in source, source
    with torch.device("meta"):
        network = entry["model"]()
        activation = ACTIVATION_NAMES[type(network.relu)]
        reference = dm.DMWideResNet(**{**FULL, "mean": tuple(FULL["mean"]), "std": tuple(FULL["std"])},
                                    activation_fn=type(network.relu))
    assert type(network) is dm.DMWideResNet and layout(network) == layout(reference), (threat, name)
    return network, activation, entry["gdrive_id"]


def manifest():
    entries, layouts = {}, []
    for threat, names in ENTRIES.items():
        for name in names:
            network, activation, gdrive_id = zoo_entry(threat, name)
            entries[f"cifar10/{threat}/{name}"] = {"activation_fn": activation, "gdrive_id": gdrive_id}
            layouts.append(layout(network))
            num_params = sum(p.numel() for p in network.parameters())
    assert all(item == layouts[0] for item in layouts)
    return {
        "source": "RobustBench 1.1.1 (PyPI) robustbench/model_zoo/architectures/dm_wide_resnet.py DMWideResNet, "
                  "built by robustbench/model_zoo/cifar10.py's own entries (listed under `entries`) on the meta device",
        "robustbench_version": robustbench.__version__ if hasattr(robustbench, "__version__") else "1.1.1",
        "config": FULL,
        "entries": entries,
        "not_in_state_dict": {"mean": [3, 1, 1], "std": [3, 1, 1]},
        "num_params": num_params,
        "state_dict": layouts[0],
    }


def seeded_small(activation_fn):
    """The small network with every parameter N(0, 0.05), batch-norm affine parameters U(0.5, 1.5) / U(-0.2, 0.2),
    and running statistics measured on 64 random images (so that activations stay O(1) through the depth and the
    logits depend visibly on the input)."""
    torch.manual_seed(0)
    network = dm.DMWideResNet(**{**SMALL, "mean": tuple(SMALL["mean"]), "std": tuple(SMALL["std"])},
                              activation_fn=activation_fn)
    norms = [module for module in network.modules() if isinstance(module, nn.BatchNorm2d)]
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0.0, 0.05)
        for module in norms:
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)
            module.momentum = None  # cumulative average: the running statistics of exactly these images
        network.train()(torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    for module in norms:
        module.momentum = 0.1
    return network.eval()


def output_and_gradient(network, x, cotangent):
    x = x.clone().requires_grad_(True)
    out = network(x)
    (grad,) = torch.autograd.grad((out * cotangent).sum(), x)
    return out.detach(), grad


def small_fixture():
    swish = seeded_small(dm.Swish)
    silu = seeded_small(nn.SiLU)
    silu.load_state_dict(swish.state_dict())  # the same weights under the other activation
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 32, 32, generator=generator)
    cotangent = torch.randn(4, 10, generator=generator)
    out_swish, grad_swish = output_and_gradient(swish, x, cotangent)
    out_silu, grad_silu = output_and_gradient(silu, x, cotangent)
    return {"config": SMALL, "state_dict": swish.state_dict(), "x": x, "cotangent": cotangent,
            "out_swish": out_swish, "grad_swish": grad_swish, "out_silu": out_silu, "grad_silu": grad_silu}


def main(folder):
    folder = Path(folder)
    (folder / "robustbench_cifar10_dm_wrn70_16.json").write_text(json.dumps(manifest(), indent=0) + "\n")
    torch.save(small_fixture(), folder / "robustbench_dm_wrn_small.pt")


if __name__ == "__main__":
    main(sys.argv[1])
