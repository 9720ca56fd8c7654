"""One way to save and load every model, and the interfaces through which the methods use them.

Files
-----
`save_model` writes one torch file holding the state dict, the `architecture` block that rebuilds the network (the
same `{"family", "config"}` shape as config/checkpoints.yaml), the model `kind`, for diffusion models the
diffusion settings, and `extra` (what the weights depend on, never timings or the device: the same weights and
settings give the same bytes, so the jobs that digest the file keep their state). `load_model` rebuilds the network from that block, so a file is self-describing and loads with
`torch.load(weights_only=True)` (no pickled code). `load_registry_checkpoint` reads the official files that
config/checkpoints.yaml lists (ADM `.pt` state dicts, EDM `.pkl` snapshots, RobustBench `Standard.pt`, score_sde's
`checkpoint_8.pth` with its EMA weights) into the same `LoadedModel`.

Kinds
-----
- "classifier": [0, 1] images -> logits.
- "features": [0, 1] images -> embeddings (official image encoders only, e.g. CLIP's, for image similarity).
- "diffusion": an eps-predicting network ``net(x_t, t_model, y=None)`` in [-1, 1] space (or, for EDM, a denoiser
  D(x; sigma) behind EDMPrecond or VPPrecond that `eps_model` adapts; for score_sde's NCSN++, ``net(x_t, label)``
  with a continuous time label, adapted by `ScoreSDEEps`). How a network reads time is its family's `time_input`
  (`time_input(loaded)`): "discrete" integer timesteps floor(N·t), or "continuous" labels (N - 1)·t. A class-conditional mini model has one
  extra *null class* (index ``null_class``) that label dropout trained as "no label": one network gives
  conditional and unconditional eps.
- "multihead_diffusion": RDC's multi-head network, no label input; its output holds one eps head per class
  (``num_classes x C`` channels, head k at channels ``k*C .. (k+1)*C - 1``), so one pass gives every class's eps.
  Two families: `adm_unet` with ``output_heads`` (the mini presets' fine-tune of their ADM model) and
  `edm_multihead_songunet` (`networks.edm.MultiheadEDMPrecond`, distilled from EDM's conditional CIFAR-10 model at
  paper scale: a denoiser D_k(x; sigma) per head, adapted by `EDMMultiheadEps`).

Diffusion settings
------------------
``{"schedule": "linear" | "cosine" | "vpsde", "num_timesteps": T, "learn_sigma": bool, "rescale_timesteps": bool,
"null_class": int | None, "variance": "learned_range" | "fixed_small" | "fixed_large"}`` (+ "beta_min", "beta_d"
for "vpsde"; + "prediction": "v" for a network trained to output v = sqrt(a)·eps - sqrt(1 - a)·x0, absent for eps
networks); `build_diffusion` turns them into a `diffusion.GaussianDiffusion`, and `eps_model` / `all_class_eps`
convert a v network's output to eps (`VPredictionEps`), so every method sees eps.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffrobust import diffusion as diffusion_lib
from diffrobust.checkpoints import checkpoint_path
from diffrobust.io import atomic_path
from diffrobust.errors import DiffrobustError

# Kinds a model file holds (`save_model`); official image encoders load as a fourth kind, "features" (never saved).
KINDS = ("diffusion", "multihead_diffusion", "classifier")
FILE_FORMAT = "diffrobust-model"
FILE_VERSION = 1
SCHEDULES = ("linear", "cosine", "vpsde")


class ModelFileError(DiffrobustError, ValueError):
    """A model file that is not what it should be, with a message saying what to do."""


class CheckpointNotFoundError(DiffrobustError, FileNotFoundError):
    """A registry checkpoint file that is not on disk yet."""


# ---------------------------------------------------------------------------------------------------------------
# Networks that are not official checkpoints: the mini presets' UNets and classifiers
# ---------------------------------------------------------------------------------------------------------------

# ADMUNet constructor arguments that build_guided_diffusion_unet derives from the official flags and that the
# network keeps as attributes of the same name.
_ADM_DERIVED_ARGUMENTS = ("image_size", "model_channels", "num_res_blocks", "attention_resolutions", "dropout",
                          "channel_mult", "dims", "use_checkpoint", "use_fp16", "num_heads",
                          "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "resblock_updown",
                          "use_new_attention_order")
ADM_UNET_EXTRA_KEYS = {"in_channels": 3, "num_classes": 1000, "output_heads": 1, "conv_resample": True,
                       "patch_size": 1}


def build_adm_unet(config):
    """An ADM UNet from guided-diffusion flags plus keys that the official builder fixes for ImageNet/CIFAR:

    - ``in_channels`` (default 3): image channels (1 for MNIST);
    - ``num_classes`` (default 1000): rows of the label embedding when ``class_cond`` (the mini models use
      10 classes + 1 null class = 11);
    - ``output_heads`` (default 1): eps heads in the output; RDC's multi-head model has one per class;
    - ``conv_resample`` (default true, as in every official model): 3x3 convolutions in the up/downsampling layers;
      false resamples with nearest-neighbour / average pooling (cheaper on a CPU);
    - ``patch_size`` p (default 1): the UNet runs on p x p patches stacked into channels, at image_size / p
      (about 3x cheaper training for the mini preset); `attention_resolutions` then name feature resolutions of
      that patched grid (image_size 32, patch_size 2: "8" is the middle level).
    Output channels = output_heads x in_channels x (2 if learn_sigma else 1). With every extra key at its default
    the network is exactly `build_guided_diffusion_unet`'s.
    """
    from diffrobust.networks import adm

    config = dict(config)
    extras = {key: config.pop(key, default) for key, default in ADM_UNET_EXTRA_KEYS.items()}
    if not isinstance(extras["conv_resample"], bool):
        raise ValueError(f"adm_unet config key 'conv_resample' must be true or false, got {extras['conv_resample']!r}")
    for key in ("in_channels", "num_classes", "output_heads", "patch_size"):
        value = extras[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"adm_unet config key {key!r} must be a positive integer, got {value!r}")
    # Let the official-flag builder validate the flags and derive channel_mult / attention downsample rates (on
    # the meta device: nothing is allocated), then build the network with the extra arguments. A patched UNet's
    # levels run at image_size / patch_size, which is what its flags describe.
    patch_size = extras["patch_size"]
    image_size = config.get("image_size")
    if patch_size > 1:
        if not isinstance(image_size, int) or image_size % patch_size:
            raise ValueError(f"adm_unet config key 'image_size' ({image_size!r}) must be a multiple of "
                             f"patch_size ({patch_size})")
        config["image_size"] = image_size // patch_size
    with torch.device("meta"):
        template = adm.build_guided_diffusion_unet(config)
    arguments = {name: getattr(template, name) for name in _ADM_DERIVED_ARGUMENTS}
    if patch_size > 1:
        arguments["image_size"] = image_size
    learn_sigma = template.out_channels == 6
    return adm.ADMUNet(
        in_channels=extras["in_channels"],
        out_channels=extras["output_heads"] * extras["in_channels"] * (2 if learn_sigma else 1),
        num_classes=extras["num_classes"] if template.num_classes is not None else None,
        conv_resample=extras["conv_resample"],
        patch_size=patch_size,
        **arguments,
    )


def adm_unet_config_of(unet, output_heads=1):
    """The `adm_unet` config that rebuilds an ADMUNet with `output_heads` heads: the inverse of build_adm_unet,
    also for networks that came from elsewhere (registry ADM checkpoints)."""
    if unet.image_size is None or any(float(m) != int(m) for m in unet.channel_mult):
        raise ValueError("cannot describe this ADM network as adm_unet flags (no image_size, or fractional channel_mult)")
    return {
        "image_size": unet.image_size, "num_channels": unet.model_channels,
        "num_res_blocks": unet.num_res_blocks, "num_heads": unet.num_heads,
        "num_heads_upsample": unet.num_heads_upsample, "num_head_channels": unet.num_head_channels,
        "attention_resolutions": ",".join(str(unet.image_size // unet.patch_size // rate)
                                          for rate in unet.attention_resolutions),
        "channel_mult": ",".join(str(int(m)) for m in unet.channel_mult), "dropout": unet.dropout,
        "class_cond": unet.num_classes is not None, "use_checkpoint": unet.use_checkpoint,
        "use_scale_shift_norm": unet.use_scale_shift_norm, "resblock_updown": unet.resblock_updown,
        "use_fp16": unet.use_fp16, "use_new_attention_order": unet.use_new_attention_order,
        "learn_sigma": unet.out_channels == 2 * output_heads * unet.in_channels,
        "in_channels": unet.in_channels, "num_classes": unet.num_classes or ADM_UNET_EXTRA_KEYS["num_classes"],
        "output_heads": output_heads, "conv_resample": unet.conv_resample, "patch_size": unet.patch_size,
    }


def _small_resnet(config):
    from diffrobust.networks.classifiers import build_small_resnet

    return build_small_resnet(config)


def _edm_multihead_songunet(config):
    from diffrobust.networks.edm import build_edm_multihead_songunet

    return build_edm_multihead_songunet(config)


# Families defined by this project's own models; everything else goes to networks.build_network.
LOCAL_BUILDERS = {"adm_unet": build_adm_unet, "small_resnet": _small_resnet,
                  "edm_multihead_songunet": _edm_multihead_songunet}


def build_architecture(architecture):
    """Build an untrained network from an `{"family", "config"}` block (project or registry family)."""
    family = architecture.get("family")
    if family in LOCAL_BUILDERS:
        return LOCAL_BUILDERS[family](dict(architecture.get("config", {})))
    from diffrobust.networks import build_network

    return build_network(architecture)


# ---------------------------------------------------------------------------------------------------------------
# Diffusion settings
# ---------------------------------------------------------------------------------------------------------------

PREDICTIONS = ("eps", "v")


def diffusion_settings(schedule, num_timesteps, *, learn_sigma=False, rescale_timesteps=False, null_class=None,
                       variance=None, prediction="eps", **schedule_parameters):
    """A validated, complete diffusion settings dict (see the module docstring).

    variance defaults to "learned_range" with learn_sigma and to "fixed_large" (improved-diffusion's default when
    sigma_small is off) otherwise. "vpsde" needs beta_min and beta_d (EDM's VP names).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"diffusion schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if variance is None:
        variance = "learned_range" if learn_sigma else "fixed_large"
    if variance not in diffusion_lib.VARIANCE_TYPES:
        raise ValueError(f"variance must be one of {diffusion_lib.VARIANCE_TYPES}, got {variance!r}")
    if variance == "learned_range" and not learn_sigma:
        raise ValueError("variance 'learned_range' needs learn_sigma=True (a network with 2C output channels)")
    if null_class is not None and (isinstance(null_class, bool) or not isinstance(null_class, int)):
        raise ValueError(f"null_class must be an integer class index or None, got {null_class!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    expected = {"beta_min", "beta_d"} if schedule == "vpsde" else set()
    if set(schedule_parameters) != expected:
        raise ValueError(f"schedule {schedule!r} takes parameters {sorted(expected)}, got {sorted(schedule_parameters)}")
    return {"schedule": schedule, "num_timesteps": num_timesteps, "learn_sigma": bool(learn_sigma),
            "rescale_timesteps": bool(rescale_timesteps), "null_class": null_class, "variance": variance,
            **({"prediction": prediction} if prediction != "eps" else {}),
            **{key: float(value) for key, value in schedule_parameters.items()}}


def build_diffusion(settings):
    """The `GaussianDiffusion` that a settings dict describes."""
    settings = diffusion_settings(**settings)
    steps = settings["num_timesteps"]
    common = {"variance": settings["variance"], "rescale_timesteps": settings["rescale_timesteps"]}
    if settings["schedule"] == "linear":
        return diffusion_lib.GaussianDiffusion.linear(steps, **common)
    if settings["schedule"] == "cosine":
        return diffusion_lib.GaussianDiffusion.cosine(steps, **common)
    # "vpsde": EDM's VP schedule sampled at times k/T, with its closed form in between, so that time t of the
    # chain is continuous time t/T of the SDE exactly (what the EDM eps adapter assumes).
    beta_min, beta_max = settings["beta_min"], settings["beta_min"] + settings["beta_d"]

    def alpha_bar(t):
        return diffusion_lib.vpsde_alpha_bar(t / steps, beta_min, beta_max)

    alpha_bars = np.array([1.0] + [alpha_bar(k) for k in range(1, steps + 1)])
    betas = 1.0 - alpha_bars[1:] / alpha_bars[:-1]
    return diffusion_lib.GaussianDiffusion(betas, alpha_bar_fn=alpha_bar, **common)


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A network ready to use (eval mode, parameters frozen) and what it is.

    diffusion_settings is the settings dict (None for classifiers); diffusion the GaussianDiffusion built from it.
    """

    network: nn.Module
    kind: str
    architecture: dict
    diffusion: object = None
    diffusion_settings: dict = None
    extra: dict = field(default_factory=dict)

    @property
    def null_class(self):
        return (self.diffusion_settings or {}).get("null_class")


def _plain(value):
    """Tuples -> lists, recursively, so that stored blocks compare equal to what YAML/JSON would give."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def save_model(path, network, *, kind, architecture, diffusion=None, extra=None):
    """Write `network`'s weights and description to `path` atomically (see the module docstring).

    diffusion: settings dict, required for the diffusion kinds, refused for classifiers. extra: any small
    JSON-like dict (training settings, class names, ...), stored as is.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if (diffusion is None) != (kind == "classifier"):
        raise ValueError(f"a {kind!r} model {'needs' if kind != 'classifier' else 'takes no'} diffusion settings")
    if "family" not in architecture:
        raise ValueError("architecture must be a {'family': ..., 'config': {...}} block")
    record = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "kind": kind,
        "architecture": _plain(architecture),
        "diffusion": None if diffusion is None else diffusion_settings(**diffusion),
        "extra": _plain(extra or {}),
        "state_dict": {key: value.detach().cpu() for key, value in network.state_dict().items()},
    }
    # through a file handle: given a path, torch.save names the archive's inner folder after the (random) temporary
    # file, so the same weights would give other bytes, and a retrained model a new identity downstream
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        torch.save(record, handle)
    return Path(path)


def _finish(network, state_dict, device, source):
    try:
        network.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ModelFileError(f"{source}: the weights do not fit the network its architecture describes: {error}") from None
    return network.to(device).eval().requires_grad_(False)


def load_model(path, device="cpu"):
    """Load a file written by `save_model` -> LoadedModel (network in eval mode, on `device`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found; run the workflow job that trains or fetches it")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, or a file from elsewhere
        raise ModelFileError(f"{path}: not a readable diffrobust model file ({error})") from error
    if not isinstance(record, dict) or record.get("format") != FILE_FORMAT:
        raise ModelFileError(f"{path}: not a diffrobust model file (use load_registry_checkpoint for official ones)")
    if record["version"] != FILE_VERSION:
        raise ModelFileError(f"{path}: model file version {record['version']}, this code reads {FILE_VERSION}")
    network = _finish(build_architecture(record["architecture"]), record["state_dict"], device, path)
    settings = record["diffusion"]
    return LoadedModel(network=network, kind=record["kind"], architecture=record["architecture"],
                       diffusion=None if settings is None else build_diffusion(settings),
                       diffusion_settings=settings, extra=record["extra"])


# ---------------------------------------------------------------------------------------------------------------
# Official checkpoints (config/checkpoints.yaml)
# ---------------------------------------------------------------------------------------------------------------

def _adm_diffusion_settings(family, config):
    """ADM flags -> diffusion settings (improved- or guided-diffusion defaults under the registry's flags)."""
    from diffrobust.networks import adm

    defaults = adm.IMPROVED_DIFFUSION_DEFAULTS if family == "improved_diffusion_unet" else adm.GUIDED_DIFFUSION_DEFAULTS
    flags = {**defaults, **config}
    if flags["timestep_respacing"] not in ("", None):
        raise ValueError(f"timestep_respacing={flags['timestep_respacing']!r}: respacing is the samplers' job here; "
                         "register the checkpoint with its full schedule")
    learn_sigma = flags["learn_sigma"]
    variance = "learned_range" if learn_sigma else ("fixed_small" if flags["sigma_small"] else "fixed_large")
    return diffusion_settings(flags["noise_schedule"], flags["diffusion_steps"], learn_sigma=learn_sigma,
                              rescale_timesteps=flags["rescale_timesteps"], variance=variance)


def _edm_diffusion_settings(family, config):
    """EDM's chain: VPPrecond's own VP SDE; EDMPrecond (a denoiser D(x; sigma) for any sigma, no chain of its own)
    is queried on the VP SDE's chain with EDM's VP constants (DiffPure's chain), through EDMPrecondEps."""
    from diffrobust.networks import edm

    if config.get("precond", edm.DEFAULT_PRECOND) == "vp":
        # EDM's VP defaults (VPPrecond: beta_d=19.9, beta_min=0.1, M=1000) unless the config overrides them
        return diffusion_settings("vpsde", int(config.get("M", 1000)), beta_min=config.get("beta_min", 0.1),
                                  beta_d=config.get("beta_d", 19.9))
    return diffusion_settings("vpsde", 1000, beta_min=0.1, beta_d=19.9)


def _score_sde_diffusion_settings(family, config):
    """score_sde's VP SDE (beta_min 0.1, beta_max 20, N = num_scales = 1000 for DiffPure's CIFAR-10 model), which
    DiffPure's RevVPSDE integrates; the "vpsde" chain samples it at times k/N."""
    from diffrobust.networks import ncsnpp

    flags = {**ncsnpp.CIFAR10_DDPMPP_DEEP_CONTINUOUS, **config}
    return diffusion_settings("vpsde", int(flags["num_scales"]), beta_min=flags["beta_min"],
                              beta_d=flags["beta_max"] - flags["beta_min"])


def registry_diffusion_settings(architecture):
    """Diffusion settings implied by a registry architecture block (ADM flags, or EDM's VP constants); None for
    classifiers."""
    family = FAMILIES[architecture["family"]]
    if family.diffusion_settings is None:
        return None
    return family.diffusion_settings(architecture["family"], architecture.get("config", {}))


def _read_registry(registry):
    if isinstance(registry, dict):
        return registry
    from diffrobust.config import checkpoint_registry_path, read_yaml

    return read_yaml(registry or checkpoint_registry_path())


def _strip_prefix(state_dict, prefix="module."):
    """RobustBench's rm_substr_from_state_dict: drop a DataParallel `module.` prefix where every key has one."""
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def _torch_file(path):
    """The contents of a torch file (tensors and plain containers only), or a ModelFileError saying what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelFileError(f"{path}: cannot be read as a torch state dict ({error}); the download may be "
                             "corrupt: delete it and download it again") from error


def _unwrapped_state_dict(contents):
    if isinstance(contents, dict) and isinstance(contents.get("state_dict"), dict):
        contents = contents["state_dict"]  # RobustBench wraps its weights (and improved-diffusion does not)
    return _strip_prefix(dict(contents))


def _read_state_dict(path):
    return _unwrapped_state_dict(_torch_file(path))


def _score_sde_ema_parameters(path, ema, network):
    """{name: EMA weight} for `network`'s parameters from score_sde's EMA state ({'decay', 'num_updates',
    'shadow_params'}): the shadow list follows `parameters()` order and carries no names, so it is matched by
    position, as DiffPure's `ema.copy_to(model.parameters())` does, after checking its length and every shape
    (copy_to's zip would silently stop at the shorter list)."""
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, (list, tuple)):
        raise ModelFileError(f"{path}: the checkpoint's 'ema' entry has no 'shadow_params' list; it is not a "
                             "score_sde checkpoint (or it is damaged): download it again")
    named = list(network.named_parameters())
    if len(shadow) != len(named):
        raise ModelFileError(
            f"{path}: the checkpoint's EMA holds {len(shadow)} shadow parameters, but the network that the registry's "
            f"architecture builds has {len(named)}: the file is for another NCSN++ configuration (check the "
            "architecture config of its entry in config/checkpoints.yaml) or it is damaged")
    for index, ((name, parameter), weight) in enumerate(zip(named, shadow)):
        if not torch.is_tensor(weight) or weight.shape != parameter.shape:
            found = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
            raise ModelFileError(
                f"{path}: EMA shadow parameter {index} has shape {found}, but parameter {index} of the network "
                f"({name}) has shape {tuple(parameter.shape)}: the file is for another NCSN++ configuration (check "
                "the architecture config of its entry in config/checkpoints.yaml) or it is damaged")
    return {name: weight for (name, _), weight in zip(named, shadow)}


def _score_sde_state_dict(path, network):
    """The weights DiffPure runs from a score_sde checkpoint (`checkpoint_8.pth`: {'model': DataParallel state dict
    with 'module.' keys, 'ema': {...}, 'optimizer', 'step'}): every parameter from the EMA shadow params (DiffPure
    loads 'model' and then overwrites every parameter with the EMA copy), the buffers (`sigmas`) from 'model'.
    A plain state dict (no 'ema') is taken as it is."""
    contents = _torch_file(path)
    if not (isinstance(contents, dict) and "ema" in contents):
        return _unwrapped_state_dict(contents)
    parameters = _score_sde_ema_parameters(path, contents["ema"], network)
    model = _strip_prefix(dict(contents.get("model") or {}))
    buffers = [name for name in network.state_dict() if name not in parameters]
    missing = [name for name in buffers if name not in model]
    if missing:
        raise ModelFileError(f"{path}: the checkpoint's 'model' state dict lacks the buffers {', '.join(missing)}; it "
                             "is not a score_sde checkpoint of this network (or it is damaged)")
    return {name: parameters[name] if name in parameters else model[name] for name in network.state_dict()}


def _edm_pickle_state_dict(path, network):
    """The state dict of an NVlabs/edm pickle for the registry's `network`, after checking that the wrapper class the
    pickle names is the one the registry's `precond` builds: EDMPrecond and VPPrecond have the same keys, so a
    strict load would not notice, and the denoiser would silently be the other one."""
    from diffrobust.networks import edm

    contents = edm.read_edm_network_pickle(path)
    found = edm.precond_of_class(contents.class_name)
    if found != network.precond:
        built = type(network).__name__
        if found is None:
            what = (f"an NVlabs/edm {contents.class_name} network, which this code does not implement (it builds "
                    f"{', '.join(sorted(cls.__name__ for cls, _ in edm.PRECONDITIONINGS.values()))})")
            fix = "use a checkpoint with one of those wrappers"
        else:
            what = f"an NVlabs/edm {contents.class_name} network (precond {found!r})"
            fix = f"set `precond: {found}` in the architecture config of its entry in config/checkpoints.yaml"
        raise ModelFileError(
            f"{path}: the pickle holds {what}, but the registry says precond {network.precond!r} ({built}). The "
            f"wrappers share their weights' names and shapes but not their denoiser (c_skip, c_out, c_in, c_noise), "
            f"so loading it as {built} would compute the wrong D(x; sigma). Fix: {fix}.")
    state_dict = contents.state_dict
    if getattr(network.model, "map_augment", None) is None:
        # EDM's CIFAR-10 training sets augment_dim = 9 (its --augment default), so the released pickles carry
        # model.map_augment.weight, a bias-free map of the augmentation labels that acts only when augmentation
        # labels are passed (EDM's SongUNet skips it for augment_labels=None). Sampling and every defense pass
        # none, so that map adds exactly nothing; the registry network (the manifest) has none.
        state_dict.pop("model.map_augment.weight", None)
    return state_dict


def _hf_vit_network(architecture, path):
    """A Hugging Face folder: transformers reads it (and renames legacy weight names)."""
    from diffrobust.networks.pretrained import load_hf_vit

    try:
        return load_hf_vit(architecture["config"], path.parent)
    except (OSError, ValueError) as error:
        raise ModelFileError(f"{path.parent}: cannot load the Hugging Face ViT ({error})") from error


def _hf_clip_vision_network(architecture, path):
    from diffrobust.networks.pretrained import load_hf_clip_vision

    try:
        return load_hf_clip_vision(architecture["config"], path.parent)
    except (OSError, ValueError) as error:
        raise ModelFileError(f"{path.parent}: cannot load the CLIP image encoder ({error})") from error


def _timm_beit_state_dict(path, network):
    from diffrobust.networks.pretrained import timm_beit_state_dict

    return timm_beit_state_dict(_read_state_dict(path), network)


def _official_classifier_state_dict(path, network):
    """torchvision's bare state dict, or the facebookresearch/deit release's {"model": state_dict}."""
    from diffrobust.networks.pretrained import prefixed_network_state_dict

    contents = _torch_file(path)
    if isinstance(contents, dict) and isinstance(contents.get("model"), dict):
        contents = contents["model"]
    return prefixed_network_state_dict(_unwrapped_state_dict(contents))


TIME_INPUTS = ("discrete", "continuous")


@dataclass(frozen=True)
class Family:
    """What the code needs to know about one network family, in one row of `FAMILIES`, so that no function tests
    family names: the model kind, how official weights are read (`read_weights(path, network)` -> state dict, or
    `load(architecture, path)` -> network for formats a library reads itself), the diffusion settings its flags imply
    (None for classifiers), whether its eps comes from an EDM adapter, and whether this project trains / fine-tunes
    it. `eps_adapter(loaded)` -> eps model, when the network is not itself ``net(x_t, t_model, y=None)``;
    `time_input` how the network reads SDE time t in DiffPure's VP-SDE (diffusion.VPSDE_TIME_INPUTS): "discrete"
    (the integer timestep floor(N·t), as guided-diffusion in DiffPure) or "continuous" (score_sde's label
    (N - 1)·t = t·999, not floored)."""

    kind: str
    read_weights: object = None
    load: object = None
    diffusion_settings: object = None
    edm: bool = False
    trainable: bool = False
    eps_adapter: object = None
    time_input: str = "discrete"

    def __post_init__(self):
        if self.time_input not in TIME_INPUTS:
            raise ValueError(f"Family.time_input must be one of {TIME_INPUTS}, got {self.time_input!r}")


FAMILIES = {
    "adm_unet": Family("diffusion", trainable=True),
    "small_resnet": Family("classifier", trainable=True),
    # RDC's multi-head network on EDM's preconditioning, distilled by training.distill_edm_multihead (no checkpoint)
    "edm_multihead_songunet": Family("multihead_diffusion", edm=True),
    "improved_diffusion_unet": Family("diffusion", lambda path, network: _read_state_dict(path),
                                      diffusion_settings=_adm_diffusion_settings, trainable=True),
    "guided_diffusion_unet": Family("diffusion", lambda path, network: _read_state_dict(path),
                                    diffusion_settings=_adm_diffusion_settings, trainable=True),
    "edm_vp_songunet": Family("diffusion", lambda path, network: _edm_pickle_state_dict(path, network),
                              diffusion_settings=_edm_diffusion_settings, edm=True),
    "score_sde_ncsnpp": Family("diffusion", _score_sde_state_dict, diffusion_settings=_score_sde_diffusion_settings,
                               eps_adapter=lambda loaded: ScoreSDEEps(loaded.network), time_input="continuous"),
    "robustbench_wrn": Family("classifier", lambda path, network: _read_state_dict(path)),
    "robustbench_dm_wrn": Family("classifier", lambda path, network: _read_state_dict(path)),
    "hf_vit": Family("classifier", load=_hf_vit_network),
    # image embeddings, not logits: Pixel is a Barrier's CLIP image similarity and Frechet distance
    "hf_clip_vision": Family("features", load=_hf_clip_vision_network),
    "timm_beit": Family("classifier", _timm_beit_state_dict),
    # DiffPure's ImageNet classifiers (torchvision ResNet-50 / WideResNet-50-2, facebookresearch/deit DeiT-S)
    "torchvision_classifier": Family("classifier", _official_classifier_state_dict),
    "timm_deit": Family("classifier", _official_classifier_state_dict),
}
# Families official checkpoints come in (config/checkpoints.yaml), with the kind of model each one is.
REGISTRY_KINDS = {name: family.kind for name, family in FAMILIES.items() if family.read_weights or family.load}


def family_of(loaded):
    """The `Family` of a LoadedModel (or of an architecture block)."""
    architecture = loaded if isinstance(loaded, dict) else loaded.architecture
    return FAMILIES[architecture.get("family")]


def time_input(loaded):
    """How the network of a LoadedModel (or an architecture block) reads SDE time: "discrete" or "continuous"
    (see `Family`); what DiffPure's reverse VP-SDE passes as `time_input`."""
    return family_of(loaded).time_input


def _registry_network(architecture, path, device):
    """Build the registry network and load the official weights at `path` into it, strictly."""
    family = FAMILIES[architecture["family"]]
    if family.load is not None:
        return family.load(architecture, path).to(device).eval().requires_grad_(False)
    network = build_architecture(architecture)
    return _finish(network, family.read_weights(path, network), device, path)


def load_registry_checkpoint(name, root="data/checkpoints", *, registry=None, device="cpu"):
    """Load the official checkpoint `name` of config/checkpoints.yaml from `root`/<name>/<file> -> LoadedModel.

    registry: the parsed registry dict or a path (default: the project's config/checkpoints.yaml). Raises
    CheckpointNotFoundError naming the file and how to get it when it is not on disk.
    """
    entries = _read_registry(registry)
    if name not in entries:
        raise KeyError(f"checkpoint {name!r} is not in the registry; known: {', '.join(sorted(entries))}")
    entry = entries[name]
    architecture = entry.get("architecture")
    family = (architecture or {}).get("family")
    if family not in REGISTRY_KINDS:
        raise ValueError(f"checkpoint {name!r} (family {family!r}) has no loader here; loadable families: "
                         f"{', '.join(sorted(REGISTRY_KINDS))}")
    for file_entry in entry["files"]:  # the weights are the last file (Hugging Face folders list config.json first)
        path = checkpoint_path(name, file_entry, root)  # refuses an entry that leads out of root
        if not path.is_file():
            how = (entry.get("manual") or "").strip() or (
                f"download it with `snakemake --cores 1 {Path('data/checkpoints') / name / file_entry['path']}` "
                "(the workflow's download_checkpoint job)")
            raise CheckpointNotFoundError(f"checkpoint file {path} not found ({entry.get('description', name)}). {how}")
    network = _registry_network(architecture, path, device)
    settings = registry_diffusion_settings(architecture)
    return LoadedModel(network=network, kind=REGISTRY_KINDS[family], architecture=architecture,
                       diffusion=None if settings is None else build_diffusion(settings),
                       diffusion_settings=settings, extra={"registry_name": name, "path": str(path)})


MODEL_FILE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin", ".safetensors")


def looks_like_file(source):
    """A model source that names a file (a path with a folder or a weight-file suffix), not a registry name."""
    source = str(source)
    return "/" in source or os.sep in source or source.endswith(MODEL_FILE_SUFFIXES)


def _registry_entry(name, registry=None):
    entries = _read_registry(registry)
    if name not in entries:
        raise ModelFileError(f"{name!r} is neither a model file nor a checkpoint of config/checkpoints.yaml "
                             f"(known: {', '.join(sorted(entries))}); check the spelling")
    return entries[name]


def source_files(source, root="data/checkpoints", *, registry=None):
    """The files a model source is read from: the model file itself, or a registry checkpoint's files under root."""
    if looks_like_file(source):
        return [Path(source)]
    return [checkpoint_path(str(source), entry, root) for entry in _registry_entry(source, registry)["files"]]


def load_source(source, root="data/checkpoints", *, registry=None, device="cpu"):
    """A model from a file the workflow wrote (`save_model`) or a checkpoint name of config/checkpoints.yaml.

    A source that looks like a file and is not there is an output of the workflow that has not been made (or a
    typo): the error says so and how to make it, instead of looking the path up in the registry."""
    if looks_like_file(source):
        if not Path(source).is_file():
            raise ModelFileError(
                f"model file {source} not found. The workflow makes it: run `snakemake --cores all {source}` "
                "(or the whole DAG), or check the path")
        return load_model(source, device=device)
    _registry_entry(source, registry)
    return load_registry_checkpoint(source, root, registry=registry, device=device)


# ---------------------------------------------------------------------------------------------------------------
# The project's interfaces
# ---------------------------------------------------------------------------------------------------------------

def classifier(loaded):
    """The classifier of a LoadedModel: an nn.Module mapping [0, 1] images (N x C x H x W) to logits."""
    if loaded.kind != "classifier":
        raise ValueError(f"a {loaded.kind!r} model is not a classifier")
    return loaded.network


def _labels(y, x):
    return torch.as_tensor(y, device=x.device).long().reshape(-1).expand(x.shape[0])


class LabelledEps(nn.Module):
    """eps(x_t, t_model, y) of a class-conditional ADM network; with `fixed_label` set, every sample gets that label
    and y must be None (the null class: the unconditional prediction of a label-dropout model)."""

    def __init__(self, network, fixed_label=None):
        super().__init__()
        self.network = network
        self.fixed_label = fixed_label

    def forward(self, x_t, t_model, y=None):
        if self.fixed_label is not None:
            if y is not None:
                raise ValueError("this eps model is unconditional (it uses the null class); pass no labels")
            y = self.fixed_label
        elif y is None:
            raise ValueError("this eps model is class-conditional: pass labels y")
        return self.network(x_t, t_model, y=_labels(y, x_t))


class UnlabelledEps(nn.Module):
    """eps(x_t, t_model) of an unconditional ADM network (y must be None)."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x_t, t_model, y=None):
        if y is not None:
            raise ValueError("this eps model is unconditional; pass no labels")
        return self.network(x_t, t_model)


class VPredictionEps(nn.Module):
    """eps from a v-predicting network (Salimans & Ho): eps = sqrt(a)·v + sqrt(1 - a)·x_t, a = alpha_bar of the level
    the network timestep stands for (table index t_model / timestep_scale). Every head's first C channels are
    converted; learned-variance channels pass through. forward(x_t, t_model, y=None) as the network's."""

    def __init__(self, network, diffusion, heads=1):
        super().__init__()
        self.network, self.heads = network, heads
        self.register_buffer("alphas_cumprod", torch.from_numpy(diffusion.alphas_cumprod).float(), persistent=False)
        self.timestep_scale = diffusion.timestep_scale

    def forward(self, x_t, t_model, y=None):
        out = self.network(x_t, t_model) if y is None else self.network(x_t, t_model, y=y)
        index = (t_model / self.timestep_scale).round().long().clamp(0, len(self.alphas_cumprod) - 1)
        a = self.alphas_cumprod.to(x_t.device)[index].to(x_t.dtype).view(-1, 1, 1, 1, 1)
        channels = x_t.shape[1]
        out = out.reshape(out.shape[0], self.heads, out.shape[1] // self.heads, *out.shape[2:])
        eps = a.sqrt() * out[:, :, :channels] + (1 - a).sqrt() * x_t[:, None]
        return torch.cat([eps, out[:, :, channels:]], dim=2).reshape(out.shape[0], -1, *out.shape[3:])


def eps_network(loaded):
    """loaded.network, or its eps adapter when the model predicts v: a callable with the network's signature whose
    output is eps (every head of a multi-head model)."""
    if (loaded.diffusion_settings or {}).get("prediction", "eps") == "eps":
        return loaded.network
    heads = loaded.extra["num_classes"] if loaded.kind == "multihead_diffusion" else 1
    return VPredictionEps(loaded.network, loaded.diffusion, heads)


def multihead_outputs(network, x_t, t_model, num_classes):
    """All heads of a multi-head network: [N, num_classes, C_out, H, W] (C_out = C, or 2C with learned sigma)."""
    out = network(x_t, t_model)
    return out.reshape(out.shape[0], num_classes, out.shape[1] // num_classes, *out.shape[2:])


class MultiheadEps(nn.Module):
    """eps(x_t, t_model, y) from a multi-head network: head y[i] for sample i (one network pass for the batch).
    `all_classes(x_t, t_model)` returns every head, [N, K, C_out, H, W]."""

    def __init__(self, network, num_classes):
        super().__init__()
        self.network = network
        self.num_classes = num_classes

    def all_classes(self, x_t, t_model):
        return multihead_outputs(self.network, x_t, t_model, self.num_classes)

    def forward(self, x_t, t_model, y=None):
        if y is None:
            raise ValueError("a multi-head model has no unconditional output: pass labels y")
        heads = self.all_classes(x_t, t_model)
        return heads[torch.arange(x_t.shape[0], device=x_t.device), _labels(y, x_t)]


class GuidedEps(nn.Module):
    """Classifier-free guidance: eps = (1 + w)·eps(x, t, y) - w·eps(x, t, null) (Ho & Salimans); learned-variance
    channels, if any, are the conditional pass's."""

    def __init__(self, conditional, unconditional, guidance_scale):
        super().__init__()
        self.conditional = conditional
        self.unconditional = unconditional
        self.guidance_scale = float(guidance_scale)

    def forward(self, x_t, t_model, y=None):
        cond = self.conditional(x_t, t_model, y)
        uncond = self.unconditional(x_t, t_model)
        channels = x_t.shape[1]
        eps = (1 + self.guidance_scale) * cond[:, :channels] - self.guidance_scale * uncond[:, :channels]
        return torch.cat([eps, cond[:, channels:]], dim=1)


def _edm_labels(network, x_t, y):
    """One-hot rows for an EDM network from class indices y; None -> all-zero labels (EDM's convention) for a
    conditional network, no labels for an unconditional one."""
    if not network.label_dim:
        if y is not None:
            raise ValueError("this EDM model is unconditional; pass no labels")
        return None
    labels = torch.zeros(x_t.shape[0], network.label_dim, device=x_t.device)
    if y is not None:
        labels[torch.arange(x_t.shape[0]), _labels(y, x_t)] = 1.0
    return labels


def _edm_chain_time(t_model, x_t, num_timesteps, dtype):
    """SDE time tau = (t_model + 1)/T of the "vpsde" chain (diffusion.py queries level t at t_model = t - 1)."""
    t_model = torch.as_tensor(t_model, dtype=dtype, device=x_t.device).reshape(-1)
    return ((t_model + 1) / num_timesteps).expand(x_t.shape[0])


class EDMVPEps(nn.Module):
    """eps(x_t, t_model, y) of an NVlabs/edm VPPrecond network on the "vpsde" chain of `build_diffusion`.

    Time t of that chain is SDE time tau = t/T, and diffusion.py queries the network at t_model = t - 1, so
    tau = (t_model + 1)/T. EDM's VP denoiser is D(x; s) = x - s·F(x/sqrt(1 + s²), (M - 1)·tau) with
    x = x_t/sqrt(alpha_bar) and s² = 1/alpha_bar - 1; since x/sqrt(1 + s²) = x_t, the noise prediction is
    eps = (x - D)/s = F(x_t, (M - 1)·tau): the inner U-Net, called directly. y: class indices (one-hot for EDM),
    or None (all-zero labels, EDM's convention; the unconditional models take none).
    """

    def __init__(self, network, num_timesteps):
        super().__init__()
        self.network = network
        self.num_timesteps = num_timesteps

    def forward(self, x_t, t_model, y=None):
        tau = _edm_chain_time(t_model, x_t, self.num_timesteps, torch.float32)
        noise_labels = (self.network.M - 1) * tau
        labels = _edm_labels(self.network, x_t, y)
        return self.network.model(x_t.to(torch.float32), noise_labels, class_labels=labels)


class EDMPrecondEps(nn.Module):
    """eps(x_t, t_model, y) of an NVlabs/edm EDMPrecond network (a denoiser D(x; sigma) in sigma space) on the
    "vpsde" chain of `build_diffusion` with beta_min, beta_d.

    At chain time t = T·tau (tau = (t_model + 1)/T, as for EDMVPEps) alpha_bar = exp(-(beta_d·tau²/2 +
    beta_min·tau)), so the image in EDM's space is x = x_t/sqrt(alpha_bar) = x_t·sqrt(1 + sigma²) with
    sigma² = 1/alpha_bar - 1 = expm1(beta_d·tau²/2 + beta_min·tau), and eps = (x - D(x; sigma, y))/sigma, which
    `EDMPrecond.noise_prediction` computes in closed form. The chain is only the grid the defenses query on:
    EDMPrecond accepts any sigma (trained on log-normal sigma around exp(-1.2); the chain's last level, sigma 152,
    is beyond EDM's sampling maximum of 80). y as for EDMVPEps.
    """

    def __init__(self, network, num_timesteps, beta_min, beta_d):
        super().__init__()
        self.network = network
        self.num_timesteps = num_timesteps
        self.beta_min = float(beta_min)
        self.beta_d = float(beta_d)

    def sigma(self, t_model, x_t):
        """EDM noise level sigma (float64, shape [N]) of the chain level that t_model queries."""
        tau = _edm_chain_time(t_model, x_t, self.num_timesteps, torch.float64)
        return torch.expm1(0.5 * self.beta_d * tau ** 2 + self.beta_min * tau).sqrt()

    def edm_inputs(self, x_t, t_model):
        """(x, sigma) in EDM's space, float32: x = x_t·sqrt(1 + sigma²) at the chain level t_model queries."""
        sigma = self.sigma(t_model, x_t)
        scale = (1 + sigma ** 2).sqrt().to(torch.float32).reshape(-1, 1, 1, 1)
        return x_t.to(torch.float32) * scale, sigma.to(torch.float32)

    def forward(self, x_t, t_model, y=None):
        x, sigma = self.edm_inputs(x_t, t_model)
        return self.network.noise_prediction(x, sigma, _edm_labels(self.network, x_t, y))


class EDMMultiheadEps(EDMPrecondEps):
    """eps of a multi-head EDM network (`networks.edm.MultiheadEDMPrecond`) on the "vpsde" chain, as EDMPrecondEps
    maps chain levels to sigma: `all_classes(x_t, t_model)` -> every head, [N, K, C, H, W] (one pass);
    forward(x_t, t_model, y) -> head y[i] of sample i (labels required: there is no unconditional head)."""

    def all_classes(self, x_t, t_model):
        x, sigma = self.edm_inputs(x_t, t_model)
        return self.network.noise_prediction(x, sigma)

    def forward(self, x_t, t_model, y=None):
        if y is None:
            raise ValueError("a multi-head model has no unconditional output: pass labels y")
        heads = self.all_classes(x_t, t_model)
        return heads[torch.arange(x_t.shape[0], device=x_t.device), _labels(y, x_t)]


# The eps adapter of an EDM network by its wrapper's `precond`: (network, diffusion settings) -> eps model.
EDM_EPS_ADAPTERS = {
    "vp": lambda network, settings: EDMVPEps(network, settings["num_timesteps"]),
    "edm": lambda network, settings: EDMPrecondEps(network, settings["num_timesteps"], settings["beta_min"],
                                                   settings["beta_d"]),
}


def _edm_eps(loaded):
    """The eps adapter of an EDM network, chosen by its wrapper class (`precond`), not by the registry's word; a
    multi-head EDM model (kind "multihead_diffusion") gets `EDMMultiheadEps`."""
    if loaded.kind == "multihead_diffusion":
        settings = loaded.diffusion_settings
        return EDMMultiheadEps(loaded.network, settings["num_timesteps"], settings["beta_min"], settings["beta_d"])
    precond = loaded.network.precond
    if precond not in EDM_EPS_ADAPTERS:
        raise ValueError(f"no eps adapter for an EDM network with precond {precond!r}")
    return EDM_EPS_ADAPTERS[precond](loaded.network, loaded.diffusion_settings)


def _is_edm(loaded):
    return family_of(loaded).edm


class ScoreSDEEps(nn.Module):
    """eps(x_t, t_model) of a score_sde NCSN++ trained on the continuous VP SDE (DiffPure's CIFAR-10 network).

    t_model goes to the network unchanged as its time label: on score_sde's continuous convention the caller passes
    (N - 1)·t = t·999 (not floored; `time_input` "continuous"). For continuous VP training the network output IS the
    eps prediction (score_sde's score is -out / std(t)), so nothing is converted. The network is unconditional
    (labels are refused). t_model: a number or [N] labels.
    """

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x_t, t_model, y=None):
        if y is not None:
            raise ValueError("score_sde's NCSN++ is unconditional (DiffPure's CIFAR-10 purifier); pass no labels y")
        labels = torch.as_tensor(t_model, dtype=torch.float32, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        return self.network(x_t, labels)


def eps_model(loaded, *, unconditional=False, guidance_scale=0.0):
    """The eps-predicting callable ``model(x_t, t_model, y=None)`` that diffusion.py expects.

    unconditional=False: class-conditional (labels y required) for class-conditional and multi-head models,
    plain for unconditional ones. unconditional=True: the unconditional prediction — the network itself for
    unconditional models, the null class for label-dropout models (error for models without one).
    guidance_scale w > 0: classifier-free guidance of a null-class model (labels required).
    """
    if loaded.kind not in ("diffusion", "multihead_diffusion"):
        raise ValueError(f"a {loaded.kind!r} model has no eps prediction")
    network = loaded.network
    adapter = family_of(loaded).eps_adapter
    if adapter is not None:
        if guidance_scale:
            raise ValueError(f"guidance needs a model with a null class; {loaded.architecture['family']} models have "
                             "none")
        return adapter(loaded)  # an unconditional network: the same model for unconditional=True
    if _is_edm(loaded):
        if guidance_scale:
            raise ValueError("guidance needs a model with a null class; EDM models have none")
        if unconditional and loaded.kind == "multihead_diffusion":
            raise ValueError("a multi-head model has no unconditional prediction")
        return _edm_eps(loaded)
    if loaded.kind == "multihead_diffusion":
        if unconditional or guidance_scale:
            raise ValueError("a multi-head model has no unconditional prediction (and hence no guidance)")
        return MultiheadEps(eps_network(loaded), loaded.extra["num_classes"])
    class_conditional = getattr(network, "num_classes", None) is not None
    network = eps_network(loaded)
    if not class_conditional:
        if guidance_scale:
            raise ValueError("guidance needs a class-conditional model with a null class")
        return UnlabelledEps(network)
    null_class = loaded.null_class
    if unconditional or guidance_scale:
        if null_class is None:
            raise ValueError("this class-conditional model has no null class, hence no unconditional prediction")
        null_eps = LabelledEps(network, fixed_label=null_class)
        if unconditional:
            if guidance_scale:
                raise ValueError("guidance applies to class-conditional predictions, not to unconditional=True")
            return null_eps
        return GuidedEps(LabelledEps(network), null_eps, guidance_scale)
    return LabelledEps(network)


def num_label_classes(loaded):
    """Number of real classes a diffusion model distinguishes (its label embedding minus the null class, or its
    heads); None for unconditional models."""
    if loaded.kind == "multihead_diffusion":
        return loaded.extra["num_classes"]
    if _is_edm(loaded):
        return loaded.network.label_dim or None
    rows = getattr(loaded.network, "num_classes", None)
    if rows is None:
        return None
    return rows - 1 if loaded.null_class is not None else rows


def all_class_eps(loaded, x_t, t_model):
    """eps for every real class, [N, K, C_out, H, W]: one pass of a multi-head model, K passes otherwise (RDC's
    cost comparison)."""
    if loaded.kind == "multihead_diffusion":
        return eps_model(loaded).all_classes(x_t, t_model)  # MultiheadEps (ADM) or EDMMultiheadEps: one pass
    model = eps_model(loaded)
    count = num_label_classes(loaded)
    if count is None:
        raise ValueError("an unconditional model has no per-class eps")
    return torch.stack([model(x_t, t_model, torch.full((x_t.shape[0],), k, dtype=torch.long, device=x_t.device))
                        for k in range(count)], dim=1)
