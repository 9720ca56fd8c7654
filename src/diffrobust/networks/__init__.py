"""Networks that load the papers' published checkpoints unchanged.

`build_network(architecture)` takes the `architecture` block of a config/checkpoints.yaml entry
(`{"family": ..., "config": {...official flags...}}`) and returns an untrained `torch.nn.Module`
whose state dict has exactly the keys and shapes of the official code's.
"""

from importlib import import_module

# family -> "module:function"; imported lazily so that importing diffrobust stays cheap.
BUILDERS = {
    "improved_diffusion_unet": "diffrobust.networks.adm:build_improved_diffusion_unet",
    "guided_diffusion_unet": "diffrobust.networks.adm:build_guided_diffusion_unet",
    "edm_vp_songunet": "diffrobust.networks.edm:build_edm_vp_songunet",
    "score_sde_ncsnpp": "diffrobust.networks.ncsnpp:build_score_sde_ncsnpp",
    "robustbench_wrn": "diffrobust.networks.wrn:build_robustbench_wrn",
    "robustbench_dm_wrn": "diffrobust.networks.dm_wrn:build_robustbench_dm_wrn",
    "hf_vit": "diffrobust.networks.pretrained:build_hf_vit",
    "hf_clip_vision": "diffrobust.networks.pretrained:build_hf_clip_vision",
    "timm_beit": "diffrobust.networks.pretrained:build_timm_beit",
    "torchvision_classifier": "diffrobust.networks.pretrained:build_torchvision_classifier",
    "timm_deit": "diffrobust.networks.pretrained:build_timm_deit",
}


def build_network(architecture):
    """Build the network described by a registry `architecture` block."""
    family = architecture.get("family")
    if family not in BUILDERS:
        raise ValueError(
            f"unknown network family {family!r}; known families: {', '.join(sorted(BUILDERS))}"
        )
    module_name, function_name = BUILDERS[family].split(":")
    builder = getattr(import_module(module_name), function_name)
    return builder(dict(architecture.get("config", {})))
