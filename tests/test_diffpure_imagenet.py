"""DiffPure on ImageNet (issue 22, item 3): the paper's ImageNet classifiers load their official state-dict formats
and see images as DiffPure feeds them (bilinear 256 -> 224, ImageNet normalisation), the imagenet preset plans
the DiffPure jobs at t* = 0.15 and l-inf 4/255, and the purifier with a guided-diffusion UNet runs t*·N steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from diffrobust.models import load_registry_checkpoint
from diffrobust.networks import build_network

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = yaml.safe_load((ROOT / "config/checkpoints.yaml").read_text())
DIFFPURE_CLASSIFIERS = ("torchvision_resnet50_imagenet", "torchvision_wide_resnet50_2_imagenet",
                        "deit_small_patch16_224_imagenet")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_registry(tmp_path, name, architecture, contents):
    """A one-entry registry for `architecture` whose weight file holds `contents`, saved with torch.save."""
    entry = dict(REGISTRY[name], architecture=architecture)
    (tmp_path / name).mkdir(parents=True)
    torch.save(contents, tmp_path / name / entry["files"][-1]["path"])
    return {name: entry}


def test_registry_entries_are_diffpures_classifiers_with_its_input():
    for name in DIFFPURE_CLASSIFIERS:
        config = REGISTRY[name]["architecture"]["config"]
        assert config["input"] == {"size": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                   "interpolation": "bilinear", "antialias": False}
    assert REGISTRY["torchvision_resnet50_imagenet"]["files"][0]["urls"] == [
        "https://download.pytorch.org/models/resnet50-0676ba61.pth"]
    assert REGISTRY["deit_small_patch16_224_imagenet"]["files"][0]["urls"] == [
        "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth"]


def test_official_architectures_have_the_official_parameter_counts():
    """Built on the meta device (no memory): torchvision's and timm's published parameter counts."""
    expected = {"torchvision_resnet50_imagenet": 25_557_032, "torchvision_wide_resnet50_2_imagenet": 68_883_240,
                "deit_small_patch16_224_imagenet": 22_050_664}
    with torch.device("meta"):
        for name, count in expected.items():
            network = build_network(REGISTRY[name]["architecture"])
            assert sum(p.numel() for p in network.parameters()) == count, name


def test_torchvision_classifier_loads_a_torchvision_state_dict_and_preprocesses_as_diffpure(tmp_path):
    import torchvision

    name = "torchvision_resnet50_imagenet"
    architecture = {"family": "torchvision_classifier",
                    "config": {**REGISTRY[name]["architecture"]["config"], "num_classes": 7}}
    torch.manual_seed(0)
    official = torchvision.models.resnet50(weights=None, num_classes=7).eval()
    registry = tiny_registry(tmp_path, name, architecture, official.state_dict())
    loaded = load_registry_checkpoint(name, tmp_path, registry=registry)
    assert loaded.kind == "classifier"
    x256 = torch.rand(2, 3, 256, 256)
    # DiffPure: x (224) -> bilinear to 256 for purification -> bilinear back to 224, then (x - mu) / sigma
    x224 = F.interpolate(x256, size=(224, 224), mode="bilinear", align_corners=False)
    pixels = loaded.network.preprocess(x256)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert pixels.shape == (2, 3, 224, 224)
    assert torch.allclose(pixels, (x224 - mean) / std, atol=1e-6)
    antialiased = F.interpolate(x256, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    assert not torch.allclose(pixels, (antialiased - mean) / std, atol=1e-3)  # the antialiased resize is another
    with torch.no_grad():
        assert torch.allclose(loaded.network(x256), official((x224 - mean) / std), atol=1e-5)


def test_timm_deit_loads_the_deit_release_format(tmp_path):
    import timm

    name = "deit_small_patch16_224_imagenet"
    config = {**REGISTRY[name]["architecture"]["config"], "num_classes": 5, "embed_dim": 24, "depth": 1,
              "num_heads": 2}
    torch.manual_seed(0)
    official = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=5, embed_dim=24, depth=1,
                                 num_heads=2).eval()
    registry = tiny_registry(tmp_path, name, {"family": "timm_deit", "config": config},
                             {"model": official.state_dict()})  # facebookresearch/deit's checkpoint layout
    loaded = load_registry_checkpoint(name, tmp_path, registry=registry)
    x256 = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(loaded.network(x256), official(loaded.network.preprocess(x256)), atol=1e-5)


def test_a_state_dict_of_another_architecture_is_refused_naming_the_file(tmp_path):
    import torchvision
    from diffrobust.models import ModelFileError

    name = "torchvision_wide_resnet50_2_imagenet"
    architecture = {"family": "torchvision_classifier",
                    "config": {**REGISTRY[name]["architecture"]["config"], "num_classes": 3}}
    registry = tiny_registry(tmp_path, name, architecture,
                             torchvision.models.resnet50(weights=None, num_classes=3).state_dict())
    with pytest.raises(ModelFileError, match="wide_resnet50_2-95faca4d.pth"):
        load_registry_checkpoint(name, tmp_path, registry=registry)


def test_imagenet_preset_plans_diffpure_at_tstar_015_and_eps_4_over_255():
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--config", "preset=imagenet"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    out = result.stdout + result.stderr
    assert "results/imagenet/reports/diffpure_table.html" in out
    assert "results/imagenet/attacks/diffpure/rand/linf/shard7.npz" in out
    assert "results/imagenet/attacks/diffpure/standard/linf/shard0.npz" in out
    assert "/l2/" not in out  # DiffPure's ImageNet table is l-inf only
    assert "data/checkpoints/torchvision_resnet50_imagenet/resnet50-0676ba61.pth" in out
    settings = [json.loads(line.split("--settings ", 1)[1].split(" --", 1)[0].strip("'"))
                for line in out.splitlines() if "attacks/diffpure/rand/linf" in line and "--settings" in line]
    parameters = [line for line in out.splitlines() if '"diffpure_table":' in line or "diffpure_table.py" in line]
    text = settings or parameters
    assert text, "no diffpure job or report carries its settings"
    joined = json.dumps(settings) if settings else "\n".join(parameters)
    assert '"t_star": 0.15' in joined or '"t_star":0.15' in joined
    assert '"eps": 0.015686' in joined or '"eps":0.015686' in joined


class CountingEps(torch.nn.Module):
    def __init__(self, network):
        super().__init__()
        self.network, self.calls = network, []

    def forward(self, x_t, t_model, y=None):
        self.calls.append(t_model.flatten()[0].item())
        return self.network(x_t, t_model)  # learn_sigma: eps and the variance channels, as the stage passes them


@pytest.mark.parametrize("variant, expected_calls", [("ddpm", 150), ("sde", 150)])
def test_purifier_with_a_tiny_guided_diffusion_unet_runs_tstar_015(variant, expected_calls):
    from diffrobust.defenses.diffpure import DiffPurePurifier
    from diffrobust.models import build_diffusion, registry_diffusion_settings

    architecture = {"family": "guided_diffusion_unet",
                    "config": {**REGISTRY["guided_diffusion_256_uncond"]["architecture"]["config"],
                               "image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
                               "attention_resolutions": "8", "num_head_channels": 16}}
    torch.manual_seed(0)
    eps = CountingEps(build_network(architecture).eval())
    schedule = build_diffusion(registry_diffusion_settings(architecture))
    purifier = DiffPurePurifier(eps, t_star=0.15, variant=variant, schedule=schedule, num_timesteps=1000)
    assert purifier.network_evaluations() == expected_calls
    with torch.no_grad():
        out = purifier(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    assert len(eps.calls) == expected_calls
    if variant == "ddpm":  # the model's own chain from level 149 down to 0
        assert eps.calls[0] == 149 and eps.calls[-1] == 0


@pytest.mark.parametrize("name, reduced_config", [
    ("torchvision_resnet50_imagenet", {"width_per_group": 8}),
    ("torchvision_wide_resnet50_2_imagenet", {"width_per_group": 8}),
    ("deit_small_patch16_224_imagenet", {"embed_dim": 96, "num_heads": 2}),
])
def test_rehearsal_writer_output_loads_through_the_loader(tmp_path, name, reduced_config):
    """Reduced here (2 CPU cores); the official size is the same code with the registry's config, whose parameter
    count test_official_architectures_have_the_official_parameter_counts checks."""
    from diffrobust.rehearsal.imagenet_classifiers import WRITERS

    entry = REGISTRY[name]
    architecture = entry["architecture"]
    written = WRITERS[architecture["family"]](entry, tmp_path / name, seed=3, reduced=True)
    assert written["reduced"] and "official" in written["reduced"]
    reduced_entry = dict(entry, architecture={**architecture, "config": {**architecture["config"], **reduced_config}})
    loaded = load_registry_checkpoint(name, tmp_path, registry={name: reduced_entry})
    assert sum(p.numel() for p in loaded.network.parameters()) == written["num_params"]
    assert not list((tmp_path / name).glob("*.partial"))
    with torch.no_grad():
        assert loaded.network(torch.rand(1, 3, 256, 256)).shape == (1, 1000)


def test_rehearsal_writer_at_official_size_loads_as_the_registry_entry(tmp_path):
    from diffrobust.rehearsal.imagenet_classifiers import WRITERS

    name = "torchvision_resnet50_imagenet"
    written = WRITERS["torchvision_classifier"](REGISTRY[name], tmp_path / name, seed=0)
    assert written == {"num_params": 25_557_032, "reduced": None}
    loaded = load_registry_checkpoint(name, tmp_path, registry={name: REGISTRY[name]})
    torch.manual_seed(0)
    import torchvision
    reference = torchvision.models.resnet50(weights=None)  # same seed, same construction order as torchvision's
    assert torch.equal(loaded.network.network.conv1.weight, reference.conv1.weight)
