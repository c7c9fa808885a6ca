"""Training methods, registered by name: the config's `--method` choices, the CLI's `--help`
and the figures' method styles are all read from here.

A new method is one module with a `Method` subclass (see `base.py`) and one `register` call
(below for the built-in ones, or anywhere before the config is resolved). The order of
registration is the order `--help` lists methods and legends draw them."""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..registry import Registry
from .base import CyclePlan, MaskChange, MaskInputs, Method, MovingMask, Pruning, Style
from .dense import DENSE
from .dynamic import GMP, RIGL
from .iterative import IMP, LRR
from .pai import PAI, PAI_CYCLIC
from .sculpt import SCULPT
from .transfer import TRANSFER

METHODS: Registry[Method] = Registry("method")
register, get, names = METHODS.register, METHODS.get, METHODS.names
for _method in (DENSE, PAI, PAI_CYCLIC, IMP, LRR, SCULPT, TRANSFER, GMP, RIGL):
    register(_method)

__all__ = ["METHODS", "CyclePlan", "MaskChange", "MaskInputs", "Method", "MovingMask", "Pruning", "Style", "get",
           "names", "plan_cycles", "register", "style_table"]


def plan_cycles(config: Config) -> list[CyclePlan]:
    """The cycles of a resolved config, by its method."""
    return get(config.run.method).plan(config)


def style_table() -> dict[str, dict[str, Any]]:
    """What figures know of every method, in legend order: colour, marker and whether every
    cycle is a level (`landscape plot` writes it into the datasets it draws, since figures never
    import the engine)."""
    return {m.name: {"colour": m.style.colour, "marker": m.style.marker, "levelwise": m.levelwise} for m in METHODS}
