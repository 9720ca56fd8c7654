"""Rehearsal writers of the Hugging Face / diffusers / timm / torchvision checkpoints (diffrobust.rehearsal.hub):
each writes the registry entry's files into a folder, the project's real loader reads them, and one forward on a
tiny input gives finite outputs of the right shape. Official sizes are written for the cheap networks and asserted;
the big ones are written reduced, and their official counts are checked on the meta device."""

import json

import pytest
import torch

from diffrobust import models
from diffrobust.config import load_checkpoint_registry
from diffrobust.rehearsal import hub

REGISTRY = load_checkpoint_registry()


def write(name, root, reduced=False, seed=0):
    entry = REGISTRY[name]
    key = (entry.get("architecture") or {}).get("family", name)
    record = hub.WRITERS[key](entry, root / name, seed=seed, reduced=reduced)
    for file_entry in entry["files"]:
        assert (root / name / file_entry["path"]).is_file(), file_entry["path"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging folder left
    return entry, record


def test_writers_cover_every_hub_format_entry():
    keys = {(entry.get("architecture") or {}).get("family", name) for name, entry in REGISTRY.items()}
    assert set(hub.WRITERS) <= keys
    assert {"hf_vit", "timm_beit", "hf_clip_vision", "stable_diffusion_v1_4", "deepfloyd_if_stage2_large",
            "stable_diffusion_x4_upscaler", "torchvision_alexnet", "pytorch_fid_inception"} == set(hub.WRITERS)


def test_vit_b16_official_size_loads_through_the_registry_loader(tmp_path):
    entry, record = write("vit_b16_cifar10", tmp_path)
    assert record["num_params"] == 86_567_656 - 990 * 769 and record["reduced"] is None
    weights = torch.load(tmp_path / "vit_b16_cifar10" / "pytorch_model.bin", weights_only=True)
    assert "vit.encoder.layer.11.attention.attention.query.weight" in weights  # the 2022 transformers names
    loaded = models.load_registry_checkpoint("vit_b16_cifar10", tmp_path, registry=REGISTRY)
    assert json.loads((tmp_path / "vit_b16_cifar10" / "preprocessor_config.json").read_text())["size"] == 224
    with torch.no_grad():
        logits = models.classifier(loaded)(torch.rand(1, 3, 32, 32))
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()


def test_clip_b32_official_size_loads_its_image_encoder(tmp_path):
    from diffrobust.networks.pretrained import load_hf_clip_vision

    entry, record = write("clip_vit_base_patch32", tmp_path)
    assert record["num_params"] == 151_277_313  # openai/clip-vit-base-patch32, both towers
    encoder = load_hf_clip_vision(entry["architecture"]["config"], tmp_path / "clip_vit_base_patch32").eval()
    assert hub.count_parameters(encoder) == 87_849_216  # the image tower with its 768 x 512 projection
    with torch.no_grad():
        features = encoder(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 512) and torch.isfinite(features).all()


def test_alexnet_and_fid_inception_official_sizes_load_through_their_loaders(tmp_path):
    from diffrobust.networks.pretrained import load_fid_inception, load_lpips_alex

    entry, record = write("torchvision_alexnet", tmp_path)
    assert record["num_params"] == 61_100_840
    lpips = load_lpips_alex(tmp_path / "torchvision_alexnet" / entry["files"][0]["path"])
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        distance = lpips(x, x.flip(-1)).flatten()
    assert distance.shape == (2,) and torch.isfinite(distance).all() and (distance > 0).all()

    entry, record = write("pytorch_fid_inception", tmp_path)
    assert record["num_params"] == 23_850_960
    extractor = load_fid_inception(tmp_path / "pytorch_fid_inception" / entry["files"][0]["path"])
    with torch.no_grad():
        features = extractor(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()


def test_beit_reduced_loads_with_the_architecture_it_returns_and_official_count_on_meta(tmp_path):
    import timm

    entry, record = write("beit_large_patch16_512_imagenet", tmp_path, reduced=True)
    assert "depth 24 -> 4" in record["reduced"]
    registry = {**REGISTRY, "beit_large_patch16_512_imagenet": {**entry, "architecture": record["architecture"]}}
    loaded = models.load_registry_checkpoint("beit_large_patch16_512_imagenet", tmp_path, registry=registry)
    assert hub.count_parameters(loaded.network) == record["num_params"]
    with torch.no_grad():
        logits = models.classifier(loaded)(torch.rand(1, 3, 16, 16))  # resized to 512 inside
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    # the unreduced writer builds exactly the registry's network: timm's BEiT-L/16 at 512, 305.7 M
    with torch.device("meta"):
        official = timm.create_model("beit_large_patch16_512", pretrained=False, num_classes=1000)
    assert hub.count_parameters(official) == 305_674_728


def test_synthetic_clip_tokenizer_has_the_official_size_and_special_ids(tmp_path):
    from transformers import CLIPTokenizer

    hub.write_clip_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    ids = tokenizer("a photo of a dog, 1999!", padding="max_length", max_length=77).input_ids
    assert len(tokenizer) == hub.CLIP_VOCAB_SIZE
    assert ids[0] == 49406 and 49407 in ids and len(ids) == 77 and max(ids) == 49407


def test_official_diffusers_sizes_on_the_meta_device():
    counts = hub.official_parameter_counts()
    # Stable Diffusion v1.4's published sizes: UNet 859.52 M, VAE 83.65 M, CLIP ViT-L/14 text 123.06 M
    assert counts["stable_diffusion_v1_4"] == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert counts["stable_diffusion_x4_upscaler"]["text_encoder"] == 340_387_840  # OpenCLIP ViT-H/14 text
    assert round(counts["stable_diffusion_x4_upscaler"]["unet"] / 1e6) == 473
    assert round(counts["deepfloyd_if_stage2_large"]["unet"] / 1e8) == 12  # approximate: published 1.2 B


def test_stable_diffusion_reduced_loads_through_load_ldm_and_predicts_noise(tmp_path):
    from diffrobust.networks.ldm import load_ldm

    _, record = write("stable_diffusion_v1_4", tmp_path, reduced=True, seed=1)
    assert "UNet channels 320..1280" in record["reduced"] and record["num_params"] < 20_000_000
    ldm = load_ldm(tmp_path / "stable_diffusion_v1_4", prompt="a photo of a cat").eval()
    with torch.no_grad():
        z = ldm.encode(torch.rand(1, 3, 32, 32), torch.Generator().manual_seed(0))
        eps = ldm.eps(z, torch.tensor([10]), ldm.condition(1))
        decoded = ldm.decode(z)
    assert z.shape == (1, 4, 4, 4) and eps.shape == z.shape and torch.isfinite(eps).all()
    assert decoded.shape == (1, 3, 32, 32) and torch.isfinite(decoded).all()


def test_if_stage2_reduced_loads_through_load_if_stage2_and_runs_its_unet(tmp_path):
    from diffrobust.defenses.sdedit import load_if_stage2

    write("deepfloyd_if_stage2_large", tmp_path, reduced=True)
    pipeline, embeds, negative = load_if_stage2(tmp_path / "deepfloyd_if_stage2_large")
    assert embeds.shape == negative.shape == (1, 77, 4096)  # the T5-XXL width the official UNet takes
    assert not torch.equal(embeds, negative)  # the prompt against IF's zero_t5 vector: guidance acts
    x = torch.rand(1, 6, 32, 32)
    with torch.no_grad():
        out = pipeline.unet(x, torch.tensor([50]), encoder_hidden_states=embeds, class_labels=torch.tensor([20])).sample
    assert out.shape == (1, 6, 32, 32) and torch.isfinite(out).all()
    assert pipeline.scheduler.config.variance_type == "learned_range"


def test_x4_upscaler_reduced_loads_through_load_sd_upscaler_and_upscales(tmp_path):
    from diffrobust.defenses.upscaling import NoisyUpscaling, load_sd_upscaler

    write("stable_diffusion_x4_upscaler", tmp_path, reduced=True)
    assert json.loads((tmp_path / "stable_diffusion_x4_upscaler" / "model_index.json").read_text())[
        "max_noise_level"] == 350
    purifier = NoisyUpscaling(load_sd_upscaler(tmp_path / "stable_diffusion_x4_upscaler"), prompt="a photo",
                              num_inference_steps=1)
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = purifier(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_a_failing_writer_leaves_no_half_written_folder_and_keeps_the_previous_one(tmp_path, monkeypatch):
    entry, _ = write("pytorch_fid_inception", tmp_path)
    before = (tmp_path / "pytorch_fid_inception" / entry["files"][0]["path"]).read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hub.torch, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        hub.write_pytorch_fid_inception(entry, tmp_path / "pytorch_fid_inception", seed=1)
    assert [p.name for p in tmp_path.iterdir()] == ["pytorch_fid_inception"]  # no staging folder left
    assert (tmp_path / "pytorch_fid_inception" / entry["files"][0]["path"]).read_bytes() == before
    monkeypatch.undo()
    missing = {**entry, "files": entry["files"] + [{"path": "never_written.json", "urls": []}]}
    with pytest.raises(RuntimeError, match="never_written.json"):
        with hub.atomic_folder(tmp_path / "other", hub.entry_paths(missing)) as staging:
            (staging / entry["files"][0]["path"]).write_bytes(b"x")
    assert not (tmp_path / "other").exists() and len(list(tmp_path.iterdir())) == 1
