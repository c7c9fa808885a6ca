"""What torchrun told this process through its environment (RANK, WORLD_SIZE). No torch
import: the CLI asks before anything heavy loads, and `landscape plot` runs without torch."""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def environment_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun); readable before the
    process group exists, so output can be silenced on the other ranks."""
    return int(os.environ.get("RANK", "0"))
