"""imagefolder's device path (image_decoding=device), run here on the CPU: batched decoding,
crops and flips on the device, checked against PIL, torchvision and itself across workers."""

import math

import numpy as np
import pytest
import torch

from sparse_training.config import DataConfig
from sparse_training.data import load_data
from sparse_training.data import jpeg
from sparse_training.data.jpeg import DRAWS, IMAGENET_MEAN, IMAGENET_STD, crop_box, random_draws

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec, a warning per call.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

SIZE = 16
# (file name, width, height, PIL mode): JPEGs of two shapes, a PNG and a grayscale JPEG per class.
FILES = [("wide.jpg", 40, 30, "RGB"), ("tall.jpg", 24, 50, "RGB"), ("flat.png", 40, 30, "RGB"),
         ("gray.jpg", 30, 40, "L")]


def write_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            for name, width, height, mode in FILES:
                # Smooth content, as in photos: a coarse random grid blown up.
                coarse = Image.fromarray(rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8))
                coarse.resize((width, height), Image.BICUBIC).convert(mode).save(root / split / cls / name, quality=95)


def collect(batches):
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def folder_data(root, decoding="device", **kwargs):
    return load_data(DataConfig(f"imagefolder:{root}:{SIZE}", image_decoding=decoding, **kwargs))


def unnormalise(x):
    return x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def test_auto_decodes_with_pil_on_the_cpu(tmp_path):
    write_folder(tmp_path)
    assert folder_data(tmp_path, "auto").decoding == "pil"
    assert folder_data(tmp_path, "pil").decoding == "pil"
    assert folder_data(tmp_path, "device").decoding == "device"


def test_eval_views_match_the_pil_path(tmp_path):
    write_folder(tmp_path)
    device, pil = folder_data(tmp_path), folder_data(tmp_path, "pil")
    x, y = collect(device.eval_batches("test", 3))
    reference, labels = collect(pil.eval_batches("test", 3))
    assert x.shape == (8, 3, SIZE, SIZE) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, labels) and y.tolist() == [0] * 4 + [1] * 4
    # PIL rounds its resized pixels to uint8 and uses fixed-point filter weights: about one grey
    # level apart at most (1/255 / std ~0.0175 here); allow 2.5 levels, and 0.6 on average.
    difference = (x - reference).abs()
    assert difference.mean() < 0.01 and difference.max() < 0.05
    x_sub, y_sub = collect(device.eval_batches("test", 2, indices=[5, 0]))
    assert torch.equal(x_sub, x[[5, 0]]) and torch.equal(y_sub, y[[5, 0]])


def torchvision_box(draws, height, width, monkeypatch):
    """torchvision's own RandomResizedCrop.get_params, fed the same uniforms: attempt a takes
    its area and ratio from draws[4a:4a + 2] and, when it fits, its position from draws[4a + 2:4a + 4]."""
    from torchvision.transforms import RandomResizedCrop

    uniforms, integers = [], []

    class Uniform:
        def uniform_(self, low, high):
            attempt, which = divmod(len(uniforms), 2)
            uniforms.append(draws[4 * attempt + which])
            return torch.tensor(float(low) + uniforms[-1] * (float(high) - float(low)), dtype=torch.float64)

    def randint(low, high, size):
        integers.append(draws[4 * (len(uniforms) // 2 - 1) + 2 + len(integers)])
        return torch.tensor([low + int(integers[-1] * (high - low))])

    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", lambda *size: Uniform())
        patch.setattr(torch, "randint", randint)
        return RandomResizedCrop.get_params(torch.zeros(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3])


def test_crop_boxes_are_torchvisions_for_the_same_draws(monkeypatch):
    draws = random_draws(300, torch.Generator().manual_seed(0)).tolist()
    shapes = [(30, 40), (50, 24), (7, 9), (224, 224), (10, 200), (200, 10)]
    for height, width in shapes:
        for row in draws:
            top, left, h, w = box = crop_box(row, height, width)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            assert box == torchvision_box(row, height, width, monkeypatch)
            if (height, width) in [(10, 200), (200, 10)]:  # no crop of scale >= 0.08 fits: the fallback
                assert box == ((0, 93, 10, 13) if height == 10 else (93, 0, 13, 10))
            elif (height, width) == (224, 224):  # large enough for the rounding not to matter
                assert 0.08 - 0.01 <= h * w / (height * width) <= 1
                assert math.log(3 / 4) - 0.01 <= math.log(w / h) <= math.log(4 / 3) + 0.01


def test_a_training_epoch_is_a_pure_function_of_seed_and_epoch(tmp_path):
    write_folder(tmp_path)
    data = folder_data(tmp_path)
    torch.manual_seed(0)
    rng_state = torch.get_rng_state()
    x, y = collect(data.train_batches(3, seed=1, epoch=2))
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert x.shape == (8, 3, SIZE, SIZE) and x.dtype == torch.float32 and sorted(y.tolist()) == [0] * 4 + [1] * 4
    workers = collect(folder_data(tmp_path, num_workers=2).train_batches(3, seed=1, epoch=2))
    assert torch.equal(x, workers[0]) and torch.equal(y, workers[1])
    assert not torch.equal(x, collect(data.train_batches(3, seed=1, epoch=3))[0])
    assert not torch.equal(x, collect(data.train_batches(3, seed=1, epoch=2, augment=False))[0])


def test_training_views_are_the_drawn_crops_and_flips(tmp_path):
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.functional import resized_crop

    write_folder(tmp_path)
    data = folder_data(tmp_path)
    x, y = collect(data.train_batches(4, seed=3, epoch=0))
    order, generator = data.epoch_order(3, 0)
    draws = random_draws(len(order), generator)
    for k, index in enumerate(order.tolist()):
        path, label = data.samples["train"][index]
        image = decode_image(path, mode=ImageReadMode.RGB).float()
        view = resized_crop(image, *crop_box(draws[k].tolist(), *image.shape[-2:]), [SIZE, SIZE], antialias=True)
        if draws[k, DRAWS - 1] < 0.5:
            view = view.flip(-1)
        assert y[k] == label and torch.allclose(unnormalise(x[k]), view / 255, atol=1e-5)
        if path.endswith("gray.jpg"):  # expanded to three equal channels
            rgb = unnormalise(x[k])
            assert torch.allclose(rgb[0], rgb[1], atol=1e-5) and torch.allclose(rgb[0], rgb[2], atol=1e-5)


def test_images_the_batched_decoder_rejects_are_decoded_on_the_cpu(tmp_path, monkeypatch):
    write_folder(tmp_path)
    data = folder_data(tmp_path)
    expected = collect(data.eval_batches("test", 8))

    def failing(*args, **kwargs):
        raise RuntimeError("unsupported JPEG")  # e.g. nvjpeg on a CMYK file

    monkeypatch.setattr(jpeg, "decode_jpeg", failing)
    fallback = collect(data.eval_batches("test", 8))
    assert torch.equal(expected[0], fallback[0]) and torch.equal(expected[1], fallback[1])


def test_unreadable_files_name_the_file(tmp_path):
    from sparse_training.errors import UserError

    write_folder(tmp_path)
    (tmp_path / "val" / "ant" / "wide.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    with pytest.raises(UserError, match="wide.jpg is not a readable image"):
        collect(folder_data(tmp_path).eval_batches("test", 8))
