"""`--align weights` in the analyses: a permuted copy of a network is aligned back to a path
with no barrier, two independently trained seeds (BatchNorm) have a lower barrier once
aligned, and surfaces through checkpoints of different runs store their permutations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from conftest import run_cli, train_tiny
from landscape.align import apply_permutations, permutation_spec
from sparse_training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory) -> tuple[Path, Path]:
    """Two dense resnet1d (width 16, BatchNorm) trained from seeds 0 and 1 on the same data."""
    root = tmp_path_factory.mktemp("seeds")
    return tuple(train_tiny(root / f"seed{seed}", "--method", "dense", "--model-kwargs", '{"width": 16}',
                            "--epochs", "10", "--batch-size", "32", "--seed", str(seed)) for seed in (0, 1))


def barrier_json(*args: str) -> dict:
    return json.loads(run_cli("barrier", *args, "--points", "5", "--bn-batches", "2", "--json").stdout)


def test_a_permuted_copy_is_aligned_back_to_a_flat_path(tiny_run, tmp_path):
    source = tiny_run / "checkpoints" / "cycle_002.pt"
    ckpt = load_checkpoint(source)
    model = ckpt.build_model()
    spec = permutation_spec(model, torch.randn(2, 40))
    generator = torch.Generator().manual_seed(3)
    perms = {group.name: torch.randperm(group.size, generator=generator) for group in spec.groups}
    payload = torch.load(source, weights_only=True)
    payload["state_dict"] = apply_permutations(payload["state_dict"], spec, perms)
    payload["masks"] = apply_permutations(payload["masks"], spec, perms)
    shuffled = tmp_path / "shuffled.pt"
    torch.save(payload, shuffled)

    plain = barrier_json(str(source), str(shuffled), "--out", str(tmp_path / "plain.nc"))
    aligned = barrier_json(str(source), str(shuffled), "--align", "weights", "--out", str(tmp_path / "aligned.nc"))
    plain_test = next(iter(plain["pairs"].values()))["splits"]["test"]
    aligned_test = next(iter(aligned["pairs"].values()))["splits"]["test"]
    assert plain_test["loss_barrier_linear"] > 0.01
    assert aligned_test["loss_barrier_linear"] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(aligned_test["loss"], aligned_test["loss"][0], rtol=1e-6)  # the same network throughout
    stored = xr.open_dataset(tmp_path / "aligned.nc")
    for group in spec.groups:  # the stored permutation undoes the test's
        offset = int(stored.group_offset.sel(group=group.name).item())
        found = stored.permutation.values[0, offset:offset + group.size]
        assert np.array_equal(perms[group.name].numpy()[found], np.arange(group.size))


def test_aligned_seeds_have_a_lower_barrier_and_the_same_endpoints(two_seeds, tmp_path):
    seed0, seed1 = (str(run) for run in two_seeds)
    common = ["--points", "5", "--bn-batches", "2", "--json"]
    plain = json.loads(run_cli("connectivity", seed0, seed1, *common, "--out", str(tmp_path / "p.nc")).stdout)
    aligned = json.loads(run_cli("connectivity", seed0, seed1, *common, "--align", "weights",
                                 "--out", str(tmp_path / "a.nc")).stdout)
    (label,) = plain["pairs"]
    for split in ("train", "test"):
        before, after = plain["pairs"][label]["splits"][split], aligned["pairs"][label]["splits"][split]
        assert after["loss_barrier_linear"] < before["loss_barrier_linear"]
        assert after["loss"][-1] == pytest.approx(before["loss"][-1], rel=1e-5)  # alignment keeps the network
        assert after["loss"][0] == before["loss"][0]
    again = json.loads(run_cli("connectivity", seed0, seed1, *common, "--align", "weights",
                               "--out", str(tmp_path / "a.nc")).stdout)
    assert again["reused"] == [label]
    refused = run_cli("connectivity", seed0, seed1, *common, "--out", str(tmp_path / "a.nc"), expect=2)
    assert "align" in refused.stderr  # the stored settings differ: said, not mixed


def test_surface_through_aligned_checkpoints_of_different_runs(two_seeds, tmp_path):
    seed0, seed1 = (str(run) for run in two_seeds)
    out = tmp_path / "plane.nc"
    result = json.loads(run_cli("surface", seed0, seed1, f"{seed1}@init", "--align", "weights", "--grid", "2",
                                "--samples", "32", "--bn-batches", "1", "--out", str(out), "--json").stdout)
    assert result["directions"] == "checkpoints" and len(result["checkpoints"]) == 3
    ds = xr.open_dataset(out)
    assert ds.permutation.dims == ("aligned", "unit") and ds.sizes["aligned"] == 2
    assert int(ds.group_size.values[0].sum()) == ds.sizes["unit"]
    missing = run_cli("surface", seed0, seed1, "--align", "weights", "--grid", "2", expect=2)
    assert "--out" in missing.stderr
