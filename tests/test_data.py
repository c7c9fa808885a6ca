"""Data: MNIST-1D generation and cache, the readers on tiny files made here (CIFAR pickles,
MNIST IDX, npz, image folders), the (seed, epoch) order contract and the augmentation."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from sparse_training.config import DataConfig
from sparse_training.data import DATA_NAMES, TensorData, crop_flip, load_data
from sparse_training.errors import UserError
from sparse_training.models import build_model, model_config_for

CIFAR10_MEAN, CIFAR10_STD = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])


def collect(batches):
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------- MNIST-1D

def test_mnist1d_is_the_package_generator_output_cached_per_seed(tmp_path, monkeypatch):
    import mnist1d.data

    monkeypatch.setenv("SPARSE_LANDSCAPE_CACHE", str(tmp_path))
    numpy_state = np.random.get_state()[1].copy()
    data = load_data(DataConfig("mnist1d", seed=42))
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # generation left the global RNG alone
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1
    assert (data.num_classes, data.input_shape, data.num_samples("train"), data.num_samples("test")) == (10, (40,), 4000, 1000)

    reference = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())  # seed 42 is the package default
    x, y = collect(data.eval_batches("train", 4000))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(reference["x"].astype(np.float32)))
    assert torch.equal(y, torch.from_numpy(reference["y"]))

    def no_generation(*args, **kwargs):
        raise AssertionError("the cache should have been read")

    with monkeypatch.context() as patch:
        patch.setattr(mnist1d.data, "make_dataset", no_generation)
        again = load_data(DataConfig("mnist1d", seed=42, data_dir=str(tmp_path)))  # --data-dir, same cache
    test_x = collect(data.eval_batches("test", 1000))[0]
    assert torch.equal(collect(again.eval_batches("test", 1000))[0], test_x)

    other = load_data(DataConfig("mnist1d", seed=7, data_dir=str(tmp_path)))  # the cache key holds the seed
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 2
    assert not torch.equal(collect(other.eval_batches("test", 1000))[0], test_x)


# ---------------------------------------------------------------- order, batches, subsets

def indexed_data(n: int = 10) -> TensorData:
    """x identifies the sample: x[i] == i."""
    x = torch.arange(n, dtype=torch.float32)[:, None]
    return TensorData("indexed", x, torch.arange(n) % 3, x.clone(), torch.arange(n) % 3, num_classes=3)


def order_of(data, batch_size, seed, epoch):
    return [b[0][:, 0].long().tolist() for b in data.train_batches(batch_size, seed, epoch)]


def test_train_order_is_a_pure_function_of_seed_and_epoch():
    data = indexed_data(10)
    torch.manual_seed(0)
    rng_state = torch.get_rng_state()
    first = order_of(data, 4, seed=3, epoch=5)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is neither used nor consumed
    torch.manual_seed(12345)
    assert order_of(data, 4, seed=3, epoch=5) == first
    assert order_of(data, 4, seed=3, epoch=6) != first
    assert order_of(data, 4, seed=4, epoch=5) != first
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(sum(first, [])) == list(range(10))


def test_seeded_generators_differ_for_every_distinct_tuple():
    from sparse_training.data.base import seeded_generator

    tuples = [(0,), (0, 0), (0, 0, 0), (5, 1), (2**32 + 5,), (1, 5), (-1,), (0, 0, 1), (0, 1, 0)]
    draws = [tuple(torch.randint(2**31, (4,), generator=seeded_generator(*t)).tolist()) for t in tuples]
    assert len(set(draws)) == len(tuples)
    assert draws[3] == tuple(torch.randint(2**31, (4,), generator=seeded_generator(5, 1)).tolist())


def test_a_single_sample_partial_batch_is_dropped():
    data = indexed_data(10)
    batches = order_of(data, 3, seed=0, epoch=0)
    assert [len(b) for b in batches] == [3, 3, 3] and data.steps_per_epoch(3) == 3
    assert data.steps_per_epoch(4) == 3 and data.steps_per_epoch(10) == 1 and data.steps_per_epoch(1) == 10
    with pytest.raises(UserError, match="batch size"):
        data.train_batches(0, 0, 0)


def test_eval_batches_in_order_and_by_indices():
    data = indexed_data(10)
    x, y = collect(data.eval_batches("test", 4))
    assert x[:, 0].long().tolist() == list(range(10)) and y.tolist() == [i % 3 for i in range(10)]
    x, _ = collect(data.eval_batches("train", 2, indices=torch.tensor([7, 1, 4])))
    assert x[:, 0].long().tolist() == [7, 1, 4]
    with pytest.raises(UserError, match="out of range"):
        data.eval_batches("test", 2, indices=[10])
    with pytest.raises(UserError, match="unknown split 'val'"):
        data.eval_batches("val", 2)


def test_subset_indices_are_a_fixed_sorted_seeded_subset():
    data = load_data(DataConfig("synthetic"))
    subset = data.subset_indices("train", 50, seed=1)
    assert subset.dtype == torch.int64 and subset.tolist() == sorted(set(subset.tolist())) and len(subset) == 50
    assert torch.equal(subset, data.subset_indices("train", 50, seed=1))
    assert not torch.equal(subset, data.subset_indices("train", 50, seed=2))
    assert torch.equal(data.subset_indices("test", 128, seed=1), torch.arange(128))
    with pytest.raises(UserError, match="asked for 129 samples of the test split"):
        data.subset_indices("test", 129, seed=1)


def test_synthetic_is_deterministic_and_learnable():
    a, b = load_data(DataConfig("synthetic", seed=3)), load_data(DataConfig("synthetic", seed=3))
    (xa, ya), (xb, yb) = collect(a.eval_batches("train", 256)), collect(b.eval_batches("train", 256))
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (256, 40)
    assert not torch.equal(xa, collect(load_data(DataConfig("synthetic", seed=4)).eval_batches("train", 256))[0])
    means = torch.stack([xa[ya == c].mean(0) for c in range(10)])  # nearest class mean
    x_test, y_test = collect(a.eval_batches("test", 128))
    assert (torch.cdist(x_test, means).argmin(1) == y_test).float().mean() > 0.9


def test_unknown_data_name_lists_the_choices():
    with pytest.raises(UserError) as error:
        load_data(DataConfig("cifar11"))
    assert all(name in str(error.value) for name in DATA_NAMES)


# ---------------------------------------------------------------- npz

def write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.normal(size=(6, 5)), "y_train": np.array([0, 1, 2, 0, 1, 2]),
              "x_test": rng.normal(size=(3, 5)), "y_test": np.array([4, 0, 1])}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_npz_reads_a_users_arrays(tmp_path):
    path = write_npz(tmp_path / "d.npz")
    data = load_data(DataConfig(f"npz:{path}"))
    assert (data.num_classes, data.input_shape, data.num_samples("train")) == (5, (5,), 6)
    x, y = collect(data.eval_batches("test", 2))
    assert x.dtype == torch.float32 and torch.allclose(x, torch.from_numpy(np.load(path)["x_test"]).float())
    assert y.tolist() == [4, 0, 1]


@pytest.mark.parametrize("overrides, fragment", [
    ({"y_test": None}, "has no y_test"),
    ({"y_train": np.zeros(6, dtype=np.float64)}, "y_train has dtype float64; labels must be integer"),
    ({"y_train": np.zeros(5, dtype=np.int64)}, "x_train has 6 samples but y_train has 5"),
    ({"x_test": np.zeros((3, 4))}, "x_test samples (4,)"),
    ({"x_train": np.array(["a"] * 6)}, "x_train has dtype <U1"),
    ({"x_train": np.full((6, 5), np.nan)}, "NaN"),
    ({"y_test": np.array([-1, 0, 1])}, "negative labels"),
])
def test_npz_bad_arrays_give_one_line_errors(tmp_path, overrides, fragment):
    path = write_npz(tmp_path / "d.npz", **overrides)
    with pytest.raises(UserError) as error:
        load_data(DataConfig(f"npz:{path}"))
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_npz_missing_or_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_data(DataConfig(f"npz:{tmp_path / 'none.npz'}"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable .npz"):
        load_data(DataConfig(f"npz:{tmp_path / 'junk.npz'}"))
    objects = tmp_path / "objects.npz"
    np.savez(objects, x_train=np.array([{}, {}], dtype=object), y_train=np.zeros(2, int), x_test=np.zeros((1, 1)), y_test=np.zeros(1, int))
    with pytest.raises(UserError, match="without pickle"):
        load_data(DataConfig(f"npz:{objects}"))


# ---------------------------------------------------------------- CIFAR

def write_cifar10(root, n_per_batch=2, n_test=4, protocol=2, legacy_names=False):
    """The cifar-10-batches-py layout with tiny batches; labels/data keys as bytes, as the
    Python-2 pickles load with encoding='bytes'. legacy_names rewrites the numpy module
    names to numpy 1's, as in the real files."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    arrays = {}
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        arrays[name] = (data, labels)
        blob = pickle.dumps({b"batch_label": b"fake", b"labels": labels, b"data": data,
                             b"filenames": [b"x.png"] * n}, protocol=protocol)
        if legacy_names:
            blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(blob)
    return arrays


@pytest.mark.parametrize("protocol, legacy_names", [(2, True), (2, False), (5, False)])
def test_cifar10_reader_on_tiny_batches(tmp_path, protocol, legacy_names):
    arrays = write_cifar10(tmp_path, protocol=protocol, legacy_names=legacy_names)
    data = load_data(DataConfig("cifar10", data_dir=str(tmp_path)))
    assert (data.num_classes, data.input_shape, data.num_samples("train"), data.num_samples("test")) == (10, (3, 32, 32), 10, 4)
    x, y = collect(data.eval_batches("train", 3))
    raw = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    expected = (raw / 255.0 - CIFAR10_MEAN[:, None, None]) / CIFAR10_STD[:, None, None]
    assert torch.allclose(x, torch.from_numpy(expected).float(), atol=1e-5)
    assert y.tolist() == sum((arrays[f"data_batch_{i}"][1] for i in range(1, 6)), [])


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, labels in (("train", [99, 3, 50]), ("test", [7, 0])):
        data = np.zeros((len(labels), 3072), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}, protocol=2))
    data = load_data(DataConfig("cifar100", data_dir=str(tmp_path)))
    assert data.num_classes == 100 and collect(data.eval_batches("train", 5))[1].tolist() == [99, 3, 50]


def test_cifar_missing_directory_says_what_to_do(tmp_path):
    with pytest.raises(UserError) as error:
        load_data(DataConfig("cifar10", data_dir=str(tmp_path)))
    assert str(error.value) == (f"CIFAR-10 not found under {tmp_path}; pass --data-dir DIR holding "
                                "cifar-10-batches-py, or add --download")


class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_cifar_pickles_cannot_run_code(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "code_ran"
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        pickle.dumps({b"data": Payload(str(marker)), b"labels": []}, protocol=2))
    with pytest.raises(UserError, match="refused to load"):
        load_data(DataConfig("cifar10", data_dir=str(tmp_path)))
    assert not marker.exists()


# ---------------------------------------------------------------- augmentation

def test_crop_flip_on_a_hand_made_image():
    image = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    args = dict(dy=torch.tensor([0]), dx=torch.tensor([2]), padding=1)
    cropped = [[0, 0, 0, 0], [1, 2, 3, 0], [5, 6, 7, 0], [9, 10, 11, 0]]  # rows 0-3, columns 2-5 of the padded image
    mirrored = [[0, 0, 0, 0], [0, 3, 2, 1], [0, 7, 6, 5], [0, 11, 10, 9]]
    assert crop_flip(image, flip=torch.tensor([False]), **args)[0, 0].tolist() == cropped
    assert crop_flip(image, flip=torch.tensor([True]), **args)[0, 0].tolist() == mirrored
    centre = crop_flip(image, torch.tensor([1]), torch.tensor([1]), torch.tensor([False]), padding=1)
    assert torch.equal(centre, image)


def test_cifar_augmentation_is_a_seeded_per_sample_crop_and_flip(tmp_path):
    arrays = write_cifar10(tmp_path)
    data = load_data(DataConfig("cifar10", data_dir=str(tmp_path)))
    originals = torch.from_numpy(np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])).view(-1, 3, 32, 32).float() / 255
    labels = torch.tensor(sum((arrays[f"data_batch_{i}"][1] for i in range(1, 6)), []))
    grid = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)]
    n = len(originals)
    candidates = torch.stack([crop_flip(originals, torch.full((n,), dy), torch.full((n,), dx), torch.full((n,), f), 4)
                              for dy, dx, f in grid])  # (grid, sample, C, H, W)
    mean, std = torch.tensor(CIFAR10_MEAN).float().view(3, 1, 1), torch.tensor(CIFAR10_STD).float().view(3, 1, 1)
    seen = []
    for epoch in range(3):
        x, y = collect(data.train_batches(4, seed=0, epoch=epoch))
        assert x.shape == (n, 3, 32, 32)
        unnormalised = x * std + mean
        for sample, label in zip(unnormalised, y):
            error = (candidates - sample).abs().flatten(2).amax(2)  # (grid, sample)
            g, i = divmod(int(error.argmin()), n)
            assert float(error[g, i]) < 1e-5 and int(labels[i]) == int(label)
            seen.append(grid[g])
    assert {f for _, _, f in seen} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in seen}) > 5
    assert torch.equal(collect(data.train_batches(4, 0, 1))[0], collect(data.train_batches(4, 0, 1))[0])
    plain = collect(data.train_batches(4, 0, 1, augment=False))[0] * std + mean
    assert all(((originals - s).abs().flatten(1).amax(1) < 1e-5).any() for s in plain)
    no_augment = load_data(DataConfig("cifar10", data_dir=str(tmp_path), augment=False))
    assert torch.equal(collect(no_augment.train_batches(4, 0, 1))[0], collect(data.train_batches(4, 0, 1, augment=False))[0])


# ---------------------------------------------------------------- MNIST IDX

def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_set(folder, n_train=3, n_test=2, compress_train=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    sets = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            blob = idx_bytes(array)
            if split == "train" and compress_train:
                (folder / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(blob))
            else:
                (folder / f"{prefix}-{kind}").write_bytes(blob)
        sets[split] = (images, labels)
    return sets


@pytest.mark.parametrize("name, folder, mean, std", [("mnist", "MNIST", 0.1307, 0.3081),
                                                      ("fashion-mnist", "FashionMNIST", 0.2860, 0.3530)])
def test_idx_reader_on_tiny_files(tmp_path, name, folder, mean, std):
    sets = write_idx_set(tmp_path / folder / "raw")
    data = load_data(DataConfig(name, data_dir=str(tmp_path)))
    assert (data.num_classes, data.input_shape, data.num_samples("train"), data.num_samples("test")) == (10, (1, 28, 28), 3, 2)
    for split, (images, labels) in sets.items():
        x, y = collect(data.eval_batches(split, 2))
        assert torch.allclose(x, torch.from_numpy((images[:, None] / 255.0 - mean) / std).float(), atol=1e-5)
        assert y.tolist() == labels.tolist()
    assert torch.equal(collect(data.train_batches(2, 0, 0))[0], collect(data.train_batches(2, 0, 0, augment=False))[0])


def test_idx_errors(tmp_path):
    with pytest.raises(UserError, match="MNIST not found under .*--data-dir DIR holding MNIST/raw"):
        load_data(DataConfig("mnist", data_dir=str(tmp_path)))
    write_idx_set(tmp_path, compress_train=False)  # files directly in the data dir are found too
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        load_data(DataConfig("mnist", data_dir=str(tmp_path)))


# ---------------------------------------------------------------- image folders

def write_image_folder(root, per_class=(4, 2)):
    from PIL import Image

    rng = np.random.default_rng(3)
    for split, n in zip(("train", "val"), per_class):
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def test_image_folder_with_tiny_pngs(tmp_path):
    from PIL import Image
    from torchvision import transforms

    write_image_folder(tmp_path)
    data = load_data(DataConfig(f"imagefolder:{tmp_path}:8"))
    assert (data.num_classes, data.input_shape, data.num_samples("train"), data.num_samples("test")) == (2, (3, 8, 8), 8, 4)
    x, y = collect(data.eval_batches("test", 3))
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 0, 1, 1]
    reference = transforms.Compose([transforms.Resize(9), transforms.CenterCrop(8), transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    assert torch.allclose(x[0], reference(Image.open(tmp_path / "val" / "ant" / "0.png").convert("RGB")))

    torch.manual_seed(0)
    rng_state = torch.get_rng_state()
    epoch = collect(data.train_batches(3, seed=1, epoch=2))
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert epoch[0].shape == (8, 3, 8, 8) and sorted(epoch[1].tolist()) == [0] * 4 + [1] * 4
    assert all(torch.equal(a, b) for a, b in zip(epoch, collect(data.train_batches(3, seed=1, epoch=2))))
    assert not torch.equal(epoch[0], collect(data.train_batches(3, seed=1, epoch=3))[0])
    workers = load_data(DataConfig(f"imagefolder:{tmp_path}:8", num_workers=1))
    assert torch.equal(epoch[0], collect(workers.train_batches(3, seed=1, epoch=2))[0])


def test_image_folder_size_suffix(tmp_path):
    from sparse_training.data.folder import parse_imagefolder

    assert parse_imagefolder(str(tmp_path)) == (tmp_path, 224)
    assert parse_imagefolder(f"{tmp_path}:64") == (tmp_path, 64)
    (tmp_path / "odd:32").mkdir()
    assert parse_imagefolder(f"{tmp_path}/odd:32") == (tmp_path / "odd:32", 224)  # an existing directory wins
    with pytest.raises(UserError, match="too small"):
        parse_imagefolder(f"{tmp_path}:4")


def test_image_folder_errors(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "val").rename(tmp_path / "holdout")
    with pytest.raises(UserError, match="has no val/ or test/ folder"):
        load_data(DataConfig(f"imagefolder:{tmp_path}"))


# ---------------------------------------------------------------- models meet data

def test_models_configured_from_the_data_run_on_its_batches(tmp_path):
    write_cifar10(tmp_path / "cifar")
    write_idx_set(tmp_path / "mnist" / "MNIST" / "raw")
    cases = [("cifar10", tmp_path / "cifar", "resnet20", {"width": 0.25}), ("mnist", tmp_path / "mnist", "mlp", {}),
             ("synthetic", None, "resnet1d", {"width": 2})]
    for data_name, data_dir, model_name, kwargs in cases:
        data = load_data(DataConfig(data_name, data_dir=str(data_dir) if data_dir else None))
        model = build_model(model_config_for(model_name, kwargs, data.num_classes, data.input_shape))
        x, _ = next(iter(data.train_batches(4, 0, 0)))
        assert model(x).shape == (len(x), data.num_classes)
