"""Rehearsal writers of DiffPure's ImageNet classifiers: official-format weight files with seeded random weights.

`WRITERS[family](entry, folder, *, seed, reduced=False)` writes every `entry['files'][i]['path']` of a
config/checkpoints.yaml entry under `folder` in the publisher's format and returns {'num_params', 'reduced'}:
- `torchvision_classifier`: torchvision's bare state dict (download.pytorch.org resnet50 / wide_resnet50_2), via
  torch.save of the torchvision network's state dict;
- `timm_deit`: the facebookresearch/deit release, {"model": state_dict} in timm's key layout.
At official size unless `reduced` (then the width shrinks and the returned 'reduced' line says how), so that the
files load through diffrobust.models.load_registry_checkpoint like the downloads.
"""

import os
from pathlib import Path

import torch


def _weights_file(entry, folder):
    files = entry["files"]
    if len(files) != 1:
        raise ValueError(f"{entry.get('description', 'entry')}: one weight file expected, got {len(files)}")
    return Path(folder) / files[0]["path"]


def _save(contents, path):
    """torch.save to a temporary name first, so that a failed write leaves no half-written weight file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    torch.save(contents, temporary)
    os.replace(temporary, path)


def _result(network, reduced):
    return {"num_params": sum(p.numel() for p in network.parameters()), "reduced": reduced}


def write_torchvision_classifier(entry, folder, *, seed, reduced=False):
    """torchvision's ResNet-50 / WideResNet-50-2 state dict (torchvision.models.resnet50 / wide_resnet50_2 at
    official size); `reduced`: width_per_group 8, a file the registry architecture with `width_per_group: 8`
    loads."""
    from torchvision.models.resnet import Bottleneck, ResNet

    from diffrobust.networks.pretrained import TORCHVISION_CLASSIFIERS

    config = entry["architecture"]["config"]
    name, width = config["model_name"], TORCHVISION_CLASSIFIERS[config["model_name"]]
    note = None
    if reduced:
        width = 8
        note = (f"{name} with width_per_group 8 (official {TORCHVISION_CLASSIFIERS[name]}): the official file's "
                "keys, fewer channels")
    torch.manual_seed(seed)
    network = ResNet(Bottleneck, [3, 4, 6, 3], num_classes=config["num_classes"], width_per_group=width)
    _save(network.state_dict(), _weights_file(entry, folder))
    return _result(network, note)


def write_timm_deit(entry, folder, *, seed, reduced=False):
    """facebookresearch/deit's {"model": state_dict}; `reduced`: embed_dim 96 and 2 heads (official 384, 6)."""
    import timm

    config = entry["architecture"]["config"]
    kwargs = {"num_classes": config["num_classes"]}
    note = None
    if reduced:
        kwargs.update(embed_dim=96, num_heads=2)
        note = f"{config['model_name']} with embed_dim 96 and 2 heads (official 384, 6), 12 blocks as released"
    torch.manual_seed(seed)
    network = timm.create_model(config["model_name"], pretrained=False, **kwargs)
    _save({"model": network.state_dict()}, _weights_file(entry, folder))
    return _result(network, note)


WRITERS = {"torchvision_classifier": write_torchvision_classifier, "timm_deit": write_timm_deit}
