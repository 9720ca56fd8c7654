"""Small helpers shared by the test modules (import with `from helpers import ...`)."""

import torch


def randomize(network, seed, scale=0.05):
    """Give every parameter seeded random values: ADM and EDM zero-initialise their output layers, and timm / HF
    initialise heads to near zero, which would hide a mistake in loading or wiring."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return network


def class_distinct_edm(config, seed=0):
    """A random EDMPrecond (an `edm_vp_songunet` config with precond 'edm') whose classes give clearly different
    outputs: weights N(0, 0.3²), the conditioning path (map_label, map_layer0/1, every block's affine) 10x larger
    (at `randomize`'s N(0, 0.05²) the classes agree to about 1e-6). Eval mode, frozen."""
    from diffrobust.networks import edm

    network = randomize(edm.build_edm_vp_songunet(config), seed, scale=0.3)
    with torch.no_grad():
        for name, parameter in network.model.named_parameters():
            if name.startswith(("map_label.", "map_layer")) or ".affine." in name:
                parameter.mul_(10.0)
    return network.eval().requires_grad_(False)


def tiny_mnist_project(root, attention_resolutions="16"):
    """A 20-image MNIST test split (`root/mnist`) and random-weight mini models (`root/diffusion.pt`, a
    class-conditional ADM UNet with a null class; `root/classifier.pt`, a small ResNet): what the stage tests run
    their jobs on (the jobs do not care how good the models are)."""
    from diffrobust import data, models
    from diffrobust.networks.classifiers import build_small_resnet

    data.prepare_mnist(root / "mnist", test_per_class=2)
    torch.manual_seed(0)
    unet = {"family": "adm_unet", "config": {"in_channels": 1, "image_size": 32, "num_channels": 32,
                                             "num_res_blocks": 1, "channel_mult": "1,1",
                                             "attention_resolutions": attention_resolutions, "num_head_channels": 32,
                                             "class_cond": True, "num_classes": 11}}
    models.save_model(root / "diffusion.pt", models.build_architecture(unet), kind="diffusion", architecture=unet,
                      diffusion=models.diffusion_settings("linear", 1000, null_class=10))
    resnet = {"family": "small_resnet", "config": {"in_channels": 1, "num_classes": 10, "width": 8, "depth": 8}}
    models.save_model(root / "classifier.pt", build_small_resnet(resnet["config"]), kind="classifier",
                      architecture=resnet)
    return root


class Interrupted(Exception):
    """Raised by `interrupt_at` to stop a training loop part-way (a kill, from the resume logic's point of view)."""


def interrupt_at(step_to_stop):
    """A training step hook that raises Interrupted at `step_to_stop`."""
    def hook(step):
        if step == step_to_stop:
            raise Interrupted
    return hook


def write_toy_dataset(folder, make, splits, meta):
    """A prepared dataset folder from `make(count, seed) -> (uint8 images, labels)` for each (split, count, seed)."""
    import numpy as np

    from diffrobust import data

    arrays = {}
    for split, count, seed in splits:
        images, labels = make(count, seed)
        arrays.update({f"{split}_images": images, f"{split}_labels": labels,
                       f"{split}_indices": np.arange(count, dtype=np.int64)})
    data.write_dataset(folder, meta, arrays)
    return folder
