"""Every path of a run directory, and the inverse lookups: which run a checkpoint or an
analysis file belongs to, where the analysis of loose checkpoints goes, where a figure goes.
No other module joins `checkpoints`, `analysis` or `figures` onto a path.

RUN/
  config.json  meta.json  metrics.csv  state.pt  DONE  .train.lock
  checkpoints/{init,rewind,cycle_000,cycle_000_epoch_005,...}.pt
  analysis/*.nc   figures/*.png      (written only by landscape)

Functions here only compute paths (and list or test what exists); reading and writing the
files is `records`, `checkpoint` and `landscape.store`'s business."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import IncompleteRunError, UserError
from .io import TEMPORARY_SUFFIX

CHECKPOINTS, ANALYSIS, FIGURES = "checkpoints", "analysis", "figures"
CHECKPOINT_SUFFIX, DATASET_SUFFIX = ".pt", ".nc"
LABEL_GRAMMAR = "init, rewind, cycle_NNN or cycle_NNN_epoch_NNN"
_LABEL = re.compile(r"^(init|rewind|cycle_\d{3,}(_epoch_\d{3,})?)$")


def is_label(label: str) -> bool:
    """Whether `label` follows the label grammar (and so can name no path outside the run)."""
    return isinstance(label, str) and _LABEL.match(label) is not None


def require_label(label: str) -> str:
    if not is_label(label):
        raise UserError(f"{label!r} is not a checkpoint label; labels are {LABEL_GRAMMAR}")
    return label


def cycle_label(cycle: int, epoch: int | None = None) -> str:
    return f"cycle_{cycle:03d}" if epoch is None else f"cycle_{cycle:03d}_epoch_{epoch:03d}"


class RunDir:
    """All paths of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        """The run's name in labels and datasets: its folder's name."""
        return self.path.resolve().name

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
        return self.path / CHECKPOINTS

    @property
    def analysis(self) -> Path:
        return self.path / ANALYSIS

    @property
    def figures(self) -> Path:
        return self.path / FIGURES

    def checkpoint(self, label: str) -> Path:
        """The file of checkpoint `label`; a label outside the grammar is a UserError, so a
        label typed by a user can never name a file outside the run."""
        return self.checkpoints / f"{require_label(label)}{CHECKPOINT_SUFFIX}"

    def cycle_checkpoint(self, cycle: int, epoch: int | None = None) -> Path:
        return self.checkpoint(cycle_label(cycle, epoch))

    def analysis_file(self, name: str) -> Path:
        return self.analysis / f"{name}{DATASET_SUFFIX}"

    def figure_file(self, name: str, fmt: str = "png") -> Path:
        return self.figures / f"{name}.{fmt}"

    def analysis_files(self) -> list[Path]:
        return sorted(self.analysis.glob(f"*{DATASET_SUFFIX}")) if self.analysis.is_dir() else []

    def figure_files(self) -> list[Path]:
        return sorted(p for p in self.figures.glob("*") if p.is_file()) if self.figures.is_dir() else []

    def exists(self) -> bool:
        return self.config.exists()

    def is_done(self) -> bool:
        return self.done.exists()

    def stray_temporaries(self) -> list[Path]:
        """Temporary files of writes that a killed process never finished (io.atomic_path's
        .NAME.XXXXXXXX.tmp): never under a final name, safe to delete while holding `lock`."""
        return [p for folder in (self.path, self.checkpoints) if folder.is_dir()
                for p in folder.glob(f".*{TEMPORARY_SUFFIX}") if p.is_file()]

    def checkpoint_labels(self, include_intermediate: bool = False) -> list[str]:
        """init, rewind, then the cycle checkpoints in order (end-of-cycle only by default)."""
        if not self.checkpoints.is_dir():
            return []
        labels = [p.stem for p in self.checkpoints.glob(f"*{CHECKPOINT_SUFFIX}") if is_label(p.stem)]
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


class StudyDir:
    """A folder of runs with the analyses and figures that span them (`landscape demo`):
    STUDY/runs/<name>/, STUDY/analysis/*.nc, STUDY/figures/*.png."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def run(self, name: str) -> Path:
        return self.path / "runs" / name

    def analysis_file(self, name: str) -> Path:
        return self.path / ANALYSIS / f"{name}{DATASET_SUFFIX}"

    def figure_file(self, name: str, fmt: str = "png") -> Path:
        return self.path / FIGURES / f"{name}.{fmt}"

    def datasets(self) -> list[Path]:
        """Every analysis dataset of the study and of its runs."""
        return sorted(self.path.glob(f"**/{ANALYSIS}/*{DATASET_SUFFIX}"))

    def figures(self, fmt: str = "png") -> list[Path]:
        """Every figure of the study and of its runs."""
        return sorted(self.path.glob(f"**/{FIGURES}/*.{fmt}"))

    def is_study_figure(self, path: str | Path) -> bool:
        """Whether `path` is one of the study's own figures (not a run's)."""
        return Path(path).parent == self.path / FIGURES


# ---------------------------------------------------------------- inverse lookups

def _run_holding(path: str | Path, folder: str) -> RunDir | None:
    """The run whose `folder` (checkpoints, analysis) directly holds `path`, if any."""
    path = Path(path).resolve()
    run = RunDir(path.parent.parent)
    return run if path.parent.name == folder and run.exists() else None


def run_of_checkpoint(path: str | Path) -> RunDir | None:
    """The run a checkpoint file belongs to, when it lies in RUN/checkpoints/."""
    return _run_holding(path, CHECKPOINTS)


def run_of_analysis(path: str | Path) -> RunDir | None:
    """The run an analysis dataset belongs to, when it lies in RUN/analysis/."""
    return _run_holding(path, ANALYSIS)


def run_of_file(path: str | Path) -> RunDir | None:
    """The run a file of it belongs to: RUN/metrics.csv (or another top-level file), a
    checkpoint or an analysis dataset."""
    path = Path(path)
    top = RunDir(path.resolve().parent)
    if top.exists():
        return top
    return run_of_checkpoint(path) or run_of_analysis(path)


# ---------------------------------------------------------------- where results go

def loose_analysis_file(checkpoints: list[Path], analysis: str) -> Path:
    """The dataset of an analysis of checkpoint files outside any run: beside the first one,
    named after all of them: `best.sharpness.nc`, `a__b.barrier.nc`."""
    stems = "__".join(Path(p).stem for p in checkpoints)
    return Path(checkpoints[0]).with_name(f"{stems}.{analysis}{DATASET_SUFFIX}")


def analysis_output(analysis: str, run: RunDir | None, checkpoints: list[Path], name: str | None = None) -> Path:
    """Where an analysis goes when the user gives no --out: RUN/analysis/<name>.nc for inputs
    of one run (`name` defaults to the analysis), else `loose_analysis_file`."""
    if run is not None:
        return run.analysis_file(name or analysis)
    return loose_analysis_file(checkpoints, analysis)


def figure_output(dataset: str | Path, kind: str, fmt: str = "png") -> Path:
    """The figure of one dataset: RUN/figures/<stem>.<fmt> for a run's analysis file, else
    beside the dataset; the stem gains `_<kind>` unless it already names the kind
    (`sharpness.nc`, `best.sharpness.nc`)."""
    dataset = Path(dataset)
    stem = dataset.stem
    name = stem if stem.startswith(kind) or stem.endswith(f".{kind}") else f"{stem}_{kind}"
    run = run_of_analysis(dataset)
    return run.figure_file(name, fmt) if run is not None else dataset.with_name(f"{name}.{fmt}")
