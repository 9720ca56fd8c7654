"""Rehearsal writers of the Hugging Face / diffusers / timm / torchvision-format checkpoints.

Each writer makes, offline, every file that config/checkpoints.yaml lists for one checkpoint (the exact names of
its `files:`), in the publisher's on-disk format and layout, with random weights drawn from a seed, so that the
project's real loaders read them unchanged: `networks.pretrained` (`load_hf_vit`, `load_hf_clip_vision`,
`load_lpips_alex`, `load_fid_inception`, the timm BEiT state-dict filter), `networks.ldm.load_ldm`,
`defenses.sdedit.load_if_stage2` and `defenses.upscaling.load_sd_upscaler`.

Sizes. `reduced=False` builds the official architecture (the registry entry's `architecture.config` where it has
one, else the publisher's config.json values, held here as data; each writer's docstring states its parameter
count). `reduced=True` keeps the family, file names, file formats and loader and shrinks widths/depths, for the
networks a 2-core CPU rehearsal cannot run (Stable Diffusion, IF-II-L, BEiT-L/512, the x4 upscaler); the returned
`reduced` line says what was shrunk. The small networks ignore `reduced` (they are official either way).

Tokenizers. The CLIP tokenizer files (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) are
a synthetic byte-level BPE vocabulary with the official size and id layout (49,408 tokens: the 256 byte symbols,
the same with `</w>`, 48,894 merges, then <|startoftext|> = 49406 and <|endoftext|> = 49407), so every prompt
tokenizes and the text encoder's end-of-text pooling finds the same ids; the merges are two-symbol pairs, not
OpenAI's learned ones, so a word's token ids differ from the real tokenizer's.

Interface (the rehearsal driver's): `WRITERS[key](entry, folder, seed=..., reduced=...)` with key the entry's
`architecture.family` if it has one, else the checkpoint name. It returns {'num_params': int, 'reduced': None or one
line, 'architecture': the registry `architecture` block the files match (the entry's own unless a reduced BEiT
changed it; None for entries without one)}. Files are written to a temporary sibling folder that is renamed onto
`folder` only when complete, so a failed writer leaves nothing half-written.
"""

import contextlib
import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch

# --- shared helpers ------------------------------------------------------------------------------------------------


def count_parameters(*modules):
    """Total number of parameters of the given modules."""
    return sum(parameter.numel() for module in modules for parameter in module.parameters())


@contextlib.contextmanager
def seeded(seed):
    """Draw the weights built inside from `seed` without touching the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def atomic_folder(folder, expected):
    """Yield a temporary folder beside `folder`; on success check that every path in `expected` was written, then
    put it in place of `folder` (an older copy is replaced). On any error the temporary folder is removed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield staging
        missing = [path for path in expected if not (staging / path).is_file()]
        if missing:
            raise RuntimeError(f"rehearsal writer for {folder.name} did not write {', '.join(missing)} (a bug in "
                               "diffrobust.rehearsal.hub: its layout no longer matches config/checkpoints.yaml)")
        previous = None
        if folder.exists():
            previous = folder.parent / f"{staging.name}.old"
            folder.rename(previous)
        staging.rename(folder)
        if previous is not None:
            shutil.rmtree(previous)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def entry_paths(entry):
    """The file paths (relative to the checkpoint folder) a registry entry lists."""
    return [file_entry["path"] for file_entry in entry["files"]]


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def result(num_params, reduced, entry, architecture=None):
    return {"num_params": int(num_params), "reduced": reduced,
            "architecture": architecture if architecture is not None else copy.deepcopy(entry.get("architecture"))}


def registry_config(entry):
    """The entry's architecture config without the classifier `input` block (its preprocessing, not a model field)."""
    config = dict(entry["architecture"]["config"])
    config.pop("input", None)
    return config


# --- CLIP BPE tokenizer files ---------------------------------------------------------------------------------------

CLIP_VOCAB_SIZE = 49408
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def byte_symbols():
    """GPT-2/CLIP's reversible byte -> unicode table (printable Latin-1 bytes stand for themselves, the others are
    shifted past 255), in CLIP's vocabulary order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def synthetic_clip_bpe():
    """(vocab dict, merges list) of a CLIP-layout BPE vocabulary of CLIP_VOCAB_SIZE tokens (module docstring)."""
    symbols = byte_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    n_merges = CLIP_VOCAB_SIZE - len(tokens) - 2
    merges = []
    for first in symbols:
        for second in symbols:
            merges.append((first, second + "</w>"))
            merges.append((first, second))
            if len(merges) >= n_merges:
                break
        if len(merges) >= n_merges:
            break
    tokens += ["".join(pair) for pair in merges] + [CLIP_BOS, CLIP_EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_tokenizer(folder, pad_token=CLIP_EOS, model_max_length=77):
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json of a CLIPTokenizer in `folder`.
    pad_token: SD v1's tokenizer pads with <|endoftext|>, the SD 2 family's (x4 upscaler) with "!"."""
    vocab, merges = synthetic_clip_bpe()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": pad_token}
    write_json(folder / "special_tokens_map.json", special)
    write_json(folder / "tokenizer_config.json", {**special, "model_max_length": model_max_length,
                                                  "do_lower_case": True, "errors": "replace",
                                                  "add_prefix_space": False, "tokenizer_class": "CLIPTokenizer"})


def clip_text_model(config):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**config))


# --- Hugging Face ViT (aaraki/vit-base-patch16-224-in21k-finetuned-cifar10) -----------------------------------------

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# transformers 5 names -> the transformers 4.x names of the 2022 pytorch_model.bin (transformers renames them back)
LEGACY_VIT_RENAMES = [(".layers.", ".encoder.layer."), ("attention.q_proj", "attention.attention.query"),
                      ("attention.k_proj", "attention.attention.key"),
                      ("attention.v_proj", "attention.attention.value"),
                      ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                      ("mlp.fc2", "output.dense")]


def legacy_vit_state_dict(state_dict):
    renamed = {}
    for key, value in state_dict.items():
        for new, old in LEGACY_VIT_RENAMES:
            key = key.replace(new, old)
        renamed[key] = value
    return renamed


def write_hf_vit(entry, folder, *, seed, reduced=False):
    """config.json, preprocessor_config.json and pytorch_model.bin (a torch pickle with transformers 4.x weight
    names) of a ViTForImageClassification. Official (the registry's ViT-B/16, 224 px, 10 classes): 85,806,346
    parameters. Always official (cheap enough)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = registry_config(entry)
    labels = dict(enumerate(CIFAR10_CLASSES)) if config.get("num_labels") == 10 else None
    extra = {"id2label": labels, "label2id": {v: k for k, v in labels.items()}} if labels else {}
    spec = entry["architecture"]["config"]["input"]
    with seeded(seed):
        network = ViTForImageClassification(ViTConfig(**config, **extra))
    with atomic_folder(folder, entry_paths(entry)) as staging:
        network.config.to_json_file(staging / "config.json")
        write_json(staging / "preprocessor_config.json",
                   {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
                    "image_mean": spec["mean"], "image_std": spec["std"], "resample": 2, "size": spec["size"]})
        torch.save(legacy_vit_state_dict(network.state_dict()), staging / "pytorch_model.bin")
    return result(count_parameters(network), None, entry)


# --- CLIP ViT-B/32 (openai/clip-vit-base-patch32) -----------------------------------------------------------------

CLIP_B32_TEXT = {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 12,
                 "max_position_embeddings": 77, "vocab_size": CLIP_VOCAB_SIZE, "hidden_act": "quick_gelu",
                 "projection_dim": 512, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def write_hf_clip_vision(entry, folder, *, seed, reduced=False):
    """config.json and model.safetensors of the whole CLIPModel (text and image towers, as openai/clip-vit-base-
    patch32 ships them); the loader reads the image tower. 151,277,313 parameters (87,849,216 in the image tower
    with its projection). Always official."""
    from transformers import CLIPConfig, CLIPModel

    vision = {**registry_config(entry), "hidden_act": "quick_gelu"}
    config = CLIPConfig(text_config=CLIP_B32_TEXT, vision_config=vision, projection_dim=vision["projection_dim"])
    with seeded(seed):
        network = CLIPModel(config)
    with atomic_folder(folder, entry_paths(entry)) as staging:
        network.save_pretrained(staging, safe_serialization=True)
    return result(count_parameters(network), None, entry)


# --- timm BEiT-L/16 at 512 px (microsoft/unilm .pth) ----------------------------------------------------------------

BEIT_REDUCED = {"embed_dim": 128, "depth": 4, "num_heads": 4}


def write_timm_beit(entry, folder, *, seed, reduced=False):
    """The unilm `.pth`: {"model": state_dict} with the relative-position index buffers unilm saves (timm's filter
    drops them). Official (timm beit_large_patch16_512, 1000 classes): 305,674,728 parameters. reduced: width
    1024 -> 128, depth 24 -> 4, heads 16 -> 4 at the same 512 px / patch 16 (1,025 tokens); the returned
    architecture carries these as timm keyword arguments, which the registry's config must then hold."""
    import timm

    architecture = copy.deepcopy(entry["architecture"])
    if reduced:
        architecture["config"].update(BEIT_REDUCED)
    config = registry_config({"architecture": architecture})
    name = config.pop("model_name")
    with seeded(seed):
        network = timm.create_model(name, pretrained=False, **config)
    weights = dict(network.state_dict())
    weights.update({key: buffer for key, buffer in network.named_buffers() if "relative_position_index" in key})
    (path,) = entry_paths(entry)
    with atomic_folder(folder, [path]) as staging:
        torch.save({"model": weights}, staging / path)
    line = (f"BEiT width 1024 -> {BEIT_REDUCED['embed_dim']}, depth 24 -> {BEIT_REDUCED['depth']}, heads 16 -> "
            f"{BEIT_REDUCED['num_heads']} (512 px, patch 16 kept)") if reduced else None
    return result(count_parameters(network), line, entry, architecture)


# --- Stable Diffusion v1.4 (CompVis/stable-diffusion-v1-4, diffusers layout) ---------------------------------------

SD14_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
             "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "downsample_padding": 1,
             "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False, "mid_block_scale_factor": 1}
SD14_VAE = {"sample_size": 512, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "act_fn": "silu", "norm_num_groups": 32,
            "scaling_factor": 0.18215}
# openai/clip-vit-large-patch14's text tower, as SD v1.4's text_encoder/config.json has it
CLIP_L14_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                 "max_position_embeddings": 77, "vocab_size": CLIP_VOCAB_SIZE, "hidden_act": "quick_gelu",
                 "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
SD14_SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None}
# reduced: the same blocks, narrow (channels divisible by the 32 norm groups), and a 2-layer text tower
SD14_REDUCED = {"unet": {"block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 64},
                "vae": {"block_out_channels": [32, 32, 64, 64]},
                "text": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2,
                         "projection_dim": 64}}


def stable_diffusion_configs(reduced=False):
    """(unet, vae, text encoder) configs of SD v1.4, official or reduced."""
    unet, vae, text = dict(SD14_UNET), dict(SD14_VAE), dict(CLIP_L14_TEXT)
    if reduced:
        unet.update(SD14_REDUCED["unet"])
        vae.update(SD14_REDUCED["vae"])
        text.update(SD14_REDUCED["text"])
    return unet, vae, text


def write_stable_diffusion_v1_4(entry, folder, *, seed, reduced=False):
    """vae/, unet/ (config.json + diffusion_pytorch_model.safetensors), scheduler/ (SD's PNDM config), text_encoder/
    (config.json + model.safetensors) and tokenizer/ (the synthetic CLIP BPE files). Official: 1,066,235,307
    parameters (UNet 859,520,964, VAE 83,653,863, CLIP ViT-L/14 text 123,060,480). reduced: UNet channels
    320..1280 -> 32..64, VAE 128..512 -> 32..64, text encoder 12 x 768 -> 2 x 64 (cross-attention 64); same
    blocks, tokenizer and latent size."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config, vae_config, text_config = stable_diffusion_configs(reduced)
    with seeded(seed):
        unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
        text_encoder = clip_text_model(text_config)
    with atomic_folder(folder, entry_paths(entry)) as staging:
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        vae.save_pretrained(staging / "vae", safe_serialization=True)
        text_encoder.save_pretrained(staging / "text_encoder", safe_serialization=True)
        write_clip_tokenizer(staging / "tokenizer")
        write_json(staging / "scheduler" / "scheduler_config.json", SD14_SCHEDULER)
    line = ("UNet channels 320..1280 -> 32..64, VAE 128..512 -> 32..64, CLIP text 12 x 768 -> 2 x 64"
            if reduced else None)
    return result(count_parameters(unet, vae, text_encoder), line, entry)


# --- DeepFloyd IF stage II (IF-II-L-v1.0: unet/ and the two schedulers; no T5) ---------------------------------------

# APPROXIMATE: IF-II-L's unet/config.json is gated and could not be read here. The structure is what diffusers'
# scripts/convert_if.py makes of IF's stage-II SuperResUNetModel (5 levels, ResNet up/down-sampling blocks, simple
# cross-attention at the two lowest resolutions, per-level layers 2, 2, 3, 5, 5, T5-XXL states of width 4096
# projected by encoder_hid_proj, the noise level as a timestep class embedding, scale-shift norm, GELU); the
# widths are chosen so that the UNet has about the published 1.2B parameters (this gives 1,182,337,798).
IF2_UNET = {"sample_size": 256, "in_channels": 6, "out_channels": 6, "layers_per_block": [2, 2, 3, 5, 5],
            "block_out_channels": [128, 256, 512, 1024, 1280],
            "down_block_types": ["ResnetDownsampleBlock2D"] * 3 + ["SimpleCrossAttnDownBlock2D"] * 2,
            "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
            "up_block_types": ["SimpleCrossAttnUpBlock2D"] * 2 + ["ResnetUpsampleBlock2D"] * 3,
            "cross_attention_dim": 1280, "encoder_hid_dim": 4096, "attention_head_dim": 64,
            "addition_embed_type": "text", "addition_embed_type_num_heads": 64, "cross_attention_norm": "group_norm",
            "resnet_time_scale_shift": "scale_shift", "act_fn": "gelu", "class_embed_type": "timestep",
            "mid_block_scale_factor": 1.414, "time_embedding_act_fn": "gelu", "time_embedding_dim": 512}
# diffusers' scripts/convert_if.py (stage II)
IF2_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                 "variance_type": "learned_range", "prediction_type": "epsilon", "thresholding": True,
                 "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.0}
IF2_NOISING_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000,
                         "beta_schedule": "squaredcos_cap_v2"}
# reduced: the same levels and blocks, 1 or 2 layers each, narrow; the T5 width 4096 kept (the prompt-embedding file)
IF2_REDUCED = {"layers_per_block": [1, 1, 1, 1, 1], "block_out_channels": [32, 32, 64, 64, 64],
               "cross_attention_dim": 64, "attention_head_dim": 16, "addition_embed_type_num_heads": 4,
               "time_embedding_dim": 128}


def if_stage2_config(reduced=False):
    return {**IF2_UNET, **(IF2_REDUCED if reduced else {})}


def write_t5_embeddings(folder, seed, tokens=77, width=4096):
    """The two T5-XXL embeddings PDM-Pure's IF purifier reads from the IF folder: `t5_xxl_a_picture.npy` (the
    prompt, float32, made by hand in a real run) and `zero_t5-v1_1-xxl_vector.npy` (IF's unconditional vector,
    float16). Seeded noise of the official shapes; the real zero_t5 file has a published sha256, which this one
    does not match (a rehearsal places it by hand instead of downloading it)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    np.save(folder / "t5_xxl_a_picture.npy", rng.standard_normal((tokens, width)).astype(np.float32) * 0.1)
    np.save(folder / "zero_t5-v1_1-xxl_vector.npy", (rng.standard_normal((tokens, width)) * 0.1).astype(np.float16))


def write_deepfloyd_if_stage2_large(entry, folder, *, seed, reduced=False):
    """unet/ (config.json + diffusion_pytorch_model.safetensors), scheduler/ and image_noising_scheduler/. Official
    size is APPROXIMATE (IF2_UNET's comment): 1,182,337,798 parameters against the published 1.2B. reduced: widths
    128..1280 -> 32..64, 1 layer per level (2..5 in IF-II), cross-attention 1280 -> 64; the 4096-wide T5 input
    kept, so its attention pooling (3 x 4096 x 4096) keeps 50 M of the reduced UNet's 53,346,854 parameters (cheap
    to run: 77 tokens once per call)."""
    from diffusers import UNet2DConditionModel

    with seeded(seed):
        unet = UNet2DConditionModel(**if_stage2_config(reduced))
    with atomic_folder(folder, entry_paths(entry)) as staging:
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        write_json(staging / "scheduler" / "scheduler_config.json", IF2_SCHEDULER)
        write_json(staging / "image_noising_scheduler" / "scheduler_config.json", IF2_NOISING_SCHEDULER)
        write_t5_embeddings(staging, seed)
    line = ("IF-II UNet widths 128..1280 -> 32..64, layers per level 2..5 -> 1, cross-attention 1280 -> 64 "
            "(official size itself approximate: gated config)" if reduced else None)
    return result(count_parameters(unet), line, entry)


# --- Stable Diffusion x4 upscaler (stabilityai/stable-diffusion-x4-upscaler, diffusers layout) ----------------------

X4_UNET = {"sample_size": 128, "in_channels": 7, "out_channels": 4, "layers_per_block": 2,
           "block_out_channels": [256, 512, 512, 1024], "attention_head_dim": 8, "cross_attention_dim": 1024,
           "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
           "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
           "only_cross_attention": [True, True, True, False], "use_linear_projection": True,
           "num_class_embeds": 1000, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
           "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1}
X4_VAE = {"sample_size": 256, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
          "block_out_channels": [128, 256, 512], "down_block_types": ["DownEncoderBlock2D"] * 3,
          "up_block_types": ["UpDecoderBlock2D"] * 3, "act_fn": "silu", "norm_num_groups": 32,
          "scaling_factor": 0.08333}
# OpenCLIP ViT-H/14's text tower (SD 2 family), as the upscaler's text_encoder/config.json has it
OPENCLIP_H_TEXT = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                   "num_hidden_layers": 23, "max_position_embeddings": 77, "vocab_size": CLIP_VOCAB_SIZE,
                   "hidden_act": "gelu", "projection_dim": 512, "bos_token_id": 0, "eos_token_id": 2,
                   "pad_token_id": 1}
X4_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                "beta_end": 0.02, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
                "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None}
X4_LOW_RES_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                        "beta_end": 0.02, "beta_schedule": "scaled_linear", "trained_betas": None}
X4_MODEL_INDEX = {"_class_name": "StableDiffusionUpscalePipeline", "max_noise_level": 350,
                  "low_res_scheduler": ["diffusers", "DDPMScheduler"], "scheduler": ["diffusers", "DDIMScheduler"],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                  "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
X4_REDUCED = {"unet": {"block_out_channels": [32, 32, 64, 64], "cross_attention_dim": 64},
              "vae": {"block_out_channels": [32, 32, 64]},
              "text": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "projection_dim": 64}}


def x4_upscaler_configs(reduced=False):
    """(unet, vae, text encoder) configs of the x4 upscaler, official or reduced."""
    unet, vae, text = dict(X4_UNET), dict(X4_VAE), dict(OPENCLIP_H_TEXT)
    if reduced:
        unet.update(X4_REDUCED["unet"])
        vae.update(X4_REDUCED["vae"])
        text.update(X4_REDUCED["text"])
    return unet, vae, text


def write_stable_diffusion_x4_upscaler(entry, folder, *, seed, reduced=False):
    """model_index.json, vae/, unet/, text_encoder/, tokenizer/ (pad "!", as the SD 2 family), scheduler/ (DDIM,
    v-prediction) and low_res_scheduler/ (DDPM). Official (X4_UNET, X4_VAE, OPENCLIP_H_TEXT as held here): UNet
    473,398,020, VAE 55,325,927 (the upscaler's 3-level VAE), OpenCLIP-H text 340,387,840 parameters.
    reduced: UNet channels 256..1024 -> 32..64, VAE 128..512 -> 32..64, text encoder 23 x 1024 -> 2 x 64."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config, vae_config, text_config = x4_upscaler_configs(reduced)
    with seeded(seed):
        unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
        text_encoder = clip_text_model(text_config)
    with atomic_folder(folder, entry_paths(entry)) as staging:
        write_json(staging / "model_index.json", X4_MODEL_INDEX)
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        vae.save_pretrained(staging / "vae", safe_serialization=True)
        text_encoder.save_pretrained(staging / "text_encoder", safe_serialization=True)
        write_clip_tokenizer(staging / "tokenizer", pad_token="!")
        write_json(staging / "scheduler" / "scheduler_config.json", X4_SCHEDULER)
        write_json(staging / "low_res_scheduler" / "scheduler_config.json", X4_LOW_RES_SCHEDULER)
    line = ("UNet channels 256..1024 -> 32..64, VAE 128..512 -> 32..64, OpenCLIP text 23 x 1024 -> 2 x 64"
            if reduced else None)
    return result(count_parameters(unet, vae, text_encoder), line, entry)


# --- torchvision AlexNet (LPIPS backbone) and pytorch-fid's Inception ---------------------------------------------


def write_torchvision_alexnet(entry, folder, *, seed, reduced=False):
    """alexnet-owt-7be5be79.pth: torchvision's AlexNet state dict (1000 classes), 61,100,840 parameters."""
    import torchvision

    with seeded(seed):
        network = torchvision.models.alexnet(weights=None)
    (path,) = entry_paths(entry)
    with atomic_folder(folder, [path]) as staging:
        torch.save(network.state_dict(), staging / path)
    return result(count_parameters(network), None, entry)


def fid_inception_network():
    """pytorch-fid's FID Inception, untrained: torchvision's Inception v3 with 1008 classes and no auxiliary head,
    its mixed blocks replaced by pytorch-fid's TF-compatible ones (what `fid_inception_v3` builds before it
    downloads the weights)."""
    from pytorch_fid import inception as fid

    network = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    network.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    network.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    network.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    network.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    network.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    network.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    network.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    network.Mixed_7b = fid.FIDInceptionE_1(1280)
    network.Mixed_7c = fid.FIDInceptionE_2(2048)
    return network


def write_pytorch_fid_inception(entry, folder, *, seed, reduced=False):
    """pt_inception-2015-12-05-6726825d.pth: the FID Inception's state dict, 23,850,960 parameters (1008-class
    head included, as in the released file)."""
    with seeded(seed):
        network = fid_inception_network()
    (path,) = entry_paths(entry)
    with atomic_folder(folder, [path]) as staging:
        torch.save(network.state_dict(), staging / path)
    return result(count_parameters(network), None, entry)


WRITERS = {
    "hf_vit": write_hf_vit,
    "timm_beit": write_timm_beit,
    "hf_clip_vision": write_hf_clip_vision,
    "stable_diffusion_v1_4": write_stable_diffusion_v1_4,
    "deepfloyd_if_stage2_large": write_deepfloyd_if_stage2_large,
    "stable_diffusion_x4_upscaler": write_stable_diffusion_x4_upscaler,
    "torchvision_alexnet": write_torchvision_alexnet,
    "pytorch_fid_inception": write_pytorch_fid_inception,
}


def official_parameter_counts():
    """Parameter counts of the official-size diffusers networks, built on the meta device (nothing allocated):
    {'stable_diffusion_v1_4': {'unet': n, 'vae': n, 'text_encoder': n}, 'stable_diffusion_x4_upscaler': {...},
    'deepfloyd_if_stage2_large': {'unet': n}}; what the writers' docstrings state."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    counts = {}
    with torch.device("meta"):
        for name, (unet, vae, text) in {"stable_diffusion_v1_4": stable_diffusion_configs(),
                                        "stable_diffusion_x4_upscaler": x4_upscaler_configs()}.items():
            counts[name] = {"unet": count_parameters(UNet2DConditionModel(**unet)),
                            "vae": count_parameters(AutoencoderKL(**vae)),
                            "text_encoder": count_parameters(clip_text_model(text))}
        counts["deepfloyd_if_stage2_large"] = {"unet": count_parameters(UNet2DConditionModel(**if_stage2_config()))}
    return counts


__all__ = ["WRITERS", "official_parameter_counts", "synthetic_clip_bpe", "write_clip_tokenizer"] + [
    writer.__name__ for writer in WRITERS.values()]
