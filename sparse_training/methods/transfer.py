"""The coupling experiments (method transfer): the mask of one checkpoint, the weights of
another (or a fresh initialisation), optionally the signs of a third, then cycles.

  LRR mask + random init    --mask-from LRR/checkpoints/cycle_00K.pt --weights-from random
  LRR mask + warm-up init   --mask-from LRR/checkpoints/cycle_00K.pt --weights-from LRR/checkpoints/rewind.pt
  warm-up signs only        --mask-from ... --weights-from random --signs-from LRR/checkpoints/rewind.pt

The transferred weights are the run's initialisation (its init.pt); the mask is applied at
the start of cycle 0. Every source is read with `load_checkpoint` (weights_only) and must fit
the run's architecture exactly, or the run stops with a one-line UserError before it writes
anything."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from ..checkpoint import Checkpoint, load_checkpoint
from ..config import Config, ModelConfig, check
from ..data.base import seeded_generator
from ..errors import UserError
from ..masks import Mask, prunable_parameters, validate_mask
from .base import CyclePlan, MaskChange, MaskInputs, Method, Style

RANDOM = "random"
# The fresh initialisation of --weights-from random comes from its own stream of the run's
# seed: drawing it from the seed itself would reproduce the init of any source run trained
# with the same seed, turning "random init" into the lottery ticket's own init.
FRESH_INIT_STREAM = 7


class Transfer(Method):
    """The mask of --mask-from, the weights of --weights-from (init.pt), then --cycles cycles."""

    own_settings = ("mask_from", "weights_from", "signs_from")

    def validate(self, config: Config) -> None:
        check(config.prune.mask_from is not None, f"method {self.name} needs --mask-from CKPT")
        check(config.prune.sparsity == 0.0, f"method {self.name} takes its sparsity from --mask-from; drop --sparsity")

    def completed(self, config: Config) -> Config:
        # Absolute source paths, so that --resume works from any directory.
        prune = config.prune
        return config.replace("prune", mask_from=_absolute(prune.mask_from), signs_from=_absolute(prune.signs_from),
                              weights_from=_absolute(prune.weights_from or RANDOM))

    def plan(self, config: Config) -> list[CyclePlan]:
        mask = TransferredMask(config.prune.mask_from)
        return [CyclePlan(c, config.run.epochs, mask if c == 0 else None) for c in range(config.run.cycles)]

    def initialise(self, model: nn.Module, config: Config) -> None:
        """Load the transferred weights into `model` (magnitudes from --weights-from, signs from
        --signs-from on the prunable weights) after checking every source, the mask's included,
        so that a mismatch raises before the model is touched."""
        prune, model_config = config.prune, config.model
        transferred_mask(prune.mask_from, model, model_config)
        if prune.weights_from in (None, RANDOM):
            state = fresh_initialisation(model_config, config.run.seed)
        else:
            state = _fitting_state("--weights-from", _load("--weights-from", prune.weights_from, model_config), model)
        if prune.signs_from is not None:
            signs = _fitting_state("--signs-from", _load("--signs-from", prune.signs_from, model_config), model)
            state = with_signs(state, signs, prunable_parameters(model))
        model.load_state_dict(state)


@dataclass(frozen=True)
class TransferredMask(MaskChange):
    """Cycle 0 of a transfer run takes the mask of the checkpoint `source`."""

    source: str

    def describe(self) -> str:
        return f"mask of {self.source}"

    def apply(self, inputs: MaskInputs) -> Mask:
        # Loading completes the stored masks from a model built on the meta device, which
        # draws nothing from the global RNG: the training that follows is unaffected.
        return transferred_mask(self.source, inputs.model, inputs.config.model)


def transferred_mask(path: str | None, model: nn.Module, model_config: ModelConfig) -> Mask:
    """The mask of the checkpoint `path` (--mask-from), checked against `model`."""
    source = _load("--mask-from", path, model_config)
    _fitting_state("--mask-from", source, model)
    try:
        validate_mask(source.masks, model)
    except UserError as error:
        raise UserError(f"--mask-from {path}: {error}") from None
    device = next(iter(prunable_parameters(model).values())).device
    return {name: source.masks[name].to(device) for name in prunable_parameters(model)}


def fresh_initialisation(model_config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The state_dict of a newly built model, drawn from the fresh-init stream of `seed`; the
    global RNG is left as it was."""
    from ..models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeded_generator(seed, FRESH_INIT_STREAM).initial_seed())
        return build_model(model_config, allow_import=True).state_dict()


def with_signs(state: Mapping[str, torch.Tensor], signs: Mapping[str, torch.Tensor],
               names: Iterable[str]) -> dict[str, torch.Tensor]:
    """`state` with |w| kept and the sign of `signs` imposed on the weights in `names`. Where
    the sign source is exactly zero (pruned there) it has no sign, and the weight keeps its own."""
    result = dict(state)
    for name in names:
        sign = torch.sign(signs[name]).to(state[name].dtype)
        result[name] = torch.where(sign != 0, state[name].abs() * sign, state[name])
    return result


def _load(flag: str, path: str | None, model_config: ModelConfig) -> Checkpoint:
    if path is None:
        raise UserError(f"method transfer needs {flag} CKPT")
    try:
        # The run's model names a plain state_dict's architecture; ours record their own.
        return load_checkpoint(path, model=model_config.name, model_kwargs=model_config.kwargs)
    except UserError as error:
        raise UserError(f"{flag}: {error}") from None


def _fitting_state(flag: str, source: Checkpoint, model: nn.Module) -> dict[str, torch.Tensor]:
    """The source's state_dict, after checking it has exactly the model's entries and shapes."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        found = source.state_dict.get(name)
        if found is None or tuple(found.shape) != tuple(tensor.shape):
            what = "no entry" if found is None else f"shape {tuple(found.shape)}, the model has {tuple(tensor.shape)}"
            raise UserError(f"{flag} {source.path} does not fit the model ({name}: {what}); "
                            "use a checkpoint of the same architecture")
    extra = sorted(set(source.state_dict) - set(expected))
    if extra:
        raise UserError(f"{flag} {source.path} does not fit the model (unexpected {extra[0]}); "
                        "use a checkpoint of the same architecture")
    return {name: source.state_dict[name] for name in expected}


def _absolute(path: str | None) -> str | None:
    return path if path in (None, RANDOM) else str(Path(path).expanduser().absolute())


TRANSFER = Transfer("transfer", Style("#ca9161", "P"))
