"""The device path of `imagefolder:` (image_decoding=device): DataLoader workers only read
each file's bytes; the consumer decodes a batch of JPEGs in one `decode_jpeg` call on the
run's device (nvjpeg on CUDA), then crops, resizes, flips and normalises there.

Files the batched decoder cannot take (PNG, CMYK JPEGs on nvjpeg, ...) are decoded on the
CPU one at a time. The crop boxes and flips come from uniforms drawn up front per sample
from the epoch's generator, a fixed number whatever the image size, so an epoch's batches
stay a pure function of (seed, epoch)."""

from __future__ import annotations

import io
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms.functional import pil_to_tensor

from ..errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE, RATIO, ATTEMPTS = (0.08, 1.0), (3 / 4, 4 / 3), 10
# Per sample: ATTEMPTS x (area fraction, log-ratio, top, left), then the flip.
DRAWS = 4 * ATTEMPTS + 1


def random_draws(n: int, generator: torch.Generator) -> torch.Tensor:
    """The (n, DRAWS) uniforms in [0, 1) behind n samples' crops and flips."""
    return torch.rand(n, DRAWS, dtype=torch.float64, generator=generator)


def crop_box(draws: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params(scale=SCALE, ratio=RATIO)
    with its random numbers given as uniforms in [0, 1)."""
    area, log_low, log_high = height * width, math.log(RATIO[0]), math.log(RATIO[1])
    for attempt in range(ATTEMPTS):
        u_area, u_ratio, u_top, u_left = draws[4 * attempt:4 * attempt + 4]
        target_area = area * (SCALE[0] + u_area * (SCALE[1] - SCALE[0]))
        aspect = math.exp(log_low + u_ratio * (log_high - log_low))
        w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            # min(): u * n can round up to n for u just below 1.
            return min(int(u_top * (height - h + 1)), height - h), min(int(u_left * (width - w + 1)), width - w), h, w
    if width / height < min(RATIO):
        w, h = width, round(width / min(RATIO))
    elif width / height > max(RATIO):
        w, h = round(height * max(RATIO)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class FileBytes(Dataset):
    """(raw file bytes as a uint8 tensor, label) of each sample."""

    def __init__(self, samples: Sequence[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return read_file(path), label


def collate_bytes(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(all files' bytes concatenated, their lengths, labels): one tensor per batch, as a
    tensor per file would hold a shared-memory file descriptor each on its way from a worker."""
    files, labels = zip(*items)
    return torch.cat(files), torch.tensor([len(f) for f in files]), torch.tensor(labels)


class DeviceImages:
    """Batches of (size x size) views, normalised, decoded and transformed on `device`."""

    def __init__(self, size: int, device: torch.device, num_workers: int):
        self.size, self.device, self.num_workers = size, device, num_workers
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)

    def batches(self, samples: Sequence[tuple[str, int]], batches: list[list[int]],
                draws: list[torch.Tensor] | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) of each batch of sample indices; random views from each batch's draws,
        centre views when draws is None."""
        cuda = self.device.type == "cuda"
        # A private generator: the DataLoader draws its worker base seed from it, not the global RNG.
        loader = DataLoader(FileBytes(samples), batch_sampler=batches, num_workers=self.num_workers,
                            collate_fn=collate_bytes, pin_memory=cuda, generator=torch.Generator().manual_seed(0))
        for i, (flat, lengths, labels) in enumerate(loader):
            images = self.decode(torch.split(flat, lengths.tolist()), [samples[j][0] for j in batches[i]])
            if draws is None:
                views = [self.center_view(image) for image in images]
            else:
                views = [self.random_view(image, row) for image, row in zip(images, draws[i].tolist())]
            x = (torch.stack(views) / 255 - self.mean) / self.std
            yield x, labels.to(self.device, non_blocking=cuda)

    def decode(self, files: Sequence[torch.Tensor], paths: Sequence[str]) -> list[torch.Tensor]:
        """uint8 (3, H, W) RGB images on the device."""
        images: list[torch.Tensor | None] = [None] * len(files)
        jpegs = [i for i, data in enumerate(files) if data[:2].tolist() == [0xFF, 0xD8]]
        if jpegs:
            try:
                decoded = decode_jpeg([files[i] for i in jpegs], mode=ImageReadMode.RGB, device=self.device)
                for i, image in zip(jpegs, decoded):
                    images[i] = image
            except RuntimeError:
                pass  # one unsupported JPEG fails the whole batch: all of them go the CPU way below
        return [image if image is not None else _decode_on_cpu(data, path).to(self.device)
                for image, data, path in zip(images, files, paths)]

    def random_view(self, image: torch.Tensor, draws: Sequence[float]) -> torch.Tensor:
        top, left, h, w = crop_box(draws, image.shape[-2], image.shape[-1])
        view = _resize(image[:, top:top + h, left:left + w], self.size, self.size)
        return view.flip(-1) if draws[-1] < 0.5 else view

    def center_view(self, image: torch.Tensor) -> torch.Tensor:
        """torchvision's Resize(round(size * 256 / 224)) + CenterCrop(size)."""
        height, width = image.shape[-2:]
        short = round(self.size * 256 / 224)
        # Resize(int) truncates the longer side.
        h, w = (int(short * height / width), short) if width <= height else (short, int(short * width / height))
        top, left = round((h - self.size) / 2), round((w - self.size) / 2)
        return _resize(image, h, w)[:, top:top + self.size, left:left + self.size]


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (3, H, W) -> float (3, height, width) in [0, 255], like PIL's antialiased bilinear."""
    return F.interpolate(image[None].float(), size=(height, width), mode="bilinear", antialias=True,
                         align_corners=False)[0]


def _decode_on_cpu(data: torch.Tensor, path: str) -> torch.Tensor:
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        pass  # formats torchvision cannot decode (BMP, TIFF, ...): PIL, as the PIL path reads them
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{path} is not a readable image ({error})") from None
    return pil_to_tensor(image)
