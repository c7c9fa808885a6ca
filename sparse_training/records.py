"""The run's records: config.json (written first, never edited), meta.json (provenance and
status) and metrics.csv (append-only, long form: cycle,epoch,step,split,metric,value)."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from .errors import UserError
from .io import open_regular, read_json, write_bytes_atomic, write_failed, write_json_atomic
from .rundir import RunDir

METRICS_HEADER = ("cycle", "epoch", "step", "split", "metric", "value")
MAX_COUNTER = 2**63  # cycle, epoch and step are stored as int64 by every reader downstream


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
        with io.TextIOWrapper(open_regular(run.metrics, "metrics.csv"), newline="") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != METRICS_HEADER:
                raise UserError(f"{run.metrics} does not have the columns {','.join(METRICS_HEADER)}")
            return [
                {"cycle": _counter(r["cycle"]), "epoch": _counter(r["epoch"]), "step": _counter(r["step"]),
                 "split": r["split"], "metric": r["metric"], "value": float(r["value"])}
                for r in reader
            ]
    except (ValueError, TypeError, KeyError, csv.Error, UnicodeDecodeError) as error:
        raise UserError(f"{run.metrics} is corrupt ({str(error)[:160]}); it can be rebuilt only by re-running "
                        "training") from None


def _counter(text: str) -> int:
    value = int(text)
    if not 0 <= value < MAX_COUNTER:
        raise ValueError(f"cycle, epoch and step must lie in [0, 2**63), got {text[:30]}")
    return value


def truncate_metrics(run: RunDir, through: tuple[int, int]) -> None:
    """Keep only rows up to (cycle, epoch) `through`: rows of an epoch that a crash
    interrupted before the resume state recorded it are dropped, and so is a row that the
    crash (or a full disk) cut short. Rewritten atomically."""
    if not run.metrics.exists():
        return
    with open_regular(run.metrics, "metrics.csv") as handle:
        written = handle.read()
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
        return _counter(cycle), _counter(epoch), _counter(step), split, metric, value
    except ValueError:
        return None
