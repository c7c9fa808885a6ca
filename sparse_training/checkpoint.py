"""The run directory and checkpoints: the only module that knows paths.

RUN/
  config.json  meta.json  metrics.csv  state.pt  DONE
  checkpoints/{init,rewind,cycle_000,...}.pt
  analysis/*.nc   figures/*.png      (written only by landscape)

Every write goes to a temporary file in the same directory and is renamed into place, so a
file under its final name is always complete. Every read uses `torch.load(weights_only=True)`:
nothing in a checkpoint is ever executed."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .config import DataConfig, ModelConfig
from .errors import IncompleteRunError, SparseTrainingError, UserError

CHECKPOINT_SCHEMA = 1
METRICS_HEADER = ("cycle", "epoch", "step", "split", "metric", "value")
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_LABEL = re.compile(r"^(init|rewind|cycle_\d{3}(_epoch_\d{3})?)$")
TEMPORARY_SUFFIX = ".tmp"  # atomic_path writes .NAME.XXXXXXXX.tmp beside NAME


# ---------------------------------------------------------------- atomic writes

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
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    except OSError as error:
        raise write_failed(path, error, "a lock file is needed beside what is written; write somewhere writable "
                                        "(analyses take --out)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise UserError(busy or f"{path} is locked by another process") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def torch_load_safe(path: str | Path, what: str = "checkpoint") -> Any:
    """Load a torch file with weights_only=True; any failure is a one-line UserError."""
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
        if "unsupported global" in text.lower() or "unsupported operand" in text.lower():
            reason = "it contains objects other than tensors and plain Python values, refused for safety"
        else:
            lines = [line for line in text.strip().splitlines() if line.strip() and "weights_only" not in line]
            reason = f"not a torch file: {lines[-1].strip() if lines else type(error).__name__}"
        raise UserError(f"{path} is not a readable {what} ({reason[:200]})") from None


# ---------------------------------------------------------------- the run directory

class RunDir:
    """All paths of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def meta(self) -> Path:
        return self.path / "meta.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def state(self) -> Path:
        return self.path / "state.pt"

    @property
    def done(self) -> Path:
        return self.path / "DONE"

    @property
    def lock(self) -> Path:
        """Held by the one process training this run."""
        return self.path / ".train.lock"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def analysis(self) -> Path:
        return self.path / "analysis"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    def checkpoint(self, label: str) -> Path:
        return self.checkpoints / f"{label}.pt"

    def cycle_checkpoint(self, cycle: int, epoch: int | None = None) -> Path:
        return self.checkpoint(cycle_label(cycle, epoch))

    def analysis_file(self, name: str) -> Path:
        return self.analysis / f"{name}.nc"

    def figure_file(self, name: str, fmt: str = "png") -> Path:
        return self.figures / f"{name}.{fmt}"

    def exists(self) -> bool:
        return self.config.exists()

    def stray_temporaries(self) -> list[Path]:
        """Temporary files of writes that a killed process never finished (atomic_path's
        .NAME.XXXXXXXX.tmp): never under a final name, safe to delete while holding `lock`."""
        return [p for folder in (self.path, self.checkpoints) if folder.is_dir()
                for p in folder.glob(f".*{TEMPORARY_SUFFIX}") if p.is_file()]

    def is_done(self) -> bool:
        return self.done.exists()

    def checkpoint_labels(self, include_intermediate: bool = False) -> list[str]:
        """init, rewind, then the cycle checkpoints in order (end-of-cycle only by default)."""
        if not self.checkpoints.is_dir():
            return []
        labels = [p.stem for p in self.checkpoints.glob("*.pt") if _LABEL.match(p.stem)]
        if not include_intermediate:
            labels = [label for label in labels if "_epoch_" not in label]
        order = {"init": (0, ""), "rewind": (1, "")}
        return sorted(labels, key=lambda label: order.get(label, (2, label)))

    def cycle_labels(self) -> list[str]:
        return [label for label in self.checkpoint_labels() if label.startswith("cycle_")]

    def require_done(self, allow_incomplete: bool = False) -> None:
        if not self.exists():
            raise UserError(f"{self.path} is not a run directory (no config.json); pass a run made by `landscape train`")
        if not self.is_done() and not allow_incomplete:
            raise IncompleteRunError(
                f"run {self.path} is incomplete (no DONE); finish it with `landscape train --resume {self.path}` "
                "or pass --allow-incomplete"
            )


def cycle_label(cycle: int, epoch: int | None = None) -> str:
    return f"cycle_{cycle:03d}" if epoch is None else f"cycle_{cycle:03d}_epoch_{epoch:03d}"


def run_of_checkpoint(path: str | Path) -> RunDir | None:
    """The run a checkpoint file belongs to, when it lies in RUN/checkpoints/."""
    path = Path(path).resolve()
    run = RunDir(path.parent.parent)
    return run if path.parent.name == "checkpoints" and run.exists() else None


# ---------------------------------------------------------------- config, meta, metrics

def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a valid {what} file: {error}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a valid {what} file: expected a JSON object")
    return value


def read_config(run: RunDir):
    from .config import Config

    return Config.from_dict(read_json(run.config, "config.json"))


def read_meta(run: RunDir) -> dict[str, Any]:
    return read_json(run.meta, "meta.json") if run.meta.exists() else {}


def update_meta(run: RunDir, **changes: Any) -> dict[str, Any]:
    meta = read_meta(run)
    meta.update(changes)
    write_json_atomic(run.meta, meta)
    return meta


def append_metrics(run: RunDir, rows: list[tuple]) -> None:
    """Append (cycle, epoch, step, split, metric, value) rows; the header is written once."""
    new = not run.metrics.exists()
    try:
        with open(run.metrics, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(METRICS_HEADER)
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise write_failed(run.metrics, error, "a row cut short is dropped when the run is resumed") from None


def read_metrics(run: RunDir) -> list[dict[str, Any]]:
    """metrics.csv as a list of dicts with typed values (cycle/epoch/step int, value float)."""
    if not run.metrics.exists():
        return []
    try:
        with open(run.metrics, newline="") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != METRICS_HEADER:
                raise UserError(f"{run.metrics} does not have the columns {','.join(METRICS_HEADER)}")
            return [
                {"cycle": int(r["cycle"]), "epoch": int(r["epoch"]), "step": int(r["step"]),
                 "split": r["split"], "metric": r["metric"], "value": float(r["value"])}
                for r in reader
            ]
    except (ValueError, TypeError, KeyError, csv.Error, UnicodeDecodeError) as error:
        raise UserError(f"{run.metrics} is corrupt ({error}); it can be rebuilt only by re-running training") from None


def truncate_metrics(run: RunDir, through: tuple[int, int]) -> None:
    """Keep only rows up to (cycle, epoch) `through`: rows of an epoch that a crash
    interrupted before the resume state recorded it are dropped, and so is a row that the
    crash (or a full disk) cut short. Rewritten atomically."""
    if not run.metrics.exists():
        return
    written = run.metrics.read_bytes()
    try:
        lines = list(csv.reader(io.StringIO(written.decode(errors="replace"), newline="")))
    except csv.Error as error:
        raise UserError(f"{run.metrics} is corrupt ({error}); delete the run directory and train again") from None
    if len(lines) > 1 and tuple(lines[0]) != METRICS_HEADER:
        raise UserError(f"{run.metrics} does not have the columns {','.join(METRICS_HEADER)}")
    rows = [row for row in map(_metrics_row, lines[1:]) if row is not None and (row[0], row[1]) <= through]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(METRICS_HEADER)
    writer.writerows(rows)
    if buffer.getvalue().encode() != written:
        write_bytes_atomic(run.metrics, buffer.getvalue().encode())


def _metrics_row(fields: list[str]) -> tuple | None:
    """(cycle, epoch, step, split, metric, value) as written, or None for a torn row."""
    try:
        cycle, epoch, step, split, metric, value = fields
        float(value)
        return int(cycle), int(epoch), int(step), split, metric, value
    except ValueError:
        return None


# ---------------------------------------------------------------- checkpoints

@dataclass
class Checkpoint:
    """A loaded checkpoint. `masks` always covers every prunable weight (all True when dense);
    `model`/`data` are None only for a plain state_dict loaded without --model/--data."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    model: ModelConfig | None
    data: DataConfig | None
    label: str
    cycle: int | None = None
    epoch: int | None = None
    step: int | None = None
    sparsity: float = 0.0
    method: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    plain: bool = False  # a user's plain state_dict rather than one of ours
    model_from_user: bool = False  # the user typed --model: a module.path:factory may be imported

    @property
    def run(self) -> RunDir | None:
        return run_of_checkpoint(self.path)

    def build_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """A fresh model with this checkpoint's weights, on `device`, in eval mode."""
        from .models import build_model

        if self.model is None:
            raise UserError(f"{self.path} is a plain state_dict; say which model it is with --model NAME")
        model = build_model(self.model, allow_import=self.model_from_user)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as error:
            first = str(error).strip().splitlines()
            raise UserError(
                f"{self.path} does not fit model {self.model.name!r} "
                f"({first[1].strip() if len(first) > 1 else first[0][:160]}); check --model/--model-kwargs"
            ) from None
        return model.to(device).eval()


def checkpoint_payload(
    *, model: nn.Module, masks: Mapping[str, torch.Tensor], model_config: ModelConfig, data_config: DataConfig,
    label: str, cycle: int | None, epoch: int | None, step: int, sparsity: float, method: str,
    metrics: Mapping[str, float], config: Mapping[str, Any],
) -> dict[str, Any]:
    """The self-describing dict written to disk: tensors and plain Python values only."""
    from dataclasses import asdict

    return {
        "schema_version": CHECKPOINT_SCHEMA,
        "label": label,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "masks": {k: v.detach().cpu().clone() for k, v in masks.items()},
        "model": asdict(model_config),
        "data": asdict(data_config),
        "cycle": cycle,
        "epoch": epoch,
        "step": step,
        "sparsity": float(sparsity),
        "method": method,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "config": json.loads(json.dumps(dict(config))),
    }


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> None:
    torch_save_atomic(dict(payload), path)


def load_checkpoint(
    path: str | Path, *, model: str | None = None, model_kwargs: Mapping[str, Any] | None = None,
    data: str | None = None, check_finite: bool = True,
) -> Checkpoint:
    """Load one of our checkpoints, or a user's plain state_dict when `model` (and `data`,
    for analyses that evaluate) is given. Raises UserError with a one-line message."""
    path = Path(path)
    raw = torch_load_safe(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds a {type(raw).__name__}, not a checkpoint or state_dict")
    if "schema_version" in raw and "state_dict" in raw:
        ckpt = _from_payload(path, raw)
        if model is not None:  # a user may override the recorded architecture kwargs, never silently
            ckpt.model = ModelConfig(model, dict(model_kwargs or ckpt.model.kwargs))
            ckpt.model_from_user = True
        if data is not None:
            ckpt.data = DataConfig(name=data)
    else:
        ckpt = _from_state_dict(path, raw, model, model_kwargs, data)
    if check_finite:
        bad = [k for k, v in ckpt.state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise UserError(f"{path} has non-finite (NaN/Inf) values in {bad[0]}" + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""))
    return ckpt


def _from_payload(path: Path, raw: dict[str, Any]) -> Checkpoint:
    from .config import section

    schema = raw["schema_version"]
    if type(schema) is not int or schema != CHECKPOINT_SCHEMA:
        raise UserError(f"{path} has checkpoint schema {schema!r:.40}; this version reads {CHECKPOINT_SCHEMA}")
    try:
        state_dict, masks = raw["state_dict"], raw.get("masks") or {}
        if not (_is_tensor_dict(state_dict) and _is_tensor_dict(masks)):
            raise TypeError("state_dict and masks must map names to dense tensors")
        model_cfg = section(ModelConfig, raw["model"], "model")
        data_cfg = section(DataConfig, raw["data"], "data") if raw.get("data") is not None else None
        fields = {key: _typed(raw, key, kinds) for key, kinds in _PAYLOAD_FIELDS.items()}
        if not all(isinstance(k, str) and _is_number(v) for k, v in fields["metrics"].items()):
            raise TypeError("metrics must map names to numbers")
    except (KeyError, TypeError, ValueError, UserError) as error:
        raise UserError(f"{path} is a damaged checkpoint ({str(error)[:200]})") from None
    masks = _complete_masks(path, state_dict, masks, model_cfg, allow_import=False)
    for name, mask in masks.items():
        if name not in state_dict or mask.shape != state_dict[name].shape:
            raise UserError(f"{path} is a damaged checkpoint (its mask of {name!r} fits no weight of that shape)")
    return Checkpoint(
        path=path, state_dict=state_dict, masks=masks, model=model_cfg, data=data_cfg,
        label=fields["label"] or path.stem, cycle=fields["cycle"], epoch=fields["epoch"], step=fields["step"],
        sparsity=float(fields["sparsity"] or 0.0), method=fields["method"], metrics=dict(fields["metrics"] or {}),
        config=dict(fields["config"] or {}),
    )


# The plain fields of a checkpoint and the types they may have (None: absent).
_PAYLOAD_FIELDS = {"label": (str,), "cycle": (int,), "epoch": (int,), "step": (int,), "sparsity": (int, float),
                   "method": (str,), "metrics": (dict,), "config": (dict,)}


def _typed(raw: dict[str, Any], key: str, kinds: tuple[type, ...]) -> Any:
    value = raw.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
        raise TypeError(f"{key} is a {type(value).__name__}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_tensor_dict(value: Any) -> bool:
    """{name: dense CPU tensor}, the only thing the code may use as weights or masks (torch.load
    also gives back sparse and meta tensors)."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided and v.device.type == "cpu"
        for k, v in value.items())


def _complete_masks(path: Path, state_dict, masks, model_cfg: ModelConfig | None, allow_import: bool) -> dict[str, torch.Tensor]:
    """Dense layers have no stored mask entry: fill in all-True for every prunable weight.
    A user model named in the file is not imported: its stored masks are taken as they are."""
    if model_cfg is None:
        return masks
    if ":" in model_cfg.name and not model_cfg.name.startswith("tv:") and not allow_import:
        return {name: m.bool() for name, m in masks.items()}
    from .masks import prunable_parameters
    from .models import build_model

    names = prunable_parameters(build_model(model_cfg, allow_import=allow_import)).keys()
    full = {}
    for name in names:
        if name in masks:
            full[name] = masks[name].bool()
        elif name in state_dict:
            full[name] = torch.ones_like(state_dict[name], dtype=torch.bool)
        else:
            raise UserError(f"{path} has no weight {name!r} that model {model_cfg.name!r} needs; check --model")
    return full


def _from_state_dict(path: Path, raw: dict[str, Any], model: str | None, model_kwargs, data: str | None) -> Checkpoint:
    if "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]  # a common wrapper: {"state_dict": ..., "epoch": ...}
    if not raw or not _is_tensor_dict(raw):
        raise UserError(f"{path} is neither a checkpoint of ours nor a state_dict of tensors")
    if model is None:
        raise UserError(f"{path} is a plain state_dict; say which model it is with --model NAME [--model-kwargs JSON] --data NAME")
    model_cfg = ModelConfig(model, dict(model_kwargs or {}))
    from .masks import mask_from_weights, prunable_parameters
    from .models import build_model

    names = list(prunable_parameters(build_model(model_cfg, allow_import=True)))
    missing = [n for n in names if n not in raw]
    if missing:
        raise UserError(f"{path} does not fit model {model!r}: no {missing[0]!r}; check --model/--model-kwargs")
    masks = mask_from_weights(raw, names)
    from .masks import sparsity as mask_sparsity

    return Checkpoint(
        path=path, state_dict=dict(raw), masks=masks, model=model_cfg,
        data=DataConfig(name=data) if data else None, label=path.stem, sparsity=mask_sparsity(masks), plain=True,
        model_from_user=True,
    )


def resolve_checkpoints(path: str | Path, labels: list[str] | None = None, allow_incomplete: bool = False) -> tuple[RunDir | None, list[Path]]:
    """A run directory (its checkpoints, or the `labels` asked for) or a single checkpoint file."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        run.require_done(allow_incomplete)
        available = run.checkpoint_labels()
        wanted = labels or available
        unknown = [label for label in wanted if label not in available and not run.checkpoint(label).exists()]
        if unknown:
            raise UserError(f"run {path} has no checkpoint {unknown[0]!r}; it has {', '.join(available) or 'none'}")
        return run, [run.checkpoint(label) for label in wanted]
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run directory or a checkpoint file")
    return run_of_checkpoint(path), [path]
