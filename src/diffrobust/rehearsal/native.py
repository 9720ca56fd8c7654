"""Rehearsal writers of the checkpoints whose official files are plain torch files or EDM pickles.

Each writer builds the registry entry's network at its official size with the project's builder (the one the loaders
are tested against), gives it seeded random weights, and writes it in the publisher's file layout, so that the
workflow's download, verification and loading code reads it exactly as it reads the real file:

| family | official file | layout written here |
| --- | --- | --- |
| improved_diffusion_unet, guided_diffusion_unet | `*.pt` | `torch.save(state_dict)` (openai's release) |
| edm_vp_songunet | `edm-*.pkl` | `pickle.dump(dict(ema=net, ...))` in torch_utils.persistence's form |
| score_sde_ncsnpp | `checkpoint_8.pth` | `{'optimizer', 'model' (DataParallel 'module.' keys), 'ema', 'step'}` |
| robustbench_wrn | `Standard.pt` | `{'state_dict': 'module.'-prefixed}` (RobustBench's Google Drive file) |
| robustbench_dm_wrn | `*_WRN-70-16.pt` | `{'state_dict': 'module.'-prefixed}` |

`reduced=True` keeps the family and file layout and shrinks the width (documented in the returned 'reduced' line):
for networks whose CPU cost does not fit a 2-core rehearsal.
"""

import pickle
import sys
import types
from pathlib import Path

import torch
from torch import nn

from diffrobust.io import atomic_path

# Width keys of each family's config and what `reduced` divides them by.
REDUCED_WIDTH = {
    "improved_diffusion_unet": ("num_channels", 4),
    # 256 -> 32: the 256 px UNet is the one network every ImageNet stage runs (DensePure, DDS, DiffPure, PDM-Pure)
    "guided_diffusion_unet": ("num_channels", 8),
    "edm_vp_songunet": ("model_channels", 4),
    "score_sde_ncsnpp": ("nf", 4),
    "robustbench_wrn": ("widen_factor", 5),
    "robustbench_dm_wrn": ("width", 4),
}
# Parameters an official builder initialises to exactly zero (ADM's and EDM's output layers) get N(0, ZERO_FILL²):
# a network whose output is identically zero would hide wiring mistakes downstream.
ZERO_FILL = 0.01


def architecture_for(entry, reduced):
    """The architecture block to build: the registry's, or with its width divided (see REDUCED_WIDTH).
    Returns (architecture, reduced_description or None)."""
    architecture = {"family": entry["architecture"]["family"], "config": dict(entry["architecture"].get("config", {}))}
    if not reduced:
        return architecture, None
    key, factor = REDUCED_WIDTH[architecture["family"]]
    config = architecture["config"]
    official = config.get(key)
    if official is None:
        raise ValueError(f"{architecture['family']}: the registry config has no {key!r} to reduce")
    config[key] = max(1, int(official) // factor)
    if architecture["family"] == "guided_diffusion_unet" and "num_head_channels" in config:
        config["num_head_channels"] = min(int(config["num_head_channels"]), config[key])
    return architecture, f"{key} {official} -> {config[key]}"


def seeded_network(architecture, seed):
    """The registry network with the builder's initialisation under `seed`, zero-initialised parameters filled."""
    from diffrobust.networks import build_network

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_network(architecture)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for parameter in network.parameters():
                if parameter.is_floating_point() and not parameter.any():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * ZERO_FILL)
    return network.eval()


def _save_torch(contents, path):
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        torch.save(contents, handle)


def _prefixed(state_dict, prefix="module."):
    return {prefix + key: value for key, value in state_dict.items()}


def _only_file(entry):
    files = [file_entry["path"] for file_entry in entry["files"]]
    if len(files) != 1:
        raise ValueError(f"expected one file in the registry entry, found {files}")
    return files[0]


def _result(network, reduced, architecture):
    """What a writer made: parameters, how it was reduced, and the architecture block its files match (the
    rehearsal's registry gives the loaders that block)."""
    return {"num_params": sum(p.numel() for p in network.parameters()), "reduced": reduced,
            "architecture": architecture}


def write_adm_state_dict(entry, folder, *, seed, reduced=False):
    """improved-diffusion / guided-diffusion: the release is `torch.save(model.state_dict())` (CIFAR-10 52.5M
    parameters, ImageNet 256 uncond 552.8M)."""
    architecture, note = architecture_for(entry, reduced)
    network = seeded_network(architecture, seed)
    _save_torch(network.state_dict(), Path(folder) / _only_file(entry))
    return _result(network, note, architecture)


def write_robustbench_state_dict(entry, folder, *, seed, reduced=False):
    """RobustBench's files: `{'state_dict': DataParallel state dict ('module.' keys)}` (WRN-28-10 36.5M parameters,
    WRN-70-16 266.8M)."""
    architecture, note = architecture_for(entry, reduced)
    network = seeded_network(architecture, seed)
    _save_torch({"state_dict": _prefixed(network.state_dict())}, Path(folder) / _only_file(entry))
    return _result(network, note, architecture)


def write_score_sde_checkpoint(entry, folder, *, seed, reduced=False):
    """score_sde's `checkpoint_8.pth` (106.6M parameters): {'optimizer': Adam state dict, 'model': DataParallel state
    dict, 'ema': {'decay', 'num_updates', 'shadow_params' (parameters() order)}, 'step'}. The EMA copy differs from
    'model' (as in a real checkpoint), so a loader that took 'model' instead of the EMA would be caught; the Adam
    moments are left out (the loader never reads them; the real file is about 3x larger for them)."""
    architecture, note = architecture_for(entry, reduced)
    network = seeded_network(architecture, seed)
    generator = torch.Generator().manual_seed(seed + 2)
    shadow = [p.detach() + torch.randn(p.shape, generator=generator) * 1e-3 for p in network.parameters()]
    optimizer = {"state": {}, "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
                                                "amsgrad": False, "params": list(range(len(shadow)))}]}
    checkpoint = {"optimizer": optimizer, "model": _prefixed(network.state_dict()),
                  "ema": {"decay": float(entry["architecture"]["config"].get("ema_rate", 0.9999)),
                          "num_updates": 1300001, "shadow_params": shadow},
                  "step": 1300001}
    _save_torch(checkpoint, Path(folder) / _only_file(entry))
    return _result(network, note, architecture)


# --- NVlabs/edm network pickles ----------------------------------------------------------------------------------
# torch_utils.persistence pickles every instance of a persistent class (the networks of training/networks.py, the
# loss and the augmentation pipe) as _reconstruct_persistent_obj(meta), meta = dict(type='class', version=6,
# module_src=<the module's source>, class_name, state=<instance __dict__ plus _init_args/_init_kwargs>).

# Stands in for training/networks.py's source; the project's reader never executes module_src.
MODULE_SOURCE_PLACEHOLDER = "# rehearsal: training/networks.py source is not embedded\n"


class _EDMLoss:
    """Like EDM's persistent EDMLoss (P_mean -1.2, P_std 1.2, sigma_data 0.5), pickled next to the network."""

    def __init__(self):
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5


class _AugmentPipe:
    def __init__(self):
        self.p, self.xflip, self.yflip, self.scale, self.rotate_frac = 0.12, 1e8, 1, 1, 1


def _persistence_module():
    """A `torch_utils.persistence` module whose _reconstruct_persistent_obj pickle can name (it is never called)."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise RuntimeError("a rehearsal EDM pickle is read by diffrobust's restricted reader, not unpickled")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package = types.ModuleType("torch_utils")
    package.persistence = persistence
    return package, persistence


class _PersistencePickler(pickle.Pickler):
    """Pickles the project's EDM modules the way torch_utils.persistence pickles EDM's."""

    def __init__(self, file, reconstruct, network_kwargs, wrapper_name):
        super().__init__(file, protocol=4)
        self.reconstruct, self.network_kwargs, self.wrapper_name = reconstruct, network_kwargs, wrapper_name

    def reducer_override(self, obj):
        from diffrobust.networks import edm

        persistent = isinstance(obj, (_EDMLoss, _AugmentPipe)) or (
            isinstance(obj, nn.Module) and type(obj).__module__ == edm.__name__)
        if not persistent:
            return NotImplemented
        state = dict(obj.__dict__)
        state["_init_args"] = ()
        state["_init_kwargs"] = dict(self.network_kwargs) if isinstance(obj, edm._Preconditioned) else {}
        class_name = self.wrapper_name if isinstance(obj, edm._Preconditioned) else type(obj).__name__
        if isinstance(obj, _EDMLoss):
            class_name = "EDMLoss"
        elif isinstance(obj, _AugmentPipe):
            class_name = "AugmentPipe"
        meta = dict(type="class", version=6, module_src=MODULE_SOURCE_PLACEHOLDER, class_name=class_name, state=state)
        return self.reconstruct, (meta,)


def write_edm_pickle(entry, folder, *, seed, reduced=False):
    """NVlabs/edm's `network-snapshot` pickle: dict(ema=<EDMPrecond|VPPrecond>, loss_fn, augment_pipe,
    dataset_kwargs), each persistent object in torch_utils.persistence's form (55.7M parameters for the CIFAR-10
    DDPM++ models). The wrapper class named in the pickle follows the registry's `precond`."""
    from diffrobust.networks import edm

    architecture, note = architecture_for(entry, reduced)
    network = seeded_network(architecture, seed).requires_grad_(False)
    wrapper = {"edm": "EDMPrecond", "vp": "VPPrecond"}[network.precond]
    config = architecture["config"]
    kwargs = {"img_resolution": config["img_resolution"], "img_channels": config["img_channels"],
              "label_dim": config.get("label_dim", 0), "use_fp16": config.get("use_fp16", False),
              "model_type": config.get("model_type", "SongUNet"),
              "embedding_type": config.get("embedding_type"), "model_channels": config.get("model_channels"),
              "channel_mult": config.get("channel_mult"), "dropout": config.get("dropout")}
    data = dict(ema=network, loss_fn=_EDMLoss(), augment_pipe=_AugmentPipe(),
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10-32x32.zip",
                                    use_labels=bool(kwargs["label_dim"]), xflip=False, cache=True,
                                    resolution=config["img_resolution"], max_size=50000))
    package, persistence = _persistence_module()
    saved = {name: sys.modules.get(name) for name in ("torch_utils", "torch_utils.persistence")}
    sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = package, persistence
    try:
        with atomic_path(Path(folder) / _only_file(entry)) as temporary, open(temporary, "wb") as handle:
            _PersistencePickler(handle, persistence._reconstruct_persistent_obj, kwargs, wrapper).dump(data)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    assert edm.precond_of_class(wrapper) == network.precond
    return _result(network, note, architecture)


WRITERS = {
    "improved_diffusion_unet": write_adm_state_dict,
    "guided_diffusion_unet": write_adm_state_dict,
    "edm_vp_songunet": write_edm_pickle,
    "score_sde_ncsnpp": write_score_sde_checkpoint,
    "robustbench_wrn": write_robustbench_state_dict,
    "robustbench_dm_wrn": write_robustbench_state_dict,
}
