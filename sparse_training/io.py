"""Files, safely: atomic writes, inter-process locks and loading that never runs code.

Every write goes to a temporary file in the same directory and is renamed into place, so a
file under its final name is always complete. Every read opens regular files only (a FIFO
would block forever, a directory or device is not a record) and every torch read uses
`torch.load(weights_only=True)`: nothing in a file is ever executed. Which file is which is
`rundir`'s business; what a checkpoint holds is `checkpoint`'s."""

from __future__ import annotations

import io
import json
import os
import stat
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

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
def exclusive_lock(path: str | Path, wait: bool = True, busy: str = "", record_holder: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the block, through
    `filelock` (an flock the kernel drops when the process dies, even by SIGKILL, so a crash
    never leaves a stale lock). With `wait=False`, a lock held by another process is the
    UserError `busy`, followed by the holder's PID when it recorded one (`record_holder`,
    in `holder_file(path)`) and is still alive."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, timeout=-1 if wait else 0, mode=0o666 & ~_UMASK, thread_local=False)
        lock.acquire()
    except Timeout:
        holder = _live_holder(holder_file(path))
        raise UserError((busy or f"{path} is locked by another process")
                        + (f" (held by process {holder})" if holder else "")) from None
    except OSError as error:
        raise write_failed(path, error, "a lock file is needed beside what is written; write somewhere writable "
                                        "(analyses take --out)") from None
    try:
        if record_holder:
            holder_file(path).write_text(f"{os.getpid()}\n")
        yield
    finally:
        if record_holder:  # only a killed holder leaves its PID behind, and it is no longer alive
            holder_file(path).unlink(missing_ok=True)
        lock.release()


def holder_file(lock: Path) -> Path:
    """Where the process holding `lock` records its PID (filelock owns the lock file itself)."""
    return lock.with_name(f"{lock.name}.pid")


def _live_holder(path: Path) -> int | None:
    """The PID recorded in `path`, if that process still exists."""
    try:
        with open_regular(path, "lock holder") as handle:
            pid = int(handle.read(32).decode().strip())
        os.kill(pid, 0)
    except PermissionError:  # alive, but another user's
        return pid
    except (OSError, UserError, ValueError, UnicodeDecodeError, OverflowError):  # none recorded, or it died
        return None
    return pid


def open_regular(path: str | Path, what: str) -> IO[bytes]:
    """`path` opened for reading in binary mode, if it is a regular file; a FIFO (whose open
    or read would block forever), a directory or a device is a one-line UserError."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # non-blocking: opening a FIFO returns at once
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a regular file (a directory, FIFO or device); a {what} file belongs there")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; anything else is a one-line UserError."""
    try:
        with open_regular(path, what) as handle:
            value = json.loads(handle.read().decode())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise UserError(f"{path} is not a valid {what} file: {str(error)[:160]}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a valid {what} file: expected a JSON object")
    return value


def torch_load_safe(path: str | Path, what: str = "checkpoint") -> Any:
    """Load a torch file with weights_only=True; any failure is a one-line UserError. A file
    torch cannot read at all is "not a <what>"; one that holds objects other than tensors and
    plain values is refused, because loading it could run code."""
    path = Path(path)
    with open_regular(path, what) as handle:
        try:
            with warnings.catch_warnings():  # torch warns about unusual pickle protocols: the error says it all
                warnings.simplefilter("ignore")
                return torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
            if _is_pickle_or_archive(handle):  # well-formed, but holds what weights_only refuses (classes, code)
                raise UserError(f"{path} is refused for safety: it contains objects other than tensors and plain "
                                "Python values, and loading them could run code") from None
            raise UserError(f"{path} is not a readable {what}: not a torch file ({_reason(error)})") from None


def _reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip() and "weights_only" not in line]
    reason = next((line for line in lines if line.lower().startswith("unsupported operand")),
                  lines[-1] if lines else type(error).__name__)
    return reason[:160]


def _is_pickle_or_archive(handle: IO[bytes]) -> bool:
    """Whether the file starts like a pickle (protocol 2+) or a torch zip archive, as every
    torch file does: such a file that weights_only refuses holds objects, not tensors."""
    handle.seek(0)
    head = handle.read(4)
    return head[:1] == b"\x80" or head == b"PK\x03\x04"
