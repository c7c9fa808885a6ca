"""The settings of every analysis: frozen dataclasses whose fields document themselves
(`sparse_training.config.setting`), so that the CLI generates its options, choices, defaults
and help from them (cli/options.py) and never copies one. Nothing here imports torch, so a
command's --help stays quick."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sparse_training.config import PRECISIONS, setting
from sparse_training.errors import UserError


# ---------------------------------------------------------------- paths (barrier, connectivity)

BN_MODES = ("recompute", "interpolate")
BN_ALIASES = {"none": "interpolate"}
SPLITS = ("train", "test")
DEFAULT_EVAL_BATCH_SIZE = 1024
MAX_POINTS = 10_001  # more is a typo, not a finer path (the grid would not fit in memory long before)
MAX_COUNT = 2**31 - 1  # batch sizes and counts beyond this overflow torch's index types
SUBSPACES = ("masked", "full")


ALIGNMENTS = ("none", "weights")


@dataclass(frozen=True)
class EvaluationSettings:
    """How the networks of a path or a surface are evaluated: what barrier, connectivity and
    surface share."""

    splits: tuple[str, ...] = setting(SPLITS, "Splits to evaluate: train, test or train,test.", flag="--split")
    bn: str = setting("recompute", "BatchNorm running statistics at each point: recomputed from training batches, "
                                   "or interpolated like the weights (none is the same as interpolate: the "
                                   "interpolated state_dict as it is).", choices=BN_MODES + tuple(BN_ALIASES))
    bn_batches: int = setting(20, "Training batches the BatchNorm statistics are recomputed from.")
    samples: int | None = setting(None, "Evaluate on a fixed seeded subset of this many examples per split. [all]")
    seed: int = setting(0, "Seed of the --samples subset and of the BatchNorm batches.")
    batch_size: int | None = setting(None, "Evaluation batch size. [the run's eval batch size, else "
                                           f"{DEFAULT_EVAL_BATCH_SIZE}]")
    precision: str = setting("fp32", "Arithmetic of the evaluations (autocast): bf16 or fp16 are faster on a GPU but "
                                     "move losses by about 1e-2 relative, the size of small barriers.",
                             choices=PRECISIONS)
    align: str = setting("none", "weights: permute the hidden units of the second network (and its mask) to match "
                                 "the first by weight matching (Ainsworth et al. 2023) before comparing; for "
                                 "independently trained networks.", choices=ALIGNMENTS)

    def __post_init__(self) -> None:
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown:
            raise UserError(f"--split takes train, test or train,test; got {','.join(self.splits)!r}")
        object.__setattr__(self, "bn", BN_ALIASES.get(self.bn, self.bn))
        object.__setattr__(self, "splits", tuple(s for s in SPLITS if s in self.splits))

    def as_dict(self) -> dict[str, Any]:
        """The stored settings. fp32 and no alignment, what every file written before
        --precision and --align existed holds, are left out, so those files are still reused."""
        stored = {**asdict(self), "splits": list(self.splits), "bn_augment": False}
        for key, default in (("precision", "fp32"), ("align", "none")):
            if stored[key] == default:
                del stored[key]
        return stored


@dataclass(frozen=True)
class PathSettings(EvaluationSettings):
    """Everything that determines the numbers of a path; stored in the dataset's settings and
    compared when deciding whether an already-computed pair can be reused."""

    points: int = setting(11, "Points on the line, both endpoints included (at least 2).")


SURFACE_DIRECTIONS = ("random", "checkpoints")
MAX_GRID = 1001


@dataclass(frozen=True)
class SurfaceSettings(EvaluationSettings):
    """What determines a loss surface; stored in its dataset. `dims` and `range` are resolved
    from the inputs (`landscape.surface.resolved`) before they are stored."""

    directions: str | None = setting(None, "random: filter-normalised random directions around one checkpoint (Li et "
                                           "al. 2018), drawn from --seed; checkpoints: the line or plane through the "
                                           "two or three checkpoints given. [checkpoints for two or three inputs, "
                                           "else random]",
                                     choices=SURFACE_DIRECTIONS)
    dims: int | None = setting(None, "1: a line; 2: a plane. [1 for two checkpoints, else 2]")
    grid: int = setting(11, "Grid points per axis.")
    range: float | None = setting(None, "random: each axis spans [-R, R] in units of the filter-normalised direction "
                                        "[1]; checkpoints: the grid reaches R beyond the checkpoints, in units of the "
                                        "distance between the first two [0.25].")
    subspace: str = setting("masked", "Random directions: masked (zero wherever the checkpoint's mask prunes, so "
                                      "every point is as sparse as the checkpoint) or full (all weights). A line or "
                                      "plane through checkpoints is zero wherever all of them are.",
                             choices=SUBSPACES)
    move_bias_norm: bool = setting(False, "Random directions: also move biases and norm parameters (their "
                                          "direction is the parameters themselves, as in Li et al.'s code); by "
                                          "default they stay at the checkpoint's values.")


def validated(settings: EvaluationSettings) -> EvaluationSettings:
    """`settings`, or a one-line UserError naming the bad value."""
    if isinstance(settings, PathSettings) and not 2 <= settings.points <= MAX_POINTS:
        raise UserError(f"--points must be at least 2 (the two endpoints) and at most {MAX_POINTS}, got {settings.points}")
    if isinstance(settings, SurfaceSettings):
        _validate_surface(settings)
    if settings.bn not in BN_MODES:
        raise UserError(f"unknown --bn mode {settings.bn!r}; choose recompute, interpolate or none")
    if settings.precision not in PRECISIONS:
        raise UserError(f"unknown --precision {settings.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if settings.align not in ALIGNMENTS:
        raise UserError(f"unknown --align {settings.align!r}; choose none or weights")
    if not settings.splits:
        raise UserError("--split needs at least one of train, test")
    for name in ("bn_batches", "batch_size", "samples"):
        value = getattr(settings, name)
        if value is not None and not 1 <= value <= MAX_COUNT:
            raise UserError(f"--{name.replace('_', '-')} must be 1 to {MAX_COUNT}, got {value}")
    return settings


def _validate_surface(settings: SurfaceSettings) -> None:
    if not 2 <= settings.grid <= MAX_GRID:
        raise UserError(f"--grid must be 2 to {MAX_GRID} points per axis, got {settings.grid}")
    if settings.dims not in (None, 1, 2):
        raise UserError(f"--dims must be 1 (a line) or 2 (a plane), got {settings.dims}")
    if settings.range is not None and not (0 < settings.range < 1e6):
        raise UserError(f"--range must be positive, got {settings.range}")
    if settings.subspace not in SUBSPACES:
        raise UserError(f"--subspace must be masked or full, got {settings.subspace!r}")


# ---------------------------------------------------------------- sharpness

BACKEND_NAMES = ("lanczos", "power", "pyhessian")
DEFAULT_SAMPLES = 4096
DEFAULT_BATCH_SIZE = 1024
SHARPNESS_PRECISIONS = ("fp32", "fp64")


@dataclass(frozen=True)
class SharpnessSettings:
    """What defines the result, and the batch size, which does not (the products are the same):
    it is left out of `as_dict`, the settings stored and compared."""

    top_k: int = setting(1, "Number of largest eigenvalues.")
    trace: bool = setting(False, "Also estimate the trace (Hutchinson, Rademacher probes).")
    density: bool = setting(False, "Also the eigenvalue density (stochastic Lanczos quadrature).")
    samples: int | None = setting(None, "Size of the fixed, seeded training subset the loss is averaged over. "
                                        f"[{DEFAULT_SAMPLES} or all if fewer]")
    batch_size: int = setting(DEFAULT_BATCH_SIZE, "Batch size of the Hessian-vector products (does not change the "
                                                  "result).")
    subspace: str = setting("masked", "masked: only the weights the mask keeps (plus biases and norm parameters); "
                                      "full: all parameters.", choices=SUBSPACES)
    backend: str = setting("lanczos", "Eigenvalue solver: lanczos; power iteration with deflation or the PyHessian "
                                      "package, for comparison.", choices=BACKEND_NAMES)
    tol: float = setting(1e-3, "Stop when ||Hv - lambda v|| <= tol |lambda|, a bound on each eigenvalue's relative "
                               "error (pyhessian: its relative change between iterations).")
    trace_tol: float = setting(0.05, "Stop the trace when its standard error is at most this fraction of it. The "
                                     "top-k eigenpairs are projected out of the probes, so a larger --top-k gives a "
                                     "tighter trace.")
    max_hvp: int = setting(100, "Most Hessian-vector products per eigenvalue, and most trace probes.")
    seed: int = setting(0, "Seed of the subset and of the random vectors.")
    density_steps: int = setting(100, "Lanczos steps of each spectral-density run.")
    density_runs: int = setting(1, "Spectral-density runs (Rademacher start vectors), averaged.")
    precision: str = setting("fp32", "Arithmetic of the Hessian-vector products: fp32, or fp64 for small or "
                                     "ill-conditioned eigenvalues. Never bf16/fp16: a Hessian-vector product is a "
                                     "second derivative, and their 8- and 11-bit mantissas put its error far above "
                                     "--tol.", choices=SHARPNESS_PRECISIONS)
    warm_start: bool = setting(True, "Start each checkpoint's solve (lanczos, power) from the previous checkpoint's "
                                     "top eigenvectors, restricted to its mask (the first one, or where they do not "
                                     "fit, from a random vector). The stopping test, and so the accuracy, is the "
                                     "same; it saves products when consecutive checkpoints are close.")
    verify: bool = setting(False, "Spend one more Hessian-vector product per eigenvalue to store the explicit "
                                  "relative residual ||Hv - lambda v|| / |lambda| (residual_verified).")

    def validated(self) -> SharpnessSettings:
        checks = [
            (self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}"),
            (self.samples is None or self.samples >= 1, f"--samples must be at least 1, got {self.samples}"),
            (1 <= self.batch_size <= MAX_COUNT, f"--batch-size must be 1 to {MAX_COUNT}, got {self.batch_size}"),
            (self.subspace in SUBSPACES, f"--subspace must be masked or full, got {self.subspace!r}"),
            (self.backend in BACKEND_NAMES, f"--backend must be one of {', '.join(BACKEND_NAMES)}, got {self.backend!r}"),
            (0 < self.tol < 1, f"--tol must be in (0, 1), got {self.tol}"),
            (0 < self.trace_tol < 1, f"--trace-tol must be in (0, 1), got {self.trace_tol}"),
            (self.max_hvp >= 2, f"--max-hvp must be at least 2, got {self.max_hvp}"),
            # landscape.hessian.generator scales the seed: a larger one overflows torch's seed
            (abs(self.seed) <= MAX_COUNT, f"--seed must be within -{MAX_COUNT}..{MAX_COUNT}, got {self.seed}"),
            (self.density_steps >= 2 and self.density_runs >= 1, "density needs at least 2 Lanczos steps and 1 run"),
            (self.precision in SHARPNESS_PRECISIONS, f"--precision must be fp32 or fp64, got {self.precision!r}"),
            (self.precision == "fp32" or self.backend != "pyhessian",
             "the pyhessian backend computes in fp32 only; use --backend lanczos or power for --precision fp64"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self

    def as_dict(self) -> dict[str, Any]:
        """The stored settings, without the batch size and the warm start (neither changes a
        result beyond its --tol bound; each checkpoint stores whether it was warm-started).
        fp32 and no --verify, what every file written before these options existed holds, are
        left out, so those files are still reused."""
        defaults = {"precision": "fp32", "verify": False}
        return {key: value for key, value in asdict(self).items()
                if key not in ("batch_size", "warm_start") and not (key in defaults and value == defaults[key])}

    def max_products(self) -> int:
        """Most Hessian-vector products one checkpoint can cost: every backend's limit on the
        eigenvalues (plus pyhessian's residual checks and --verify's), the trace's probes, the
        density's steps."""
        return (self.top_k * (self.max_hvp + 1 + int(self.verify)) + (self.max_hvp if self.trace else 0)
                + (self.density_steps * self.density_runs if self.density else 0))


# ---------------------------------------------------------------- signs, overlap

REFERENCES = ("init", "rewind", "previous")


@dataclass(frozen=True)
class SignsSettings:
    """What `landscape signs` compares; the sign counts themselves have no setting."""

    reference: str | None = setting(None, "With one run: compare each cycle with init, the rewind point, or the "
                                          "checkpoint before it (for cycle_000: rewind if the run has one, else init). "
                                          "[init]", choices=REFERENCES)


@dataclass(frozen=True)
class OverlapSettings:
    """Which masks `landscape overlap` compares."""

    across_cycles: bool = setting(False, "One run: every cycle's mask against every other's.")
