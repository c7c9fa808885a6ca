"""Run configuration: frozen dataclasses with a JSON round-trip. Every default lives here.

A config is built from a TOML file (`--config run.toml`, sections named like the fields of
`Config`) and/or flags, then `resolve()`d (method-dependent defaults filled in, values
checked) before anything is written; the resolved config is the first file of a run."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import UserError

SCHEMA_VERSION = 1
MAX_CYCLES = 1000  # more is a typo (or a prune-fraction near 0), not a plan: the plan is built up front

ALLOCATIONS = ("global", "uniform", "erk", "er-balanced")
SCHEDULES = ("triangular", "step", "cosine", "constant")
OPTIMIZERS = ("sgd", "adam", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "channels-last", "contiguous")
IMAGE_DECODERS = ("auto", "pil", "device")
# Per-epoch train metrics use a subset when the training split is larger than this (`eval_train_samples`).
FULL_TRAIN_EVAL_LIMIT, DEFAULT_EVAL_TRAIN_SAMPLES = 100_000, 10_000


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
            choices: Callable[[], Sequence[str]] | Sequence[str] | None = None,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A settings field that documents itself: `help` (and `choices`, a list or a function
    returning one, so registries are read when asked) is what `--help` shows and `flag` the
    option's name when it is not --field-name. The CLI generates its options from these
    (cli/options.py), so no choice list or default is ever copied by hand."""
    metadata = {"help": help, "flag": flag, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# The registries import torch: read only when a choice list is needed (`landscape train
# --help`, resolving a config), never when the config module is imported.
def _pruner_names() -> Sequence[str]:
    from .pruners import names

    return names()


def _method_names() -> Sequence[str]:
    from .methods import names

    return names()


@dataclass(frozen=True)
class DataConfig:
    name: str = setting("mnist1d", "mnist1d, cifar10, cifar100, mnist, fashion-mnist, imagefolder:PATH, npz:PATH, "
                                   "synthetic.", flag="--data")
    data_dir: str | None = setting(None, "Where torchvision data sets (and the mnist1d cache) live.")
    download: bool = setting(False, "Let torchvision download the data set into --data-dir (only ever from the "
                                    "command line).")
    augment: bool = setting(True, "The data set's standard training augmentation (CIFAR: crop + flip).")
    seed: int = setting(42, "Generation seed of mnist1d / synthetic data.", flag="--data-seed")
    num_workers: int = setting(0, "DataLoader workers for the large (image folder) sources.")
    image_decoding: str = setting("auto", "imagefolder: where JPEGs are decoded and augmented: pil (PIL in the "
                                          "DataLoader workers) or device (workers read bytes; batched decode, crop "
                                          "and flip on the run's device). [auto: device on CUDA, pil elsewhere]",
                                  choices=IMAGE_DECODERS)


@dataclass(frozen=True)
class ModelConfig:
    name: str = setting("cnn1d", "mlp, cnn1d, resnet1d, vit1d, resnet20/32/56, resnet18/50, vgg16, "
                                 "mobilenetv2, vit, tv:NAME, module.path:factory.", flag="--model")
    kwargs: dict[str, Any] = setting(help="JSON object of model keyword arguments, e.g. '{\"width\": 2}' "
                                          "(num_classes and in_channels are completed from the data).",
                                     flag="--model-kwargs", default_factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = setting("sgd", "Optimizer. sgd and adam decay every parameter; adamw (the transformer recipe) "
                                    "decays only the prunable weight matrices.", choices=lambda: OPTIMIZERS)
    lr: float = setting(0.2, "Peak learning rate of every cycle (the authors' triangular default).")
    momentum: float = setting(0.9, "SGD momentum.")
    weight_decay: float = setting(5e-4, "Weight decay (adamw: decoupled, e.g. 0.05).")
    nesterov: bool = setting(False, "Nesterov momentum (SGD).")
    batch_size: int = setting(512, "Training batch size.")
    eval_batch_size: int = setting(1024, "Batch size of the per-epoch evaluation.")
    schedule: str = setting("triangular", "LR schedule of each cycle.", choices=lambda: SCHEDULES)
    warmup_fraction: float = setting(0.2, "Warm-up share of each cycle (triangular: the ramp; step/cosine: a "
                                          "linear warm-up).")
    warmup_start: float = setting(0.2, "The warm-up starts at this fraction of --lr.")
    milestones: tuple[float, ...] = setting((0.5, 0.75), "step schedule: fractions of the cycle where the LR "
                                                         "drops, comma-separated.")
    gamma: float = setting(0.1, "step schedule: factor of each drop.")


@dataclass(frozen=True)
class PruneConfig:
    pruner: str = setting("random", "Prune-at-init criterion.", choices=_pruner_names)
    allocation: str | None = setting(None, "How many weights each layer keeps. [global for scored pruners, erk "
                                           "for random]", choices=lambda: ALLOCATIONS)
    sparsity: float = setting(0.0, "Target sparsity in [0, 1): 0.9 prunes 90 % of the prunable weights.")
    initial_sparsity: float = setting(0.5, "sculpt: prune-at-init sparsity before the cut.")
    prune_fraction: float = setting(0.2, "imp/lrr: fraction of the remaining weights pruned per cycle.")
    rewind_epoch: int = setting(10, "imp: epoch of cycle 0 whose weights later cycles rewind to (0 = init).")
    score_batches: int = setting(1, "snip/grasp: training batches scored.")
    synflow_rounds: int = setting(100, "synflow: pruning rounds (Tanaka et al. 2020).")
    grasp_temperature: float = setting(200.0, "grasp: softmax temperature of the scored loss.")
    mask_from: str | None = setting(None, "transfer: checkpoint whose mask is used.")
    weights_from: str | None = setting(None, "transfer: checkpoint whose weights are used, or 'random' (a fresh "
                                             "init). [random]")
    signs_from: str | None = setting(None, "transfer: checkpoint whose signs the prunable weights take.")
    update_every: int = setting(100, "gmp/rigl: steps between mask updates.")
    update_end: float = setting(0.75, "gmp/rigl: fraction of training after which the mask is fixed.")
    update_start: float = setting(0.0, "gmp: fraction of training when pruning starts.")
    rigl_fraction: float = setting(0.3, "rigl: initial drop/grow fraction (cosine-decayed).")


@dataclass(frozen=True)
class RunConfig:
    method: str = setting("dense", "Method: a cycle plan (see README).", choices=_method_names)
    cycles: int = setting(1, "Cycles of the LR schedule after the prune-at-init step (pai: one cycle of cycles x "
                             "epochs); imp/lrr take their pruning cycles from the sparsity.")
    epochs: int = setting(20, "Epochs per cycle.")
    seed: int = setting(0, "Seed of init, pruning and data order.")
    device: str = setting("cpu", "cpu, cuda, cuda:N. [cuda if available]")
    save_every: int = setting(0, "Also checkpoint every N epochs within cycles (0: never).")
    precision: str | None = setting(None, "Arithmetic of training and its evaluations: fp32, bf16 or fp16 (autocast; "
                                          "fp16 with a gradient scaler). Weights, masks and optimizer state stay "
                                          "fp32. [bf16 on CUDA devices that support it, else fp32]",
                                    choices=lambda: PRECISIONS)
    memory_format: str = setting("auto", "Memory format of 2-D convolutional models (checkpoints are always saved "
                                         "contiguous). [auto: channels-last on CUDA]", choices=lambda: MEMORY_FORMATS)
    compile: bool = setting(False, "torch.compile the model (the first steps and evaluations are slower while it "
                                   "compiles).")
    sync_bn: bool = setting(False, "Under torchrun, BatchNorm statistics over the whole global batch (SyncBatchNorm, "
                                   "CUDA only) instead of each process's part of it.")
    eval_every: int = setting(1, "Evaluate every N epochs; cycle starts and ends and every checkpoint are always "
                                 "evaluated.")
    eval_train_samples: int | None = setting(None, "Per-epoch train metrics on a fixed seeded subset of this many "
                                                   "training samples; the full set at cycle starts and ends and at "
                                                   "checkpoints. [all when the split holds at most 100,000, else "
                                                   "10,000]")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    run: RunConfig = field(default_factory=RunConfig)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        if not isinstance(raw, dict):
            raise UserError("config must be a table of sections (data, model, optim, prune, run)")
        raw = dict(raw)
        version = raw.pop("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise UserError(f"config schema version {version} is not supported (this is {SCHEMA_VERSION})")
        sections = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "schema_version"}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise UserError(f"unknown config section(s) {unknown}; expected {sorted(sections)}")
        built = {name: section(SECTIONS[name], raw.get(name, {}), name) for name in sections}
        return cls(**built)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"config is not valid JSON: {error}") from None
        return cls.from_dict(raw)

    def replace(self, section: str, **changes: Any) -> "Config":
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


# Config sections in the order --help lists their options.
SECTIONS = {"run": RunConfig, "model": ModelConfig, "data": DataConfig, "prune": PruneConfig, "optim": OptimConfig}


def section(cls: type, raw: Any, name: str) -> Any:
    """The dataclass `cls` (a config section) from a TOML/JSON table, every value type-checked:
    a wrong key or type is a UserError naming [name] and the key."""
    if not isinstance(raw, dict):
        raise UserError(f"config section [{name}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in config section [{name}]; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, given in raw.items():
        value = tuple(given) if isinstance(given, list) else given
        if not _has_type(value, hints[key]):
            raise UserError(f"[{name}] {key} must be {_type_name(hints[key])}, got {given!r}")
        values[key] = float(value) if hints[key] is float else value
    return cls(**values)


def _has_type(value: Any, hint: Any) -> bool:
    """Whether `value` (as TOML or JSON gives it) fits the field type `hint`; an int fits a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "absent"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is tuple:
        return "a list of numbers"
    return "a table" if origin is dict else names.get(hint, str(hint))


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML run file into the raw dict `Config.from_dict` takes."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"config file {path} is not valid TOML: {error}") from None
    except OSError as error:
        raise UserError(f"cannot read config file {path}: {error.strerror}") from None


def merge(raw: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Flags override the file: `overrides` is {section: {key: value}} of the flags given."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise UserError(f"config section [{section}] must be a table")
        merged[section].update(values)
    return merged


def check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _check_int64(config: Config) -> None:
    """Counts, steps and seeds are int64 in torch, numpy and every file: a larger integer is
    bad input, not a long job."""
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            value = getattr(getattr(config, name), f.name)
            check(type(value) is not int or -2**63 < value < 2**63,
                  f"{f.name.replace('_', '-')} must lie in (-2**63, 2**63), got {value}")


def check_data(data: DataConfig) -> None:
    """The checks of a data config, also applied to one read from a checkpoint."""
    check(0 <= data.seed < 2**63, "seeds must be integers in [0, 2**63)")
    check(0 <= data.num_workers <= 1024, f"num-workers must be in [0, 1024], got {data.num_workers}")


def resolve(config: Config) -> Config:
    """Fill method-dependent defaults and check every value; raise UserError on the first
    problem. The method checks the settings it reads (`Method.validate`)."""
    from . import methods, pruners

    run, prune, optim = config.run, config.prune, config.optim
    _check_int64(config)
    method = methods.get(run.method)
    pruners.get(prune.pruner)
    check(optim.schedule in SCHEDULES, f"unknown schedule {optim.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    check(optim.optimizer in OPTIMIZERS, f"unknown optimizer {optim.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    check(0.0 <= prune.sparsity < 1.0, f"sparsity must be in [0, 1), got {prune.sparsity}")
    check(run.epochs >= 1, f"epochs must be at least 1, got {run.epochs}")
    check(run.cycles >= 1, f"cycles must be at least 1, got {run.cycles}")
    check(0 < optim.lr < math.inf, f"lr must be a positive number, got {optim.lr}")
    check(0.0 <= optim.momentum < 1.0, f"momentum must be in [0, 1), got {optim.momentum}")
    check(0.0 <= optim.weight_decay < math.inf, f"weight-decay must be a number >= 0, got {optim.weight_decay}")
    check(0.0 <= optim.warmup_start <= 1.0, f"warmup-start must be in [0, 1], got {optim.warmup_start}")
    check(0.0 < optim.gamma < math.inf, f"gamma must be a positive number, got {optim.gamma}")
    check(all(0.0 < m < 1.0 for m in optim.milestones), f"milestones must lie in (0, 1), got {list(optim.milestones)}")
    check(0 <= run.seed < 2**63, "seeds must be integers in [0, 2**63)")
    check_data(config.data)
    check(optim.batch_size >= 1 and optim.eval_batch_size >= 1, "batch sizes must be at least 1")
    check(0.0 <= optim.warmup_fraction < 1.0, f"warmup-fraction must be in [0, 1), got {optim.warmup_fraction}")
    check(run.save_every >= 0, "save-every must be >= 0")
    check(run.eval_every >= 1, f"eval-every must be at least 1, got {run.eval_every}")
    check(run.eval_train_samples is None or run.eval_train_samples >= 1,
          f"eval-train-samples must be at least 1, got {run.eval_train_samples}")
    check(run.precision is None or run.precision in PRECISIONS,
          f"unknown precision {run.precision!r}; choose one of {', '.join(PRECISIONS)}")
    check(run.memory_format in MEMORY_FORMATS,
          f"unknown memory format {run.memory_format!r}; choose one of {', '.join(MEMORY_FORMATS)}")
    check(config.data.image_decoding in IMAGE_DECODERS,
          f"unknown image decoding {config.data.image_decoding!r}; choose one of {', '.join(IMAGE_DECODERS)}")
    allocation = prune.allocation or method.default_allocation(config)
    check(allocation in ALLOCATIONS, f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    check(run.cycles <= MAX_CYCLES, f"cycles must be at most {MAX_CYCLES}, got {run.cycles}")
    for other in methods.METHODS:
        given = [f"--{name.replace('_', '-')}" for name in other.own_settings if getattr(prune, name) is not None]
        check(other is method or not given,
              f"{', '.join(given)} belong(s) to method {other.name}; add --method {other.name} or drop them")
    method.validate(config)
    check(prune.synflow_rounds >= 1 and prune.score_batches >= 1, "synflow-rounds and score-batches must be >= 1")
    check(0.0 < prune.grasp_temperature < math.inf, f"grasp-temperature must be a positive number, got {prune.grasp_temperature}")
    if run.precision is None:
        from .acceleration import default_precision

        config = config.replace("run", precision=default_precision(run.device))
    return method.completed(config.replace("prune", allocation=allocation))
