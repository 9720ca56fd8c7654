"""The rehearsal's stand-in datasets are read by the real preparation code: the CIFAR-10 tarball through
`prepare_cifar10` with its md5, the ImageNet tree through `prepare_imagenet`."""

import pickle
import tarfile

import numpy as np
import pytest

from diffrobust import data
from diffrobust.rehearsal.datasets import write_cifar10_tarball, write_imagenet_val_tree


def test_cifar10_tarball_prepares_with_its_md5_into_the_expected_splits(tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    facts = write_cifar10_tarball(tarball, images_per_batch=20, seed=3)
    assert facts["size"] == tarball.stat().st_size
    meta = data.prepare_cifar10(tmp_path / "prepared", tarball, md5=facts["md5"])
    assert meta["splits"]["train"]["count"] == 100 and meta["splits"]["test"]["count"] == 20
    assert meta["splits"]["test"]["per_class"] == [2] * 10
    prepared = data.load_dataset(tmp_path / "prepared")
    with tarfile.open(tarball) as archive:
        names = sorted(archive.getnames())
        test_batch = pickle.load(archive.extractfile("cifar-10-batches-py/test_batch"), encoding="bytes")
        label_names = pickle.load(archive.extractfile("cifar-10-batches-py/batches.meta"),
                                  encoding="bytes")[b"label_names"]
    assert names == ["cifar-10-batches-py"] + [f"cifar-10-batches-py/{n}" for n in [
        "batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
        "readme.html", "test_batch"]]
    assert sorted(test_batch) == [b"batch_label", b"data", b"filenames", b"labels"]
    assert label_names[0] == b"airplane" and len(test_batch[b"filenames"]) == 20
    assert prepared["test"].labels.tolist() == test_batch[b"labels"]
    np.testing.assert_array_equal(prepared["test"].images, test_batch[b"data"].reshape(20, 3, 32, 32))


def test_cifar10_tarball_is_reproducible_from_its_seed(tmp_path):
    first = write_cifar10_tarball(tmp_path / "a.tar.gz", images_per_batch=3, seed=1)
    assert write_cifar10_tarball(tmp_path / "b.tar.gz", images_per_batch=3, seed=1) == first
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    assert write_cifar10_tarball(tmp_path / "c.tar.gz", images_per_batch=3, seed=2)["md5"] != first["md5"]
    with pytest.raises(data.DataError, match="md5"):
        data.prepare_cifar10(tmp_path / "prepared", tmp_path / "c.tar.gz", md5=first["md5"])


def test_imagenet_tree_prepares_through_prepare_imagenet_with_its_labels(tmp_path):
    val_dir = tmp_path / "val"
    written = write_imagenet_val_tree(val_dir, n_classes=3, images_per_class=2, size=(40, 30), seed=0)
    classes, files = data.imagenet_files(val_dir)
    assert classes == ["n01440764", "n01440765", "n01440766"]
    assert files == written
    assert [path.name for path, _ in files][:3] == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG",
                                                    "ILSVRC2012_val_00000003.JPEG"]
    meta = data.prepare_imagenet(tmp_path / "prepared", val_dir, indices=[5, 0, 3], image_size=24)
    assert meta["num_files"] == 6 and meta["class_names"] == classes
    prepared = data.load_dataset(tmp_path / "prepared")["val"]
    assert prepared.indices.tolist() == [0, 3, 5]
    assert prepared.labels.tolist() == [0, 1, 2]
    assert prepared.images.shape == (3, 3, 24, 24) and prepared.images.dtype == np.uint8
    # noise survives JPEG as noise: the images are not blank
    assert prepared.images.std() > 30


def _registry_entry(name):
    import yaml

    from diffrobust.config import CHECKPOINTS_REGISTRY

    return yaml.safe_load(CHECKPOINTS_REGISTRY.read_text())[name]


def test_mist_target_is_an_rgb_png_of_the_registry_size(tmp_path):
    from PIL import Image

    from diffrobust.rehearsal.datasets import WRITERS, write_mist_target

    entry = _registry_entry("diff_protect_mist_target")
    (file_entry,) = entry["files"]
    assert WRITERS["diff_protect_mist_target"] is write_mist_target
    info = write_mist_target(entry, tmp_path / "mist", seed=4)
    assert info == {"num_params": None, "reduced": None}
    path = tmp_path / "mist" / file_entry["path"]
    assert path.stat().st_size == file_entry["size"] == 160260
    with Image.open(path) as image:
        image.load()  # decodes every chunk: the padding chunk's CRC is checked
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (1440, 1440)
        pixels = np.asarray(image)
    # stripes, not a blank image; black and white only
    assert set(np.unique(pixels).tolist()) == {0, 255}
    assert not list(tmp_path.rglob("*.tmp"))
    # reproducible from its seed; another seed gives other stripes
    write_mist_target(entry, tmp_path / "again", seed=4)
    write_mist_target(entry, tmp_path / "other", seed=5)
    assert (tmp_path / "again" / file_entry["path"]).read_bytes() == path.read_bytes()
    assert (tmp_path / "other" / file_entry["path"]).read_bytes() != path.read_bytes()


@pytest.mark.parametrize("extra", [0, 1, 777, 10_000])
def test_padded_png_hits_the_byte_count_and_keeps_the_pixels(extra):
    import io

    from PIL import Image

    from diffrobust.rehearsal.datasets import padded_png

    pixels = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    plain = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(plain, format="PNG", optimize=True)
    # the smallest total: the image plus an empty tEXt chunk (4 length + 4 type + 4 CRC + 'rehearsal\0')
    smallest = len(plain.getvalue()) + 12 + len(b"rehearsal\0")
    data = padded_png(pixels, smallest + extra)
    assert len(data) == smallest + extra
    assert data.endswith(b"IEND\xaeB`\x82")
    with Image.open(io.BytesIO(data)) as image:
        np.testing.assert_array_equal(np.asarray(image), pixels)
        assert image.text == {"rehearsal": "x" * extra}
    with pytest.raises(ValueError, match=f"take at least {smallest} bytes, more than {smallest - 1}"):
        padded_png(pixels, smallest - 1)
