"""The processes of one job. A command started by `torchrun` (RANK, WORLD_SIZE, MASTER_ADDR
in its environment) joins the process group torchrun set up (NCCL on GPUs, gloo on CPU);
anything else is a group of one, where every collective below returns at once, so the
library has one code path and a single process pays nothing for it. (What torchrun's
environment says is read by `torchrun.py`, which imports no torch, for the CLI.)

Work is split by contiguous shards: of every training batch, of evaluation samples, of the
samples behind a Hessian-vector product. Each rank's shard is a pure function of (n, rank,
world), so a job resumed with another number of processes splits the same global batch
differently but trains on the same samples in the same order."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from .errors import DistributedMismatch, FailedOnMain, UserError
from .torchrun import environment_rank, launched_by_torchrun


class Group:
    """`rank` of `world` processes; `local_rank` picks the GPU on a multi-GPU node."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, device: str = "cpu"):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = torch.device(device)  # where collectives' tensors live (NCCL needs the GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def span(self, start: int, stop: int) -> tuple[int, int]:
        """This rank's contiguous part of [start, stop); parts differ in size by at most one."""
        n = stop - start
        return start + n * self.rank // self.world, start + n * (self.rank + 1) // self.world

    def shard(self, items: torch.Tensor | Sequence[Any]) -> Any:
        """This rank's contiguous part of `items`."""
        lo, hi = self.span(0, len(items))
        return items[lo:hi]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (also returned). Callers pass float64 sums, so that the
        order in which ranks add up changes nothing at float32 precision."""
        if self.distributed:
            moved = tensor.to(self.device)
            dist.all_reduce(moved)
            tensor.copy_(moved)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether any rank says so: every rank gets the same answer (used for stop requests)."""
        if not self.distributed:
            return bool(flag)
        value = torch.tensor([int(bool(flag))], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    @torch.no_grad()
    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite every rank's `tensors` (parameters too) with rank 0's."""
        if not self.distributed:
            return
        for tensor in tensors:
            moved = tensor.to(self.device)
            dist.broadcast(moved, src=0)
            if moved is not tensor:
                tensor.copy_(moved)

    def share(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def on_main(self, action: Callable[[], Any]) -> Any:
        """`action()` run by rank 0 alone; its value on every rank, or its exception raised on
        every rank (rank 0 raises its own, the others a FailedOnMain that carries its message
        and exit code). Every rank calls this at the same point; only rank 0's action runs."""
        if not self.distributed:
            return action()
        error, value = None, None
        if self.is_main:
            try:
                value = action()
            except BaseException as raised:  # noqa: BLE001 - raised again below, on every rank
                error = raised
        shared = self.share((None if error is None else FailedOnMain.of(error), value) if self.is_main else None)
        if error is not None:
            raise error
        if shared[0] is not None:
            raise shared[0]
        return shared[1]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def check_identical(self, what: str, tensors: Iterable[torch.Tensor]) -> None:
        """Raise if the ranks' `tensors` are not bitwise equal: a checksum of their bytes,
        gathered from every rank and compared with rank 0's."""
        if not self.distributed:
            return
        sums = torch.stack([_checksum(t) for t in tensors]) if tensors else torch.zeros(0, dtype=torch.int64)
        gathered = [torch.empty_like(sums, device=self.device) for _ in range(self.world)]
        dist.all_gather(gathered, sums.to(self.device))
        differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other.cpu(), gathered[0].cpu())]
        if differing:
            raise DistributedMismatch(f"ranks {differing} hold different {what} from rank 0; the processes of this job "
                                      "have diverged (a nondeterministic kernel, or processes of different versions): "
                                      "resume from the last saved state")


_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 20


def _checksum(tensor: torch.Tensor) -> torch.Tensor:
    """An int64 digest of a tensor's bits (its elements read as integers of their width),
    position-weighted so that moved values change it; chunked, so that it needs a few MB
    whatever the tensor's size (int64 overflow wraps, which a digest may)."""
    words = tensor.detach().contiguous().reshape(-1).view(_WORDS[tensor.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), _CHUNK):
        chunk = words[start:start + _CHUNK].to(torch.int64)
        weights = torch.arange(start, start + chunk.numel(), device=words.device, dtype=torch.int64) % 65521 + 1
        total += (chunk * weights).sum()
    return total.cpu()


_GROUP: Group | None = None


def current() -> Group:
    """The job's group: joined on first use when torchrun started this process, else one process."""
    global _GROUP
    if _GROUP is None:
        _GROUP = _join() if launched_by_torchrun() else Group()
    return _GROUP


def _join() -> Group:
    """Join the group torchrun describes in the environment; on GPUs each process takes the
    GPU of its local rank."""
    rank, world = environment_rank(), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); start at most "
                            f"{torch.cuda.device_count()} processes per node")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Group(rank, world, local_rank, f"cuda:{local_rank}" if cuda else "cpu")


def device_for(requested: str, group: Group) -> str:
    """The device of this rank: `cuda` means the GPU of its local rank under torchrun; a
    fixed `cuda:N` would put every process on one GPU, which is refused."""
    if not group.distributed or not requested.startswith("cuda"):
        return requested
    if requested != "cuda" and requested != f"cuda:{group.local_rank}":
        raise UserError(f"--device {requested} under torchrun would put every process on one GPU; pass --device cuda "
                        "(each process takes the GPU of its local rank)")
    return f"cuda:{group.local_rank}"


def leave() -> None:
    """Leave the process group (at the end of a torchrun command)."""
    global _GROUP
    if _GROUP is not None and _GROUP.distributed and dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = None
