"""Vision Transformers (Dosovitskiy et al. 2021; DeiT, Touvron et al. 2021), pre-norm, as
torchvision's `VisionTransformer`: a patch-embedding convolution (kernel = stride = patch
size), a class token, a learned position embedding, `depth` encoder blocks
(`x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`, LayerNorm eps 1e-6, GELU MLP), a final
LayerNorm and a linear classifier on the class token.

`vit` takes square images (N, C, H, W), DeiT-Tiny by default (width 192, depth 12, 3 heads)
with 4x4 patches for 32x32 images; `vit1d` takes MNIST-1D sequences (N, L) or (N, C, L).
Attention is `nn.MultiheadAttention`, so masks cover its fused `in_proj_weight` and its
`out_proj`. There is no dropout and no drop-path: a forward pass is deterministic in train
mode as in eval mode. The constructor initialises the weights as DeiT/timm do
(trunc_normal(0.02) Linear and in_proj weights, class token and position embedding; zero
biases; LayerNorm 1/0; the patch convolution trunc_normal(sqrt(1/fan_in)) as torchvision),
drawing only from the global torch RNG."""

from __future__ import annotations

import math

import torch
from torch import nn

from .mnist1d import as_sequence


class Block(nn.Module):
    """Pre-norm encoder block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """Patch embedding (`conv_proj`, Conv1d or Conv2d), class token, position embedding,
    encoder `blocks`, final LayerNorm `norm` and a linear `classifier` on the class token.
    `dims` is 2 for images (N, C, H, W) and 1 for sequences (N, L) or (N, C, L)."""

    def __init__(self, dims: int, num_classes: int, in_channels: int, tokens: int, patch_size: int,
                 width: int, depth: int, heads: int, hidden: int):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.dims = dims
        self.conv_proj = conv(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embedding = nn.Parameter(torch.zeros(1, tokens + 1, width))
        self.blocks = nn.Sequential(*(Block(width, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.classifier = nn.Linear(width, num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The DeiT/timm initialisation (the patch convolution as torchvision's); a model on
        the meta device (the registry's parameter count) is left as it is."""
        if any(p.is_meta for p in self.parameters()):
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):  # the MLPs, the classifier and each attention's out_proj
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.trunc_normal_(module.in_proj_weight, std=0.02)
                nn.init.zeros_(module.in_proj_bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        fan_in = self.conv_proj.in_channels * math.prod(self.conv_proj.kernel_size)
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.trunc_normal_(self.class_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 1:
            x = as_sequence(x)
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (N, tokens, width)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x = self.norm(self.blocks(x))
        return self.classifier(x[:, 0])


def _check(num_classes: int, in_channels: int, size: int, size_name: str, patch_size: int, width: int,
           depth: int, heads: int, mlp_ratio: float) -> int:
    """Validates the builder's arguments; returns the MLP hidden width round(mlp_ratio * width)."""
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), (size_name, size),
                        ("patch_size", patch_size), ("width", width), ("depth", depth), ("heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0 \
            or not math.isfinite(mlp_ratio):
        raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    if size % patch_size:
        raise ValueError(f"{size_name} {size} is not divisible by patch_size {patch_size}")
    hidden = round(mlp_ratio * width)
    if hidden < 1:
        raise ValueError(f"mlp_ratio {mlp_ratio} times width {width} leaves no MLP hidden units")
    return hidden


def vit(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4, width: int = 192,
        depth: int = 12, heads: int = 3, mlp_ratio: float = 4.0) -> VisionTransformer:
    """ViT for square images of side `image_size`; DeiT-Tiny (5.4M parameters) by default."""
    hidden = _check(num_classes, in_channels, image_size, "image_size", patch_size, width, depth, heads, mlp_ratio)
    tokens = (image_size // patch_size) ** 2
    return VisionTransformer(2, num_classes, in_channels, tokens, patch_size, width, depth, heads, hidden)


def vit1d(num_classes: int = 10, in_channels: int = 1, input_length: int = 40, patch_size: int = 4, width: int = 32,
          depth: int = 2, heads: int = 2, mlp_ratio: float = 2.0) -> VisionTransformer:
    """ViT for sequences (N, L) or (N, C, L) of length `input_length` (MNIST-1D: 10 patches of 4)."""
    hidden = _check(num_classes, in_channels, input_length, "input_length", patch_size, width, depth, heads, mlp_ratio)
    tokens = input_length // patch_size
    return VisionTransformer(1, num_classes, in_channels, tokens, patch_size, width, depth, heads, hidden)
