"""The coordinates of a loss surface: every point is base + alpha d1 + beta d2 over the
floating-point tensors of a state_dict.

Random directions (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"): Gaussian
entries drawn on the CPU from one seeded generator, in the model's parameter order (so the
same seed gives the same directions on any device), then for every weight with two or more
dimensions each filter (slice along dim 0: a conv's output channel, a Linear's output unit)
scaled to the norm of the same filter of the checkpoint's weights. In the masked subspace the
entries are zeroed where the mask prunes before scaling, so every point of the surface is
exactly as sparse as the checkpoint and a fully pruned filter does not move. Biases and norm
parameters (one dimension) do not move, or, with `move_bias_norm`, move along the parameters
themselves (what Li et al.'s code does without `--xignore biasbn`). Buffers never move: the
running statistics are the checkpoint's, or recomputed at each point.

Through checkpoints: two checkpoints span the line theta_1 + alpha (theta_2 - theta_1); three
span the plane with the orthogonal basis u = theta_2 - theta_1 and v = the part of
theta_3 - theta_1 orthogonal to u, scaled to |u|, so both axes share one unit and the
checkpoints sit at (0, 0), (1, 0) and (c, h) (Garipov et al. 2018). Norms and inner products
are over the parameters; buffers follow the same affine combination of the checkpoints, so
"interpolate" BatchNorm statistics are those of the plane and each checkpoint is itself at its
coordinates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from sparse_training.errors import UserError

State = Mapping[str, torch.Tensor]


@dataclass
class Frame:
    """A point's state is base + alpha * directions[0] + beta * directions[1] (float64, on
    the base's device); `points` are the coordinates of the checkpoints given."""

    base: dict[str, torch.Tensor]
    directions: list[dict[str, torch.Tensor]]
    points: np.ndarray  # (checkpoint, 2): alpha, beta

    def state(self, alpha: float, beta: float, like: State) -> dict[str, torch.Tensor]:
        """The state_dict at (alpha, beta), in the dtypes of `like`."""
        coefficients = (alpha, beta)[: len(self.directions)]
        out = {}
        for name, reference in like.items():
            if name not in self.base:  # integers (num_batches_tracked) do not move
                out[name] = reference.clone()
                continue
            value = self.base[name].clone()
            for coefficient, direction in zip(coefficients, self.directions):
                if coefficient != 0.0 and name in direction:
                    value.add_(direction[name], alpha=coefficient)
            out[name] = value.to(reference.dtype)
        return out


def floating(state: State) -> dict[str, torch.Tensor]:
    return {name: value.double() for name, value in state.items() if value.is_floating_point()}


def filter_normalised(direction: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`direction` with each filter (slice along dim 0) scaled to the norm of the same filter
    of `weight`; a filter whose direction is zero stays zero."""
    d, w = direction.flatten(1), weight.double().flatten(1)
    d_norm, w_norm = d.norm(dim=1, keepdim=True), w.norm(dim=1, keepdim=True)
    scale = torch.where(d_norm > 0, w_norm / d_norm.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(d_norm))
    return (d * scale).view_as(direction)


def random_direction(parameters: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None,
                     generator: torch.Generator, move_bias_norm: bool) -> dict[str, torch.Tensor]:
    """One filter-normalised Gaussian direction over `parameters` (zero outside `masks` where
    given). Entries are drawn for every parameter in order, moved or not, so the directions of
    one seed do not depend on --move-bias-norm or the mask."""
    out = {}
    for name, weight in parameters.items():
        draw = torch.randn(weight.shape, generator=generator, dtype=torch.float64).to(weight.device)
        if weight.dim() <= 1:
            if move_bias_norm:
                out[name] = weight.double().clone()
            continue
        if masks is not None and name in masks:
            draw = draw * masks[name].to(draw.device)
        out[name] = filter_normalised(draw, weight)
    return out


def random_frame(state: State, parameter_names: list[str], masks: Mapping[str, torch.Tensor] | None, dims: int,
                 seed: int, move_bias_norm: bool) -> Frame:
    """`dims` random directions around `state`, the checkpoint at (0, 0)."""
    generator = torch.Generator().manual_seed(seed)
    parameters = {name: state[name] for name in parameter_names}
    directions = [random_direction(parameters, masks, generator, move_bias_norm) for _ in range(dims)]
    return Frame(floating(state), directions, np.zeros((1, 2)))


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], names: list[str]) -> float:
    return float(sum((a[name] * b[name]).sum() for name in names))


def checkpoint_frame(states: list[State], parameter_names: list[str], labels: list[str]) -> Frame:
    """The line through two states or the plane through three (see the module's docstring)."""
    anchors = [floating(state) for state in states]
    origin = anchors[0]
    u = {name: anchors[1][name] - origin[name] for name in origin}
    u_norm2 = _dot(u, u, parameter_names)
    if u_norm2 == 0.0:
        raise UserError(f"{labels[0]} and {labels[1]} hold the same weights; a line or plane needs distinct checkpoints")
    if len(anchors) == 2:
        return Frame(origin, [u], np.array([[0.0, 0.0], [1.0, 0.0]]))
    w = {name: anchors[2][name] - origin[name] for name in origin}
    c = _dot(w, u, parameter_names) / u_norm2
    v = {name: w[name] - c * u[name] for name in origin}
    v_norm2 = _dot(v, v, parameter_names)
    if v_norm2 <= 1e-10 * max(_dot(w, w, parameter_names), u_norm2):  # collinear up to float32 rounding
        raise UserError(f"{', '.join(labels)} lie on one line; a plane needs three checkpoints that span one")
    h = float(np.sqrt(v_norm2 / u_norm2))
    v = {name: value / h for name, value in v.items()}  # |v| = |u|: one unit on both axes
    return Frame(origin, [u, v], np.array([[0.0, 0.0], [1.0, 0.0], [c, h]]))


def grid_axes(frame: Frame, grid: int, extent: float, random: bool) -> tuple[np.ndarray, np.ndarray]:
    """alpha and beta grids: [-extent, extent] around a random frame's centre; for a frame
    through checkpoints, the box around them widened by `extent` on every side. A 1-D
    surface has beta = [0]."""
    if random:
        axes = [np.linspace(-extent, extent, grid) for _ in frame.directions]
    else:
        low, high = frame.points.min(axis=0) - extent, frame.points.max(axis=0) + extent
        axes = [np.linspace(low[i], high[i], grid) for i in range(len(frame.directions))]
    return axes[0], axes[1] if len(axes) > 1 else np.zeros(1)
