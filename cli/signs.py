"""`landscape signs`, `landscape overlap`, `landscape metrics`: sign flips of kept weights,
mask overlap against chance, and the runs' training curves as datasets.

A checkpoint is named as a file (`RUN/checkpoints/cycle_002.pt`, or a user's state_dict with
--model), a run directory (its final cycle checkpoint) or `RUN@LABEL` (`RUN@cycle_002`,
`RUN@rewind`). Results go to RUN/analysis/{signs,overlap,metrics}.nc when the inputs come
from one run, else to --out. Work already stored (same inputs, same settings) is not redone
unless --overwrite."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import click

from .output import allow_incomplete_option, emit, handle_errors, json_option, log, parse_model_kwargs, table


def plain_model_options(func: Callable) -> Callable:
    """Only the architecture: these analyses read weights and masks and never evaluate."""
    func = click.option("--model-kwargs", default=None, help="JSON object of model keyword arguments.")(func)
    return click.option("--model", "model_name", default=None,
                        help="Model name for plain state_dict files (their masks are their exact zeros).")(func)


def output_options(func: Callable) -> Callable:
    func = click.option("--overwrite", is_flag=True, help="Recompute even what the dataset already holds, and replace it.")(func)
    return click.option("--out", type=click.Path(dir_okay=False), default=None,
                        help="Dataset file to write. [RUN/analysis/NAME.nc when the inputs come from one run]")(func)


# ---------------------------------------------------------------- inputs

def _run_arg(arg: str, allow_incomplete: bool, what: str):
    from sparse_training.rundir import RunDir
    from sparse_training.errors import UserError

    if not Path(arg).is_dir():
        raise UserError(f"{arg} is not a run directory; {what}")
    run = RunDir(arg)
    run.require_done(allow_incomplete)
    return run


def _resolve(arg: str, allow_incomplete: bool):
    """(run or None, checkpoint path) for FILE, RUN (its final cycle) or RUN@LABEL."""
    from sparse_training.checkpoint import resolve_checkpoints
    from sparse_training.rundir import RunDir
    from sparse_training.errors import UserError

    path, label = Path(arg), None
    if not path.exists() and "@" in arg:
        head, label = arg.rsplit("@", 1)
        path = Path(head)
        if not path.is_dir():
            raise UserError(f"{head} is not a run directory; RUN@LABEL names a checkpoint of a run (e.g. runs/a@cycle_002)")
    if path.is_dir() and label is None:
        run = RunDir(path)
        run.require_done(allow_incomplete)
        cycles = run.cycle_labels()
        if not cycles:
            raise UserError(f"run {path} has no cycle checkpoint yet; train at least one cycle or name a checkpoint file")
        label = cycles[-1]
    run, paths = resolve_checkpoints(path, [label] if label else None, allow_incomplete)
    return run, paths[0]


def _common_run(resolved: list) -> Any:
    """The run every input belongs to, or None."""
    runs = {str(run.path.resolve()) if run is not None else None for run, _ in resolved}
    return resolved[0][0] if len(runs) == 1 and None not in runs else None


def _unique(candidates: list[str], typed: tuple[str, ...] | list[str]) -> list[str]:
    """`candidates` if they are distinct, else the arguments as typed; the same input twice is an error."""
    from sparse_training.errors import UserError

    for names in (candidates, list(typed)):
        if len(set(names)) == len(names):
            return names
    twice = next(name for name in typed if list(typed).count(name) > 1)
    raise UserError(f"{twice} is given twice; name each run or checkpoint once")


def _labels(resolved: list, typed: tuple[str, ...]) -> list[str]:
    """Checkpoint labels within one run; RUN_NAME/LABEL across runs."""
    one_run = _common_run(resolved) is not None
    return _unique([p.stem if one_run or run is None else f"{run.path.resolve().name}/{p.stem}" for run, p in resolved], typed)


def _loader(model_name: str | None, model_kwargs: str | None) -> Callable:
    """load(path) -> Checkpoint, remembering the last two (a reference is reused by the next pair)."""
    import functools

    from sparse_training.checkpoint import load_checkpoint

    kwargs = parse_model_kwargs(model_kwargs)
    return functools.lru_cache(maxsize=2)(lambda path: load_checkpoint(path, model=model_name, model_kwargs=kwargs))


def _output(out: str | None, run: Any, name: str) -> Path:
    from sparse_training.errors import UserError

    if out:
        return Path(out)
    if run is None:
        raise UserError(f"the inputs do not all come from one run; say where the {name} dataset goes with --out FILE.nc")
    return run.analysis_file(name)


def _method(run: Any) -> str:
    from sparse_training.records import read_config

    return read_config(run).run.method if run is not None else ""


def _existing(path: Path, analysis: str):
    """The dataset at `path`, which must be a dataset of `analysis`: anything else is replaced
    only with --overwrite."""
    from landscape.store import read_dataset
    from sparse_training.errors import UserError

    try:
        ds = read_dataset(path)
    except UserError as error:
        raise UserError(f"{error}; pass --overwrite to replace it, or another --out") from None
    if ds.attrs.get("analysis") != analysis:
        raise UserError(f"{path} is not a {analysis} dataset; pass --overwrite to replace it, or another --out")
    return ds


def _stored(path: Path, attrs: dict[str, str], overwrite: bool):
    """The dataset at `path` when it holds the same analysis of the same inputs and settings."""
    if overwrite or not path.exists():
        return None
    ds = _existing(path, attrs["analysis"])
    if all(ds.attrs.get(key) == attrs[key] for key in ("inputs", "settings")):
        return ds
    log(f"note: {path} was computed from other inputs or settings; replacing it")
    return None


def _number(value: Any) -> float | int | None:
    """A JSON-safe number: NaN (an undefined fraction) becomes null."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


# ---------------------------------------------------------------- signs

@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--reference", type=click.Choice(["init", "rewind", "previous"]), default=None,
              help="With one run: compare each cycle with init, the rewind point, or the checkpoint before it "
                   "(for cycle_000: rewind if the run has one, else init). [init]")
@output_options
@plain_model_options
@allow_incomplete_option
@json_option
@handle_errors
def signs(inputs, reference, out, overwrite, model_name, model_kwargs, allow_incomplete, as_json):
    """Sign flips of kept weights: RUN (every cycle against --reference), or REFERENCE CHECKPOINT.

    Only weights kept in both masks count; a weight exactly zero in either checkpoint has no
    sign (neither flipped nor matched). Pairs go to signs.nc (dims pair, layer), added to the
    pairs already there (--overwrite starts the file afresh).

    \b
    Examples:
      landscape signs runs/imp --reference rewind
      landscape signs runs/a@init runs/a@cycle_003
    """
    from landscape.signs import reference_pairs
    from sparse_training.errors import UserError

    if len(inputs) == 1:
        run = _run_arg(inputs[0], allow_incomplete, "`landscape signs` takes one run, or two checkpoints (reference first)")
        wanted = [(run.checkpoint(r), run.checkpoint(c), r, c)
                  for r, c in reference_pairs(run.checkpoint_labels(), reference or "init", str(run.path))]
    elif len(inputs) == 2:
        if reference is not None:
            raise UserError("--reference applies to one run; with two checkpoints the first one is the reference")
        resolved = [_resolve(arg, allow_incomplete) for arg in inputs]
        run, labels = _common_run(resolved), _labels(resolved, inputs)
        wanted = [(resolved[0][1], resolved[1][1], labels[0], labels[1])]
    else:
        raise UserError(f"got {len(inputs)} inputs; pass one run directory, or two checkpoints (reference first)")
    path = _output(out, run, "signs")
    result = _store_signs(path, run, wanted, overwrite, _loader(model_name, model_kwargs))
    rows = [[p["pair"], p["kept_both"], p["flipped"], p["flip_fraction"], p["match_fraction"]] for p in result["pairs"]]
    done = f"{len(result['computed'])} computed, {len(result['already_done'])} already there"
    emit(result, as_json, f"sign flips -> {path} ({done})\n"
                          + table(rows, ["pair", "kept_both", "flipped", "flip_fraction", "match_fraction"]))


def _store_signs(path: Path, run: Any, wanted: list, overwrite: bool, load: Callable) -> dict[str, Any]:
    """Compute the pairs not yet in the dataset at `path`, merge them in, and describe all `wanted`."""
    from landscape.overlap import require_same_layout
    from landscape.signs import SignPair, merge_signs, sign_counts, signs_dataset
    from landscape.store import locked, provenance, write_dataset

    base = run.path if run is not None else path.parent
    with locked(path):
        existing = _existing(path, "signs") if path.exists() and not overwrite else None
        stored = set(existing.pair.values) if existing is not None else set()
        labels = [f"{ref_label}..{ckpt_label}" for _, _, ref_label, ckpt_label in wanted]
        todo = [w for w, label in zip(wanted, labels) if label not in stored]
        if todo:
            pairs = []
            for ref_path, ckpt_path, ref_label, ckpt_label in todo:
                ref, ckpt = load(ref_path), load(ckpt_path)
                require_same_layout(ref.state_dict, ckpt.state_dict, ref_label, ckpt_label)
                counts = sign_counts(ref.state_dict, ckpt.state_dict, ref.masks, ckpt.masks)
                pairs.append(SignPair(ref_label, ckpt_label, -1 if ckpt.cycle is None else int(ckpt.cycle), counts))
            new = signs_dataset(pairs, run.path.resolve().name if run is not None else "", _method(run))
            ds = merge_signs(existing, new) if existing is not None else new
            earlier = [base / p for p in json.loads(existing.attrs["inputs"])] if existing is not None else []
            inputs = {Path(p).resolve(): Path(p) for p in earlier + [p for w in todo for p in w[:2]]}
            ds.attrs = provenance(list(inputs.values()), {"pairs": [str(p) for p in ds.pair.values]}, base, "signs")
            write_dataset(ds, path)
        else:
            ds = existing
    return {"output": str(path), "computed": [label for label in labels if label not in stored],
            "already_done": [label for label in labels if label in stored], "pairs": [_sign_row(ds, label) for label in labels]}


def _sign_row(ds: Any, label: str) -> dict[str, Any]:
    one = ds.sel(pair=label)
    row = {"pair": label, "checkpoint": str(one.checkpoint.values), "reference": str(one.reference.values),
           "cycle": int(one.cycle.values)}
    for name in ("kept_both", "flipped", "flip_fraction", "match_fraction"):
        row[name] = _number(one[f"{name}_total"].values)
    row["layers"] = {str(layer): {"kept_both": _number(one.kept_both.sel(layer=layer).values),
                                  "flip_fraction": _number(one.flip_fraction.sel(layer=layer).values)}
                     for layer in ds.layer.values}
    return row


# ---------------------------------------------------------------- overlap

@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--across-cycles", is_flag=True, help="One run: every cycle's mask against every other's.")
@output_options
@plain_model_options
@allow_incomplete_option
@json_option
@handle_errors
def overlap(inputs, across_cycles, out, overwrite, model_name, model_kwargs, allow_incomplete, as_json):
    """Pairwise mask overlap of RUN, RUN@LABEL or checkpoint files, against chance.

    Intersection, Jaccard, coverage |A and B|/|B| and Hamming fraction, per layer and over all
    layers, with the levels expected of independent masks with the same per-layer densities.
    A dense checkpoint's mask is all ones.

    \b
    Examples:
      landscape overlap runs/snip90 runs/lrr90 --out snip_vs_lrr.nc
      landscape overlap runs/lrr90 --across-cycles
    """
    from landscape.overlap import overlap_dataset, require_same_layout
    from landscape.store import provenance, write_dataset
    from sparse_training.errors import UserError

    if across_cycles:
        if len(inputs) != 1:
            raise UserError("--across-cycles takes exactly one run directory")
        run = _run_arg(inputs[0], allow_incomplete, "--across-cycles takes one run directory")
        labels = run.cycle_labels()
        if len(labels) < 2:
            raise UserError(f"run {run.path} has {len(labels)} cycle checkpoint(s); --across-cycles needs two or more")
        paths = [run.checkpoint(label) for label in labels]
    else:
        if len(inputs) < 2:
            raise UserError("pass two or more runs or checkpoints (RUN, RUN@cycle_002, FILE.pt), or one run with --across-cycles")
        resolved = [_resolve(arg, allow_incomplete) for arg in inputs]
        run, labels, paths = _common_run(resolved), _labels(resolved, inputs), [p for _, p in resolved]
    path = _output(out, run, "overlap")
    attrs = provenance(paths, {"masks": labels}, run.path if run is not None else path.parent, "overlap")
    ds = _stored(path, attrs, overwrite)
    already = ds is not None
    if not already:
        load, masks = _loader(model_name, model_kwargs), []
        for label, ckpt_path in zip(labels, paths):
            ckpt = load(ckpt_path)
            if masks:
                require_same_layout(masks[0], ckpt.masks, labels[0], label)
            if all(bool(m.all()) for m in ckpt.masks.values()):
                log(f"note: {label} has no pruned weights (dense): its mask is all ones")
            masks.append(ckpt.masks)
        ds = overlap_dataset(labels, masks).assign_coords(run=run.path.resolve().name if run is not None else "",
                                                          method=_method(run))
        ds.attrs = attrs
        write_dataset(ds, path)
    pairs = [_overlap_row(ds, a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
    result = {"output": str(path), "already_done": already, "masks": labels,
              "density": {label: _number(ds.density_a_total.sel(mask_a=label, mask_b=label).values) for label in labels},
              "pairs": pairs}
    columns = ["mask_a", "mask_b", "jaccard", "chance_jaccard", "jaccard_ratio", "intersection", "chance_intersection",
               "hamming", "coverage"]
    emit(result, as_json, f"mask overlap -> {path}{' (already there)' if already else ''}\n"
                          + table([[p[c] for c in columns] for p in pairs], columns))


def _overlap_row(ds: Any, a: str, b: str) -> dict[str, Any]:
    one = ds.sel(mask_a=a, mask_b=b)
    row = {"mask_a": a, "mask_b": b}
    for name in ("intersection", "jaccard", "coverage", "hamming"):
        for key in (name, f"chance_{name}", f"{name}_ratio"):
            row[key] = _number(one[f"{key}_total"].values)
    row["coverage_reverse"] = _number(ds.coverage_total.sel(mask_a=b, mask_b=a).values)
    return row


# ---------------------------------------------------------------- metrics

@click.command()
@click.argument("runs", nargs=-1, required=True)
@output_options
@allow_incomplete_option
@json_option
@handle_errors
def metrics(runs, out, overwrite, allow_incomplete, as_json):
    """Runs' metrics.csv as one dataset: dims (run, cycle, epoch, split, metric).

    With one run it goes to RUN/analysis/metrics.nc; several runs need --out FILE.nc.

    \b
    Example:
      landscape metrics runs/imp runs/lrr --out curves.nc
    """
    from landscape.dynamics import metrics_dataset, metrics_fingerprint
    from landscape.store import provenance, write_dataset
    from sparse_training.errors import UserError

    dirs = [_run_arg(arg, allow_incomplete, "`landscape metrics` takes run directories") for arg in runs]
    if out is None and len(dirs) > 1:
        raise UserError("several runs go to one dataset outside any run; say where with --out FILE.nc")
    path = _output(out, dirs[0], "metrics")
    names = _unique([d.path.resolve().name for d in dirs], runs)
    settings = {"runs": names, "metrics_sha256": [metrics_fingerprint(d) for d in dirs]}
    base = dirs[0].path if len(dirs) == 1 and out is None else path.parent
    attrs = provenance([d.metrics for d in dirs], settings, base, "metrics")
    ds = _stored(path, attrs, overwrite)
    already = ds is not None
    if not already:
        ds = metrics_dataset(dirs, names)
        ds.attrs = attrs
        write_dataset(ds, path)
    rows = _final_rows(ds)
    result = {"output": str(path), "already_done": already, "runs": names, "cycles": rows}
    columns = ["run", "cycle", "sparsity", "epochs", "train_loss", "test_accuracy"]
    emit(result, as_json, f"metrics -> {path}{' (already there)' if already else ''}\n"
                          + table([[r.get(c, "") for c in columns] for r in rows], columns))


def _final_rows(ds: Any) -> list[dict[str, Any]]:
    """Per run and cycle: the sparsity and the metrics at the cycle's last recorded epoch."""
    import numpy as np

    rows = []
    for run in ds.run.values:
        for cycle in ds.cycle.values:
            steps = ds.step.sel(run=run, cycle=cycle).values
            if not (steps >= 0).any():
                continue
            last = int(ds.epoch.values[np.flatnonzero(steps >= 0)[-1]])
            at = ds.value.sel(run=run, cycle=cycle, epoch=last)
            row = {"run": str(run), "cycle": int(cycle), "sparsity": _number(ds.sparsity.sel(run=run, cycle=cycle).values),
                   "epochs": last}
            for split in ds.split.values:
                for metric in ds.metric.values:
                    row[f"{split}_{metric}"] = _number(at.sel(split=split, metric=metric).values)
            rows.append(row)
    return rows
