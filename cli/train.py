"""`landscape train`: flags (or a TOML file, which flags override) -> a run directory."""

from __future__ import annotations

import json
import sys

import click

from .output import emit, handle_errors, json_option, log, progress_enabled

# flag -> (config section, key, click type, help). Every default lives in sparse_training/config.py.
TRAIN_OPTIONS = [
    ("--method", "run", "method", click.Choice(["dense", "pai", "pai-cyclic", "imp", "lrr", "sculpt", "transfer", "gmp", "rigl"]), "Method (a cycle plan, see README). [dense]"),
    ("--cycles", "run", "cycles", int, "Cycles of the LR schedule (pai: total = cycles x epochs in one cycle). [1]"),
    ("--epochs", "run", "epochs", int, "Epochs per cycle. [20]"),
    ("--seed", "run", "seed", int, "Seed of init, pruning and data order. [0]"),
    ("--save-every", "run", "save_every", int, "Also checkpoint every N epochs within cycles. [0: never]"),
    ("--model", "model", "name", str, "mlp, cnn1d, resnet1d, resnet20/32/56, resnet18/50, vgg16, tv:NAME, module.path:factory. [cnn1d]"),
    ("--data", "data", "name", str, "mnist1d, cifar10, cifar100, mnist, fashion-mnist, imagefolder:PATH, npz:PATH, synthetic. [mnist1d]"),
    ("--data-dir", "data", "data_dir", str, "Where torchvision data sets (and the mnist1d cache) live."),
    ("--download/--no-download", "data", "download", bool, "Let torchvision download the data set into --data-dir. [no]"),
    ("--data-seed", "data", "seed", int, "Generation seed of mnist1d / synthetic data. [42]"),
    ("--augment/--no-augment", "data", "augment", bool, "Standard training augmentation (CIFAR: crop + flip). [yes]"),
    ("--pruner", "prune", "pruner", str, "Prune-at-init criterion: random, magnitude, snip, synflow, grasp. [random]"),
    ("--allocation", "prune", "allocation", str, "global, uniform, erk, er-balanced. [global; erk for random]"),
    ("--sparsity", "prune", "sparsity", float, "Target sparsity in [0, 1). [0]"),
    ("--initial-sparsity", "prune", "initial_sparsity", float, "sculpt: prune-at-init sparsity before the cut. [0.5]"),
    ("--prune-fraction", "prune", "prune_fraction", float, "imp/lrr: fraction of remaining weights pruned per cycle. [0.2]"),
    ("--rewind-epoch", "prune", "rewind_epoch", int, "imp: epoch of cycle 0 to rewind to (0 = init). [10]"),
    ("--score-batches", "prune", "score_batches", int, "snip/grasp: training batches scored. [1]"),
    ("--synflow-rounds", "prune", "synflow_rounds", int, "synflow: pruning rounds. [100]"),
    ("--mask-from", "prune", "mask_from", str, "transfer: checkpoint whose mask is used."),
    ("--weights-from", "prune", "weights_from", str, "transfer: checkpoint whose weights are used, or 'random' (a fresh init). [random]"),
    ("--signs-from", "prune", "signs_from", str, "transfer: checkpoint whose signs the prunable weights take."),
    ("--update-every", "prune", "update_every", int, "gmp/rigl: steps between mask updates. [100]"),
    ("--update-start", "prune", "update_start", float, "gmp: fraction of training when pruning starts. [0]"),
    ("--update-end", "prune", "update_end", float, "gmp/rigl: fraction of training after which the mask is fixed. [0.75]"),
    ("--rigl-fraction", "prune", "rigl_fraction", float, "rigl: initial drop/grow fraction (cosine-decayed). [0.3]"),
    ("--optimizer", "optim", "optimizer", click.Choice(["sgd", "adam", "adamw"]), "[sgd]"),
    ("--lr", "optim", "lr", float, "Peak learning rate of every cycle. [0.2]"),
    ("--momentum", "optim", "momentum", float, "[0.9]"),
    ("--weight-decay", "optim", "weight_decay", float, "[5e-4]"),
    ("--batch-size", "optim", "batch_size", int, "[512]"),
    ("--schedule", "optim", "schedule", click.Choice(["triangular", "step", "cosine", "constant"]), "LR schedule of each cycle. [triangular]"),
    ("--warmup-fraction", "optim", "warmup_fraction", float, "Warm-up share of each cycle. [0.2]"),
]


def train_options(func):
    for flag, section, key, kind, help_text in reversed(TRAIN_OPTIONS):
        extra = {} if kind is bool else {"type": kind}
        func = click.option(flag, f"{section}__{key}", default=None, help=help_text, **extra)(func)
    return func


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory to create.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this directory (its config.json is used).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file with [data] [model] [optim] [prune] [run] tables; flags override it.")
@click.option("--model-kwargs", default=None, help='JSON object of model keyword arguments, e.g. \'{"width": 2}\'.')
@click.option("--device", default=None, help="cpu, cuda, cuda:N. [cuda if available]")
@train_options
@json_option
@handle_errors
def train(out, resume_dir, config_file, model_kwargs, device, as_json, **flags):
    """Train a network by one of the methods into a run directory.

    \b
    Example:
      landscape train --method pai-cyclic --pruner snip --sparsity 0.9 --cycles 4 \\
          --epochs 20 --model resnet1d --data mnist1d --out runs/snip90
    """
    from sparse_training.config import Config, load_toml, merge
    from sparse_training.errors import UserError
    from sparse_training.procedures import StopFlag, stop_on_signals, train_run

    from .output import parse_model_kwargs, resolve_device

    if (out is None) == (resume_dir is None):
        raise UserError("give exactly one of --out RUN (a new run) or --resume RUN (continue one)")
    given = {k: v for k, v in flags.items() if v is not None}
    if resume_dir and (given or config_file or model_kwargs):
        raise UserError("--resume takes the run's own config.json; drop the other training options")
    overrides: dict[str, dict] = {}
    for _flag, section, key, _kind, _help in TRAIN_OPTIONS:
        if f"{section}__{key}" in given:
            overrides.setdefault(section, {})[key] = given[f"{section}__{key}"]
    kwargs = parse_model_kwargs(model_kwargs)
    if kwargs is not None:
        overrides.setdefault("model", {})["kwargs"] = kwargs
    device = resolve_device(device)
    overrides.setdefault("run", {})["device"] = device
    raw = merge(load_toml(config_file) if config_file else {}, overrides)
    config = Config.from_dict(raw)
    with stop_on_signals(StopFlag()) as stop:
        result = train_run(config, resume_dir or out, resume=bool(resume_dir), command=" ".join(["landscape"] + sys.argv[1:]),
                           log=log, progress_factory=_progress_bar if progress_enabled() else None, stop=stop)
    emit(result, as_json, _summary(result))


def _progress_bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)


def _summary(result: dict) -> str:
    if "test_accuracy" not in result:
        return f"{result['run']}: {result['status']}"
    return (f"{result['run']}: {result['status']}; {result['cycles']} cycle(s), sparsity {result['sparsity']:.4f}, "
            f"test accuracy {result['test_accuracy']:.4f}, test loss {result['test_loss']:.4f}\n"
            f"training FLOPs: {_flops(result.get('training_flops'))}\n"
            f"final checkpoint: {result['final_checkpoint']}")


def _flops(value: int | None) -> str:
    return "not recorded" if value is None else f"{value:.4g} (multiply-adds of all training steps)"
