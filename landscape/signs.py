"""Sign flips of kept weights between a reference checkpoint and a checkpoint.

Only prunable weights (the masks' entries) are compared, and only those kept in BOTH masks:
a weight pruned in either checkpoint never counts. Per layer:

- kept_both:   weights kept by both masks
- flipped:     of those, weights with strictly opposite signs (reference * checkpoint < 0)
- matched:     of those, weights with the same sign (reference * checkpoint > 0)
- zero_valued: of those, weights exactly zero in either checkpoint. Zero has no sign, so such a
               weight is neither flipped nor matched; kept weights are rarely exactly zero,
               but they can be (a weight that reached 0.0, a user's checkpoint).
- kept:        weights kept by the checkpoint's own mask

flip_fraction = flipped / kept_both; match_fraction = matched / kept, the fraction of the
checkpoint's mask whose sign matches the reference (a weight the reference pruned has no
sign there, so it does not match). Signs are compared with torch.sign, never through the
product of the values, which underflows to zero for tiny weights.

References of a run's cycle checkpoints: init, rewind, or previous, the checkpoint before
each cycle: cycle_000's previous is the rewind point when the run has one, else init."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from sparse_training.checkpoint import Checkpoint
from sparse_training.errors import UserError

from .inputs import (Input, LoadOptions, checkpoint_input, checkpoint_labels, common_run, loader, method_of, output,
                     run_dir)
from .overlap import require_same_layout, safe_ratio
from .results import AnalysisResult, merge_along, update_labels
from .settings import REFERENCES, SignsSettings
from .store import described, provenance, settings_json

ANALYSIS = "signs"
COUNTS = ("kept_both", "flipped", "matched", "zero_valued", "kept")


@dataclass(frozen=True)
class SignCounts:
    kept_both: int
    flipped: int
    matched: int
    zero_valued: int
    kept: int


@dataclass(frozen=True)
class SignPair:
    """One compared pair: labels, the checkpoint's cycle (-1 when none) and per-layer counts."""

    reference: str
    checkpoint: str
    cycle: int
    counts: dict[str, SignCounts]

    @property
    def label(self) -> str:
        return f"{self.reference}..{self.checkpoint}"


def sign_counts(reference_weights: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                reference_mask: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]) -> dict[str, SignCounts]:
    """Per-layer sign counts over the masks' layers (see the module docstring)."""
    require_same_layout(reference_mask, mask, "the reference", "the checkpoint")
    counts = {}
    for name, kept in mask.items():
        both = reference_mask[name] & kept
        product = torch.sign(reference_weights[name]) * torch.sign(weights[name])
        counts[name] = SignCounts(
            kept_both=int(both.sum()), flipped=int((both & (product < 0)).sum()), matched=int((both & (product > 0)).sum()),
            zero_valued=int((both & (product == 0)).sum()), kept=int(kept.sum()),
        )
    return counts


def reference_pairs(labels: list[str], reference: str, run_name: str) -> list[tuple[str, str]]:
    """(reference label, cycle label) for every cycle checkpoint among a run's `labels`
    (init, rewind, cycle_000, ... in order)."""
    if reference not in REFERENCES:
        raise UserError(f"unknown reference {reference!r}; use one of {', '.join(REFERENCES)}")
    cycles = [label for label in labels if label.startswith("cycle_")]
    if not cycles:
        raise UserError(f"run {run_name} has no cycle checkpoint yet; train at least one cycle")
    if reference == "rewind" and "rewind" not in labels:
        raise UserError(f"run {run_name} has no rewind point (checkpoints/rewind.pt; only weight-rewinding methods "
                        "such as imp save one); use --reference init or previous")
    start = "rewind" if "rewind" in labels else "init"
    if reference in ("init", "previous") and start not in labels:
        raise UserError(f"run {run_name} has no init checkpoint (checkpoints/init.pt); use --reference rewind if it has one")
    if reference == "previous":
        return list(zip([start] + cycles[:-1], cycles))
    return [(reference, label) for label in cycles]


_COUNT_TEXT = {
    "kept_both": "number of weights kept by both masks (only these are compared)",
    "flipped": "number of weights kept by both masks whose signs are strictly opposite",
    "matched": "number of weights kept by both masks with the same sign",
    "zero_valued": "number of weights kept by both masks that are exactly zero in either checkpoint "
                   "(no sign: neither flipped nor matched)",
    "kept": "number of weights kept by the checkpoint's mask",
}


def signs_dataset(pairs: list[SignPair], run: str = "", method: str = "") -> xr.Dataset:
    """Dims (pair, layer); layers are the masks' prunable weights, in the first pair's order."""
    layers = list(pairs[0].counts)
    counts = {c: np.array([[getattr(p.counts[layer], c) for layer in layers] for p in pairs], dtype=np.int64) for c in COUNTS}
    totals = {c: values.sum(axis=1) for c, values in counts.items()}
    variables = {}
    for suffix, source, dims in (("", counts, ("pair", "layer")), ("_total", totals, ("pair",))):
        where = " over all layers" if suffix else ""
        for c in COUNTS:
            variables[c + suffix] = described(source[c], dims, c.replace("_", " ") + where, "1", _COUNT_TEXT[c] + where)
        variables["flip_fraction" + suffix] = described(
            safe_ratio(source["flipped"], source["kept_both"]), dims, "sign-flip fraction" + where, "1",
            "flipped / kept_both: fraction of the weights kept by both masks whose sign differs from the reference; "
            "NaN when kept_both is 0")
        variables["match_fraction" + suffix] = described(
            safe_ratio(source["matched"], source["kept"]), dims, "sign-match fraction" + where, "1",
            "matched / kept: fraction of the checkpoint's kept weights whose sign matches the reference; "
            "NaN when kept is 0")
    coords = {
        "pair": [p.label for p in pairs], "layer": layers, "run": run, "method": method,
        "checkpoint": ("pair", [p.checkpoint for p in pairs]), "reference": ("pair", [p.reference for p in pairs]),
        "cycle": ("pair", np.array([p.cycle for p in pairs], dtype=np.int64)),
    }
    return xr.Dataset(variables, coords=coords)


def merge_signs(existing: xr.Dataset, new: xr.Dataset) -> xr.Dataset:
    """`existing` with the pairs of `new` added (replacing pairs of the same label). Both must
    cover the same layers; the scalar run/method coords are kept only where they agree."""
    if list(existing.layer.values) != list(new.layer.values):
        raise UserError("the existing sign-flip dataset covers other layers (another architecture); "
                        "pass --overwrite to replace it, or --out for another file")
    return merge_along(existing, new, "pair")


# ---------------------------------------------------------------- the analysis

Wanted = tuple[Path, Path, str, str]  # reference file, checkpoint file, their labels


def signs(
    inputs: Sequence[str | Path], settings: SignsSettings, *, out: str | Path | None = None, overwrite: bool = False,
    allow_incomplete: bool = False, options: LoadOptions = LoadOptions(),
) -> AnalysisResult:
    """Sign flips of one run's cycles against `settings.reference`, or between two checkpoints
    (the first one the reference), into `out`, by default RUN/analysis/signs.nc (beside the
    first file for files outside any run). Pairs already there are reused."""
    wanted, resolved = _wanted(inputs, settings, allow_incomplete)
    run, path = common_run(resolved), output(out, ANALYSIS, resolved)
    base, by_label = run.path if run is not None else path.parent, {f"{w[2]}..{w[3]}": w for w in wanted}
    run_name, method = run.name if run is not None else "", method_of(run)

    def prepare(todo: list[str]) -> Callable[[str], xr.Dataset]:
        load = loader(options)  # every pair is counted before anything is written: they are cheap
        return {label: _pair_dataset(load, by_label[label], run_name, method, base) for label in todo}.__getitem__

    def merge(ds: xr.Dataset | None, new: xr.Dataset) -> xr.Dataset:
        merged = new if ds is None else merge_signs(ds, new)
        merged.attrs["settings"] = settings_json({"pairs": [str(p) for p in merged.pair.values]})
        return merged

    return update_labels(path, ANALYSIS, list(by_label), prepare, merge, dim="pair", overwrite=overwrite)


def _wanted(inputs: Sequence[str | Path], settings: SignsSettings,
            allow_incomplete: bool) -> tuple[list[Wanted], list[Input]]:
    """The pairs to compare, and the inputs they come from."""
    if len(inputs) == 1:
        run = run_dir(inputs[0], allow_incomplete, "`landscape signs` takes one run, or two checkpoints (reference first)")
        pairs = reference_pairs(run.checkpoint_labels(), settings.reference or "init", str(run.path))
        wanted = [(run.checkpoint(r), run.checkpoint(c), r, c) for r, c in pairs]
        return wanted, [Input(run, w[1]) for w in wanted]
    if len(inputs) != 2:
        raise UserError(f"got {len(inputs)} inputs; pass one run directory, or two checkpoints (reference first)")
    if settings.reference is not None:
        raise UserError("--reference applies to one run; with two checkpoints the first one is the reference")
    resolved = [checkpoint_input(arg, allow_incomplete) for arg in inputs]
    labels = checkpoint_labels(resolved, inputs)
    return [(resolved[0].path, resolved[1].path, labels[0], labels[1])], resolved


def _pair_dataset(load: Callable[[Path], Checkpoint], wanted: Wanted, run: str, method: str, base: Path) -> xr.Dataset:
    """The (pair=1, layer) dataset of one compared pair, with its provenance."""
    reference_path, checkpoint_path, reference_label, checkpoint_label = wanted
    reference, ckpt = load(reference_path), load(checkpoint_path)
    require_same_layout(reference.state_dict, ckpt.state_dict, reference_label, checkpoint_label)
    counts = sign_counts(reference.state_dict, ckpt.state_dict, reference.masks, ckpt.masks)
    pair = SignPair(reference_label, checkpoint_label, -1 if ckpt.cycle is None else int(ckpt.cycle), counts)
    ds = signs_dataset([pair], run, method)
    ds.attrs = provenance(list(dict.fromkeys([reference_path, checkpoint_path])), {"pairs": [pair.label]}, base,
                          ANALYSIS)
    return ds
