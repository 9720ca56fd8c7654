"""The papers' transformer classifiers (HF ViT-B/16 for CIFAR-10, timm BEiT-L/16 for ImageNet): the registry
architectures, the resize + normalise preprocessing, and loading checkpoints in their official on-disk formats."""

import re

import pytest
import torch

from helpers import randomize

from diffrobust import models
from diffrobust.config import load_checkpoint_registry
import numpy as np
from PIL import Image

from diffrobust.networks.pretrained import PILBilinearUint8, ResizeNormalize, preprocess_for, set_preprocess

INPUT = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}
TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "image_size": 32, "patch_size": 16, "num_channels": 3, "num_labels": 10}
TINY_BEIT = {"model_name": "beit_base_patch16_224", "img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2,
             "num_classes": 10}


def images(n=3, size=16, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- architectures of the registry entries ------------------------------------------------------------------------

def test_registry_vit_is_vit_b16_with_a_ten_class_head():
    network = models.build_architecture(load_checkpoint_registry()["vit_b16_cifar10"]["architecture"])
    # ViT-B/16 has 86,567,656 parameters with its 1000-class head; CIFAR-10's head has 990 fewer rows of 768 + 1
    assert sum(p.numel() for p in network.parameters()) == 86_567_656 - 990 * 769
    assert network.network.classifier.out_features == 10
    assert network.preprocess.size == 224


def test_vit_computes_only_the_class_token_in_its_last_layer_with_the_full_forwards_logits_and_gradients():
    # the registry's ViT-B/16 at the pinned transformers is laid out as the shortcut expects, so it is the one used
    assert models.build_architecture(load_checkpoint_registry()["vit_b16_cifar10"]["architecture"]).class_token_only
    classifier = randomize(models.build_architecture({"family": "hf_vit", "config": {**TINY_VIT, "input": INPUT}}),
                           3, 0.2).eval()
    assert classifier.class_token_only
    x = images(4, 32).requires_grad_(True)
    shortcut = classifier(x)
    full = classifier.network(pixel_values=classifier.preprocess(x)).logits
    assert shortcut.shape == (4, 10) and full.abs().max() > 0.1
    assert (shortcut - full).abs().max().item() < 1e-5
    (grad_shortcut,) = torch.autograd.grad(shortcut.square().sum(), x)
    (grad_full,) = torch.autograd.grad(full.square().sum(), x)
    assert (grad_shortcut - grad_full).abs().max().item() < 1e-5 * grad_full.abs().max().item() + 1e-7
    # training mode (dropout) takes the library's own forward
    classifier.train()
    with torch.no_grad():
        assert torch.equal(classifier(x), classifier.network(pixel_values=classifier.preprocess(x)).logits)


def test_registry_beit_is_timms_beit_large_at_512():
    network = models.build_architecture(load_checkpoint_registry()["beit_large_patch16_512_imagenet"]["architecture"])
    assert round(sum(p.numel() for p in network.parameters()) / 1e6, 1) == 305.7  # timm's model card: 305.7 M
    assert network.network.patch_embed.grid_size == (32, 32) and network.preprocess.size == 512


def test_input_block_is_required():
    with pytest.raises(ValueError, match="needs an `input` block"):
        models.build_architecture({"family": "hf_vit", "config": TINY_VIT})


# --- preprocessing ------------------------------------------------------------------------------------------------

def test_resize_normalize_maps_the_unit_interval_to_plus_minus_one_at_the_classifier_size():
    prepare = ResizeNormalize(**{**INPUT, "size": 24})
    constant = torch.full((2, 3, 8, 8), 0.75)
    out = prepare(constant)
    assert out.shape == (2, 3, 24, 24)
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=1e-6)  # (0.75 - 0.5) / 0.5
    assert prepare(torch.zeros(1, 3, 24, 24)).eq(-1).all()  # already at size: normalised only


def test_resize_normalize_antialiases_when_it_shrinks():
    checkerboard = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).float().expand(1, 3, 16, 16)
    out = ResizeNormalize(**{**INPUT, "size": 4})(checkerboard) * 0.5 + 0.5  # back to [0, 1]
    assert (out - 0.5).abs().max() < 0.05  # averaged, not aliased to 0s or 1s


# --- the official on-disk formats ---------------------------------------------------------------------------------

def legacy_vit_names(state_dict):
    """transformers 4.x names, as in the 2022 Hugging Face checkpoints (pytorch_model.bin)."""
    renames = [(r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."), (r"attention\.q_proj", "attention.attention.query"),
               (r"attention\.k_proj", "attention.attention.key"), (r"attention\.v_proj", "attention.attention.value"),
               (r"attention\.o_proj", "attention.output.dense"), (r"mlp\.fc1", "intermediate.dense"),
               (r"mlp\.fc2", "output.dense")]
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def write_vit_folder(folder, reference, drop=None):
    folder.mkdir(parents=True)
    reference.network.config.to_json_file(folder / "config.json")
    weights = legacy_vit_names(reference.network.state_dict())
    assert "vit.encoder.layer.1.attention.attention.query.weight" in weights
    if drop:
        weights.pop(drop)
    torch.save(weights, folder / "pytorch_model.bin")


def vit_registry(config=TINY_VIT):
    return {"tiny_vit": {"files": [{"path": "config.json", "urls": []}, {"path": "pytorch_model.bin", "urls": []}],
                         "architecture": {"family": "hf_vit", "config": {**config, "input": INPUT}}}}


def test_hf_vit_loads_a_legacy_checkpoint_folder_and_classifies_unit_interval_images(tmp_path):
    reference = randomize(models.build_architecture(vit_registry()["tiny_vit"]["architecture"]), 0, 0.1).eval()
    write_vit_folder(tmp_path / "tiny_vit", reference)
    loaded = models.load_registry_checkpoint("tiny_vit", tmp_path, registry=vit_registry())
    assert loaded.kind == "classifier"
    x = images()  # 16 px, resized to the classifier's 32
    with torch.no_grad():
        logits = models.classifier(loaded)(x)
        expected = reference.network(pixel_values=(torch.nn.functional.interpolate(
            x, size=(32, 32), mode="bicubic", antialias=True) - 0.5) / 0.5).logits
    assert logits.shape == (3, 10)
    assert (logits - expected).abs().max().item() < 1e-5


def test_hf_vit_refuses_missing_weights_and_a_config_that_disagrees_with_the_registry(tmp_path):
    reference = randomize(models.build_architecture(vit_registry()["tiny_vit"]["architecture"]), 0, 0.1).eval()
    write_vit_folder(tmp_path / "tiny_vit", reference, drop="classifier.weight")
    with pytest.raises(models.ModelFileError, match="missing_keys"):
        models.load_registry_checkpoint("tiny_vit", tmp_path, registry=vit_registry())
    write_vit_folder(tmp_path / "other" / "tiny_vit", reference)
    with pytest.raises(models.ModelFileError, match="hidden_size = 32, but the registry"):
        models.load_registry_checkpoint("tiny_vit", tmp_path / "other", registry=vit_registry({**TINY_VIT, "hidden_size": 64}))
    (tmp_path / "other" / "tiny_vit" / "pytorch_model.bin").unlink()
    with pytest.raises(models.CheckpointNotFoundError, match="pytorch_model.bin not found"):
        models.load_registry_checkpoint("tiny_vit", tmp_path / "other", registry=vit_registry())


def test_timm_beit_loads_a_unilm_checkpoint_with_its_position_index_buffers(tmp_path):
    registry = {"tiny_beit": {"files": [{"path": "beit.pth", "urls": []}],
                              "architecture": {"family": "timm_beit", "config": {**TINY_BEIT, "input": INPUT}}}}
    reference = randomize(models.build_architecture(registry["tiny_beit"]["architecture"]), 0, 0.1).eval()
    # unilm saves {"model": state_dict} including the relative-position index buffers that timm does not persist
    weights = dict(reference.network.state_dict())
    weights.update({name: buffer for name, buffer in reference.network.named_buffers() if "relative_position_index" in name})
    assert any("relative_position_index" in key for key in weights)
    (tmp_path / "tiny_beit").mkdir()
    torch.save({"model": weights}, tmp_path / "tiny_beit" / "beit.pth")
    loaded = models.load_registry_checkpoint("tiny_beit", tmp_path, registry=registry)
    x = images(size=32)
    with torch.no_grad():
        assert (models.classifier(loaded)(x) - reference(x)).abs().max().item() < 1e-5
    weights.pop("head.weight")
    torch.save({"model": weights}, tmp_path / "tiny_beit" / "beit.pth")
    with pytest.raises(models.ModelFileError, match="head.weight"):
        models.load_registry_checkpoint("tiny_beit", tmp_path, registry=registry)


# --- DensePure's preprocessing (classifier_preprocess: densepure) --------------------------------------------------

@pytest.mark.parametrize("shape, size", [((4, 3, 32, 32), 224), ((2, 3, 17, 23), 40), ((1, 1, 32, 32), 16)])
def test_densepure_cifar_path_is_pil_bilinear_on_truncated_uint8_to_the_last_bit(shape, size):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(4))
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.999])  # the ends of the range truncate to 0, 255, 254
    pixels = (x.numpy() * 255).astype(np.uint8)  # DensePure: (x * 255).astype(np.uint8), then PIL
    expected = np.stack([np.array(Image.fromarray(image.transpose(1, 2, 0).squeeze(-1) if shape[1] == 1 else
                                                  image.transpose(1, 2, 0)).resize((size, size), Image.BILINEAR))
                         .reshape(size, size, shape[1]).transpose(2, 0, 1) for image in pixels])
    ours = PILBilinearUint8(size, [0.5] * shape[1], [0.5] * shape[1])(x) * 0.5 + 0.5
    assert torch.equal(torch.round(ours * 255).to(torch.uint8), torch.from_numpy(expected))


def test_densepure_imagenet_path_is_bicubic_without_antialias():
    x = images(2, size=16)
    spec = {**INPUT, "size": 40}
    densepure = preprocess_for("timm_beit", spec, "densepure")(x)
    plain = (torch.nn.functional.interpolate(x, size=(40, 40), mode="bicubic", align_corners=False) - 0.5) / 0.5
    assert torch.allclose(densepure, plain, atol=1e-6)
    carlini = preprocess_for("timm_beit", spec, "carlini")(x)
    assert (carlini - densepure).abs().max() > 1e-3  # the antialiased kernel is another one, even upsampling


def test_set_preprocess_switches_a_pretrained_classifier_and_refuses_others():
    architecture = {"family": "hf_vit", "config": {**TINY_VIT, "input": INPUT}}
    network = randomize(models.build_architecture(architecture), seed=2).eval()
    x = images(2, size=16)
    carlini = network(x)
    set_preprocess(network, architecture, "densepure")
    assert isinstance(network.preprocess, PILBilinearUint8)
    assert (network(x) - carlini).abs().max() > 1e-4
    resnet = {"family": "small_resnet", "config": {"in_channels": 3, "num_classes": 10, "width": 8, "depth": 8}}
    small = models.build_architecture(resnet)
    assert set_preprocess(small, resnet, "carlini") is small
    with pytest.raises(ValueError, match="takes images as they are"):
        set_preprocess(small, resnet, "densepure")
