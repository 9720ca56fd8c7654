"""Stand-ins for the datasets the paper-scale presets read, in the official file layouts, from seeded random pixels:

- `write_cifar10_tarball`: cifar-10-python.tar.gz as published (folder cifar-10-batches-py/ with data_batch_1..5,
  test_batch, batches.meta, readme.html; each batch a protocol-2 pickle of the dict with bytes keys b"batch_label",
  b"labels", b"data" uint8 N x 3072 (channel planes R, G, B of 32 x 32), b"filenames"), byte-for-byte reproducible
  from its seed (fixed tar and gzip timestamps), so its md5 can stand in for the published one;
- `write_mist_target`: Diff-Protect's Mist target image (registry `diff_protect_mist_target`), a texture PNG of the
  registry's byte size;
- `write_imagenet_val_tree`: an ILSVRC2012 validation folder in the valprep.sh layout (one folder per WordNet id,
  JPEGs named ILSVRC2012_val_<8 digits>.JPEG), in the order `data.imagenet_files` reads it (sorted folders).

The images are noise: the rehearsal proves the files are read, not that a model classifies them.
"""

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np

from diffrobust.io import atomic_path

CIFAR10_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_FOLDER = "cifar-10-batches-py"
# the official tarball's members date from 2009-06-04; any fixed time keeps the archive's md5 reproducible
_CIFAR10_MTIME = 1244146800
# ImageNet's first class (tench); the stand-in ids count up from it so that sorted order is generation order
FIRST_WORDNET_ID = 1440764


def _cifar10_batch(rng, count, batch_label, first_index):
    """One batch dict as the official pickles hold it: labels a list of ints, every class present when count >= 10."""
    labels = rng.permutation(np.arange(count) % 10)
    return {
        b"batch_label": batch_label.encode(),
        b"labels": [int(label) for label in labels],
        b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        b"filenames": [f"rehearsal_{CIFAR10_LABEL_NAMES[label]}_s_{first_index + i:06d}.png".encode()
                       for i, label in enumerate(labels)],
    }


def _add_member(archive, name, payload):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), _CIFAR10_MTIME, 0o644
    archive.addfile(info, io.BytesIO(payload))


def write_cifar10_tarball(path, images_per_batch, seed):
    """Write a cifar-10-python.tar.gz of `images_per_batch` seeded random images in each of the five training
    batches and the test batch to `path` (atomically); return {"md5", "size"} of the file written."""
    images_per_batch = int(images_per_batch)
    if images_per_batch < 1:
        raise ValueError(f"write_cifar10_tarball: images_per_batch must be at least 1, got {images_per_batch}")
    rng = np.random.default_rng(seed)
    batches = {f"data_batch_{i}": _cifar10_batch(rng, images_per_batch, f"training batch {i} of 5",
                                                 (i - 1) * images_per_batch) for i in range(1, 6)}
    batches["test_batch"] = _cifar10_batch(rng, images_per_batch, "testing batch 1 of 1", 0)
    members = {name: pickle.dumps(batch, protocol=2) for name, batch in batches.items()}
    members["batches.meta"] = pickle.dumps({b"num_cases_per_batch": images_per_batch, b"num_vis": 3072,
                                            b"label_names": [name.encode() for name in CIFAR10_LABEL_NAMES]},
                                           protocol=2)
    members["readme.html"] = (b"<meta HTTP-EQUIV=\"REFRESH\" content=\"0; "
                              b"url=http://www.cs.toronto.edu/~kriz/cifar.html\">\n")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as archive:
        folder = tarfile.TarInfo(CIFAR10_FOLDER)
        folder.type, folder.mtime, folder.mode = tarfile.DIRTYPE, _CIFAR10_MTIME, 0o755
        archive.addfile(folder)
        for name in sorted(members):
            _add_member(archive, f"{CIFAR10_FOLDER}/{name}", members[name])
    compressed = io.BytesIO()
    # no file name and a zero time in the gzip header: the same seed gives the same bytes
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0) as stream:
        stream.write(raw.getvalue())
    data = compressed.getvalue()
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return {"md5": hashlib.md5(data).hexdigest(), "size": len(data)}


def wordnet_ids(n_classes):
    """`n_classes` ids in WordNet's n######## form, sorted in their class-index order."""
    return [f"n{FIRST_WORDNET_ID + index:08d}" for index in range(int(n_classes))]


def _image_size(size):
    """(width, height) from an int (square) or a (width, height) pair."""
    width, height = (size, size) if np.ndim(size) == 0 else size
    if int(width) < 1 or int(height) < 1:
        raise ValueError(f"write_imagenet_val_tree: size must be positive, got {size!r}")
    return int(width), int(height)


def write_imagenet_val_tree(folder, n_classes, images_per_class, size, seed, distinct_images=None):
    """Write an ILSVRC2012 val-style tree under `folder`: `n_classes` WordNet-id folders of `images_per_class`
    seeded random RGB JPEGs of `size` (an int, square, or (width, height)); validation numbers run class after
    class. With `distinct_images`, only that many JPEGs are encoded and the other files are hard links to them in
    turn, so that the full 1,000 x 50 layout (whose ImageFolder indices DiffPure's seeded subsets address) costs
    seconds, not 50,000 encodings. Returns [(path, class index)] in `data.imagenet_files` order."""
    from PIL import Image

    width, height = _image_size(size)
    if int(n_classes) < 1 or int(images_per_class) < 1:
        raise ValueError(f"write_imagenet_val_tree: n_classes and images_per_class must be at least 1, got "
                         f"{n_classes} and {images_per_class}")
    if distinct_images is not None and int(distinct_images) < 1:
        raise ValueError(f"write_imagenet_val_tree: distinct_images must be at least 1, got {distinct_images}")
    rng = np.random.default_rng(seed)
    files, encoded, number = [], [], 0
    for label, wnid in enumerate(wordnet_ids(n_classes)):
        for _ in range(int(images_per_class)):
            number += 1
            path = Path(folder) / wnid / f"ILSVRC2012_val_{number:08d}.JPEG"
            if distinct_images is not None and len(encoded) >= int(distinct_images):
                _link_or_copy(encoded[(number - 1) % len(encoded)], path)
            else:
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                with atomic_path(path) as temp:
                    Image.fromarray(pixels, "RGB").save(temp, format="JPEG", quality=90)
                encoded.append(path)
            files.append((path, label))
    return files


def _link_or_copy(source, path):
    """A hard link to `source` at `path` (a copy where the file system has none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    try:
        os.link(source, path)
    except OSError:
        shutil.copyfile(source, path)


# Mist's target texture as Diff-Protect ships it (test_images/target/MIST.png): 1440 x 1440 RGB
MIST_TARGET_SIZE = 1440


def _png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def padded_png(pixels, total_bytes):
    """PNG bytes of `pixels` (H x W x 3 uint8) grown to exactly `total_bytes` by a tEXt chunk before IEND (ancillary:
    readers ignore it), so that a registry `size` check holds for a made stand-in."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", optimize=True)
    data = buffer.getvalue()
    iend = data.rindex(b"IEND") - 4
    smallest = len(data) + 12 + len(b"rehearsal\0")  # the image and an empty tEXt chunk (length, type, CRC, key)
    padding = int(total_bytes) - smallest
    if padding < 0:
        raise ValueError(f"padded_png: the image and its padding chunk take at least {smallest} bytes, more than "
                         f"{total_bytes}")
    text = _png_chunk(b"tEXt", b"rehearsal\0" + b"x" * padding)
    return data[:iend] + text + data[iend:]


def write_mist_target(entry, folder, *, seed, reduced=False):
    """The `diff_protect_mist_target` registry file: a 1440 x 1440 RGB PNG texture (seeded stripes, not Mist's
    picture) of exactly the registry's byte size. Returns {'num_params': None, 'reduced': None}."""
    (file_entry,) = entry["files"]
    rng = np.random.default_rng(seed)
    period = rng.integers(8, 64, 3)
    ramp = np.arange(MIST_TARGET_SIZE)
    stripes = ((ramp[:, None, None] + ramp[None, :, None]) // period % 2 * 255).astype(np.uint8)
    payload = padded_png(np.broadcast_to(stripes, (MIST_TARGET_SIZE, MIST_TARGET_SIZE, 3)).copy(),
                         file_entry.get("size") or 0)
    with atomic_path(Path(folder) / file_entry["path"]) as temp:
        temp.write_bytes(payload)
    return {"num_params": None, "reduced": None}


# rehearsal writers keyed by registry checkpoint name (files that are not networks)
WRITERS = {"diff_protect_mist_target": write_mist_target}
