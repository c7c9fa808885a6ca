"""Files, safely: atomic writes, inter-process locks and loading that never runs code.

Every write goes to a temporary file in the same directory and is renamed into place, so a
file under its final name is always complete. Every torch read uses
`torch.load(weights_only=True)`: nothing in a file is ever executed. Which file is which is
`rundir`'s business; what a checkpoint holds is `checkpoint`'s."""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from filelock import FileLock, Timeout

from .errors import SparseTrainingError, UserError

_UMASK = os.umask(0o022)
os.umask(_UMASK)
TEMPORARY_SUFFIX = ".tmp"  # atomic_path writes .NAME.XXXXXXXX.tmp beside NAME


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, on any
    error remove it, so `path` is either the old file or the complete new one. A failing
    write (a full disk, a read-only or missing directory) is one SparseTrainingError (exit 1)
    that names `path`, not the temporary file."""
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are meant to be shared
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        if isinstance(error, OSError):
            kept = f"the previous {path.name} is intact" if path.exists() else "no partial file was left"
            raise write_failed(path, error, f"nothing was replaced: {kept}") from None
        raise


def write_failed(path: Path, error: OSError, consequence: str) -> SparseTrainingError:
    """The one-line error (exit 1) of a write that failed: full disk, read-only place, ..."""
    return SparseTrainingError(f"cannot write {path} ({error.strerror or error}); {consequence}")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())


@contextmanager
def exclusive_lock(path: str | Path, wait: bool = True, busy: str = "") -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the block. The
    kernel drops it when the process dies, even by SIGKILL, so a crash never leaves a stale
    lock. With `wait=False`, a lock held by another process is the UserError `busy`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, timeout=-1 if wait else 0, mode=0o666 & ~_UMASK, thread_local=False)
        lock.acquire()
    except Timeout:
        raise UserError(busy or f"{path} is locked by another process") from None
    except OSError as error:
        raise write_failed(path, error, "a lock file is needed beside what is written; write somewhere writable "
                                        "(analyses take --out)") from None
    try:
        yield
    finally:
        lock.release()


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; anything else is a one-line UserError."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a valid {what} file: {error}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a valid {what} file: expected a JSON object")
    return value


def torch_load_safe(path: str | Path, what: str = "checkpoint") -> Any:
    """Load a torch file with weights_only=True; any failure is a one-line UserError. A file
    torch cannot read at all is "not a <what>"; one that holds objects other than tensors and
    plain values is refused, because loading it could run code."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_file():
        raise UserError(f"{path} is not a file; pass a {what} file")
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols: the error says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        text = str(error)
        if _is_pickle_or_archive(path):  # well-formed, but holds what weights_only refuses (classes, code)
            raise UserError(f"{path} is refused for safety: it contains objects other than tensors and plain "
                            "Python values, and loading them could run code") from None
        lines = [line.strip() for line in text.strip().splitlines() if line.strip() and "weights_only" not in line]
        reason = next((line for line in lines if line.lower().startswith("unsupported operand")),
                      lines[-1] if lines else type(error).__name__)
        raise UserError(f"{path} is not a readable {what}: not a torch file ({reason[:160]})") from None


def _is_pickle_or_archive(path: Path) -> bool:
    """Whether the file starts like a pickle (protocol 2+) or a torch zip archive, as every
    torch file does: such a file that weights_only refuses holds objects, not tensors."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head[:1] == b"\x80" or head == b"PK\x03\x04"
