"""Mask overlap: how similar two masks are, per layer and overall, against chance.

For masks A and B of one layer with n weights, densities p_a = |A| / n and p_b = |B| / n:

- intersection = |A and B| / n          chance p_a p_b
- jaccard      = |A and B| / |A or B|   chance p_a p_b / (p_a + p_b - p_a p_b)
- coverage     = |A and B| / |B|        chance p_a  (the share of B's weights that A keeps too)
- hamming      = |A xor B| / n          chance p_a + p_b - 2 p_a p_b

"Chance" is the level expected of two independent random masks with the same per-layer
densities (for Jaccard and coverage: the ratio of the expected counts, which the ratio of
counts approaches on layers of realistic size). The ratios observed / chance say how far the masks agree beyond what their
densities alone give. Totals over all layers pool the counts; the chance totals are
expectations with each layer's own densities, weighted by layer size: for example
chance_intersection_total = sum_l n_l p_a,l p_b,l / sum_l n_l, and chance_jaccard_total =
sum_l n_l p_a,l p_b,l / sum_l n_l (p_a,l + p_b,l - p_a,l p_b,l) (a ratio of expectations).
They are not the chance levels of the global densities: layer-wise allocations (ERK, ...)
make two masks agree more than the global densities suggest, and the chance totals account
for that. A fraction over an empty set (a layer both masks prune entirely) is NaN."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from sparse_training.errors import UserError

from .inputs import (Input, LoadOptions, checkpoint_input, checkpoint_labels, common_run, loader, method_of, output,
                     run_dir)
from .results import AnalysisResult, update_whole
from .settings import OverlapSettings
from .store import described, provenance

ANALYSIS = "overlap"
Mask = Mapping[str, torch.Tensor]


def require_same_layout(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], label_a: str, label_b: str) -> None:
    """Raise UserError unless `a` and `b` have the same entry names and shapes (same architecture)."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        name, holder = (only_a[0], label_a) if only_a else (only_b[0], label_b)
        raise UserError(f"{label_a} and {label_b} have different parameters ({name!r} only in {holder}); "
                        "compare checkpoints of the same architecture")
    for name in a:
        if tuple(a[name].shape) != tuple(b[name].shape):
            raise UserError(f"{label_a} and {label_b} differ in {name!r}: shape {tuple(a[name].shape)} vs "
                            f"{tuple(b[name].shape)}; compare checkpoints of the same architecture")


def overlap_counts(masks: list[Mask]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts for every ordered pair of masks (all with the layers of the first, in its order):
    size[layer], kept[mask, layer], both[a, b, layer] = |A and B|. Symmetric, so each
    unordered pair is counted once; |A xor B| = |A| + |B| - 2 |A and B| needs no second pass."""
    layers = list(masks[0])
    size = np.array([masks[0][name].numel() for name in layers], dtype=np.int64)
    kept = np.array([[int(m[name].sum()) for name in layers] for m in masks], dtype=np.int64)
    both = np.zeros((len(masks), len(masks), len(layers)), dtype=np.int64)
    for i, mask_i in enumerate(masks):
        both[i, i] = kept[i]
        for j in range(i + 1, len(masks)):
            both[i, j] = both[j, i] = [int((mask_i[name] & masks[j][name]).sum()) for name in layers]
    return size, kept, both


def safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is zero (an empty set)."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def overlap_measures(size: np.ndarray, kept: np.ndarray, both: np.ndarray) -> dict[str, np.ndarray]:
    """Observed and chance measures per layer from counts; arrays over (a, b, layer)."""
    kept_a, kept_b = kept[:, None, :], kept[None, :, :]
    differ = kept_a + kept_b - 2 * both
    union = kept_a + kept_b - both
    p_a, p_b = kept_a / size, kept_b / size
    chance_both = p_a * p_b
    measures = {
        "intersection": both / size, "jaccard": safe_ratio(both, union), "coverage": safe_ratio(both, kept_b),
        "hamming": differ / size, "density_a": np.broadcast_to(p_a, both.shape), "density_b": np.broadcast_to(p_b, both.shape),
        "chance_intersection": chance_both, "chance_jaccard": safe_ratio(chance_both, p_a + p_b - chance_both),
        "chance_coverage": np.broadcast_to(p_a, both.shape), "chance_hamming": p_a + p_b - 2 * chance_both,
    }
    return _with_ratios(measures)


def overlap_totals(size: np.ndarray, kept: np.ndarray, both: np.ndarray) -> dict[str, np.ndarray]:
    """The same measures over all layers, arrays over (a, b): observed counts pooled, chance
    levels as size-weighted expectations of the per-layer chance counts."""
    kept_a, kept_b = kept[:, None, :], kept[None, :, :]
    differ = kept_a + kept_b - 2 * both
    total = size.sum()
    chance_both = (kept_a * kept_b / size).sum(-1)  # sum_l n_l p_a,l p_b,l
    total_a, total_b = kept_a.sum(-1), kept_b.sum(-1)
    measures = {
        "intersection": both.sum(-1) / total, "jaccard": safe_ratio(both.sum(-1), (kept_a + kept_b - both).sum(-1)),
        "coverage": safe_ratio(both.sum(-1), total_b), "hamming": differ.sum(-1) / total,
        "density_a": np.broadcast_to(total_a / total, both.shape[:2]),
        "density_b": np.broadcast_to(total_b / total, both.shape[:2]),
        "chance_intersection": chance_both / total, "chance_jaccard": safe_ratio(chance_both, total_a + total_b - chance_both),
        "chance_coverage": safe_ratio(chance_both, total_b), "chance_hamming": (total_a + total_b - 2 * chance_both) / total,
    }
    return _with_ratios(measures)


def _with_ratios(measures: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for name in ("intersection", "jaccard", "coverage", "hamming"):
        measures[f"{name}_ratio"] = safe_ratio(measures[name], measures[f"chance_{name}"])
    return measures


_DESCRIPTIONS = {
    "intersection": ("mask intersection", "|A and B| / n: fraction of the weights kept by both masks"),
    "jaccard": ("Jaccard index", "|A and B| / |A or B|; NaN when both masks are empty"),
    "coverage": ("coverage of B by A", "|A and B| / |B|: fraction of B's kept weights that A keeps too; NaN when B is empty"),
    "hamming": ("Hamming fraction", "|A xor B| / n: fraction of weights kept by exactly one mask"),
    "density_a": ("density of A", "|A| / n: fraction of weights mask A keeps"),
    "density_b": ("density of B", "|B| / n: fraction of weights mask B keeps"),
    "chance_intersection": ("chance intersection", "p_a p_b: expected intersection of independent masks of the same densities"),
    "chance_jaccard": ("chance Jaccard index",
                       "p_a p_b / (p_a + p_b - p_a p_b): expected for independent masks of the same densities"),
    "chance_coverage": ("chance coverage", "p_a: expected coverage for independent masks of the same densities"),
    "chance_hamming": ("chance Hamming fraction", "p_a + p_b - 2 p_a p_b: expected for independent masks of the same densities"),
}
_TOTAL_NOTE = ("; over all layers: counts pooled, chance levels are the expected counts of independent masks with "
               "each layer's own densities, summed over layers (weighted by layer size)")


def _variable(name: str, values: np.ndarray, dims: tuple[str, ...], total: bool) -> xr.DataArray:
    if name.endswith("_ratio"):
        base = name[: -len("_ratio")]
        long_name = f"{_DESCRIPTIONS[base][0]} / chance"
        description = f"observed {base} divided by chance_{base}; NaN when either is undefined or chance is 0"
    else:
        long_name, description = _DESCRIPTIONS[name]
    return described(np.array(values, dtype=np.float64), dims, long_name + (" (all layers)" if total else ""), "1",
                     description + (_TOTAL_NOTE if total else ""))


def overlap_dataset(labels: list[str], masks: list[Mask]) -> xr.Dataset:
    """Pairwise overlap of `masks` (named by `labels`): dims (mask_a, mask_b, layer); the
    diagonal compares each mask with itself. Layers are the prunable weights of the first mask."""
    size, kept, both = overlap_counts(masks)
    layers = list(masks[0])
    per_layer = overlap_measures(size, kept, both)
    totals = overlap_totals(size, kept, both)
    variables = {name: _variable(name, values, ("mask_a", "mask_b", "layer"), False) for name, values in per_layer.items()}
    variables.update({f"{name}_total": _variable(name, values, ("mask_a", "mask_b"), True) for name, values in totals.items()})
    variables["layer_size"] = described(size, ("layer",), "layer size", "1", "n: number of weights in the layer")
    return xr.Dataset(variables, coords={"mask_a": list(labels), "mask_b": list(labels), "layer": layers})


# ---------------------------------------------------------------- the analysis

def overlap(inputs: Sequence[str | Path], settings: OverlapSettings, *, out: str | Path | None = None,
            overwrite: bool = False, allow_incomplete: bool = False, options: LoadOptions = LoadOptions(),
            log: Callable[[str], None] = lambda message: None) -> AnalysisResult:
    """Pairwise overlap of the masks of `inputs` (runs, RUN@LABEL, files), or of every cycle of
    one run with `settings.across_cycles`, into `out`, by default RUN/analysis/overlap.nc
    (beside the first file for files outside any run). Recomputed unless the file holds the
    same masks."""
    labels, resolved = _masks(inputs, settings, allow_incomplete)
    run, path = common_run(resolved), output(out, ANALYSIS, resolved)
    paths = [one.path for one in resolved]
    attrs = provenance(paths, {"masks": labels}, run.path if run is not None else path.parent, ANALYSIS)

    def compute() -> xr.Dataset:
        load, masks = loader(options), []
        for label, checkpoint_path in zip(labels, paths):
            ckpt = load(checkpoint_path)
            if masks:
                require_same_layout(masks[0], ckpt.masks, labels[0], label)
            if all(bool(m.all()) for m in ckpt.masks.values()):
                log(f"note: {label} has no pruned weights (dense): its mask is all ones")
            masks.append(ckpt.masks)
        return overlap_dataset(labels, masks).assign_coords(run=run.name if run is not None else "",
                                                            method=method_of(run))

    return update_whole(path, ANALYSIS, labels, compute, attrs, overwrite=overwrite, log=log)


def _masks(inputs: Sequence[str | Path], settings: OverlapSettings,
           allow_incomplete: bool) -> tuple[list[str], list[Input]]:
    """The masks' labels and the inputs they come from."""
    if not settings.across_cycles:
        if len(inputs) < 2:
            raise UserError("pass two or more runs or checkpoints (RUN, RUN@cycle_002, FILE.pt), or one run with "
                            "--across-cycles")
        resolved = [checkpoint_input(arg, allow_incomplete) for arg in inputs]
        return checkpoint_labels(resolved, inputs), resolved
    if len(inputs) != 1:
        raise UserError("--across-cycles takes exactly one run directory")
    run = run_dir(inputs[0], allow_incomplete, "--across-cycles takes one run directory")
    labels = run.cycle_labels()
    if len(labels) < 2:
        raise UserError(f"run {run.path} has {len(labels)} cycle checkpoint(s); --across-cycles needs two or more")
    return labels, [Input(run, run.checkpoint(label)) for label in labels]
