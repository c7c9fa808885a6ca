"""`landscape sharpness` as a user runs it, on the session's tiny pai-cyclic run (resnet1d
with BatchNorm, random mask at sparsity 0.5): dataset on disk, --json, skipping, lone and
plain checkpoint files, and one-line errors with the documented exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from landscape import store
from sparse_training.checkpoint import load_checkpoint, save_checkpoint
from sparse_training.io import torch_load_safe
from sparse_training.rundir import RunDir
from sparse_training.data import load_data
from sparse_training.masks import kept_count
from sparse_training.trainer import evaluate

FAST = ("--samples", "96", "--batch-size", "40", "--max-hvp", "30")


def landscape(*args, expect: int = 0):
    result = CliRunner().invoke(cli, ["sharpness", *[str(a) for a in args]], catch_exceptions=False)
    assert result.exit_code == expect, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def landscape_json(*args) -> dict:
    return json.loads(landscape(*args, "--json").stdout)


def one_line_error(*args, expect: int = 2) -> str:
    result = landscape(*args, expect=expect)
    assert result.stdout == "" and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private copy of the session's run, so that analyses written here stay here."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def test_run_dataset_json_and_ground_truth(run):
    result = landscape_json(run, "--top-k", "2", "--trace", "--trace-tol", "0.2", *FAST)
    labels = RunDir(run).checkpoint_labels()
    assert labels[0] == "init" and len(labels) == 4
    assert result["computed"] == labels and result["reused"] == []
    ds = store.read_dataset(run / "analysis" / "sharpness.nc")
    assert result["output"] == str(run / "analysis" / "sharpness.nc")
    assert ds.checkpoint.values.tolist() == labels and ds.eigenvalue.dims == ("checkpoint", "eig_index")
    assert ds.cycle.values.tolist() == [-1, 0, 1, 2]
    assert str(ds.run.values) == "run" and str(ds.method.values) == "pai-cyclic"
    assert int(ds.samples) == 96 and ds.subset_index.size == 96
    for name, var in ds.data_vars.items():
        assert {"long_name", "units", "description"} <= set(var.attrs), name
    data = load_data(load_checkpoint(RunDir(run).checkpoint("init")).data)
    subset = data.subset_indices("train", 96, 0)
    np.testing.assert_array_equal(ds.subset_index.values, subset.numpy())
    for label in labels:
        ckpt = load_checkpoint(RunDir(run).checkpoint(label))
        one, shown = ds.sel(checkpoint=label), result["checkpoints"][label]
        assert float(one.sparsity) == pytest.approx(ckpt.sparsity) and int(one.step) == ckpt.step
        # The loss whose Hessian this is, recomputed by the trainer's own evaluation.
        evaluated = evaluate(ckpt.build_model(), data, "train", 64, indices=subset)["loss"]
        assert float(one.loss) == pytest.approx(evaluated, rel=1e-5)
        # Masked subspace: kept weights plus every parameter without a mask (biases, BatchNorm).
        model = ckpt.build_model()
        unmasked = sum(p.numel() for n, p in model.named_parameters() if n not in ckpt.masks)
        assert int(one.subspace_dim) == kept_count(ckpt.masks) + unmasked
        values = one.eigenvalue.values
        assert values[0] >= values[1] > 0 and np.all(one.residual.values <= 1e-3 * np.abs(values))
        assert shown["eigenvalues"] == values.tolist() and shown["hvp_counts"] == one.hvp_count.values.tolist()
        assert 10 <= shown["trace_samples"] <= 30 and shown["trace"] > values[0]
        assert shown["trace_deflated"] == pytest.approx(values.sum())  # the top-2 Ritz pairs are projected out
    assert ds.sparsity.values[0] == 0.0 and ds.sparsity.values[-1] == pytest.approx(0.5, abs=0.01)


def test_second_call_skips_other_settings_refused_overwrite_recomputes(run):
    printed = landscape(run, "--checkpoints", "init,cycle_001", *FAST).stdout.splitlines()
    assert printed[0].split()[:5] == ["checkpoint", "cycle", "sparsity", "loss", "lambda_1"]
    assert [line.split()[0] for line in printed[1:3]] == ["init", "cycle_001"]
    assert printed[-1].startswith(f"written to {run / 'analysis' / 'sharpness.nc'}")
    again = landscape_json(run, *FAST)
    assert again["reused"] == ["init", "cycle_001"] and again["computed"] == ["cycle_000", "cycle_002"]
    assert sorted(again["checkpoints"]) == ["cycle_000", "cycle_001", "cycle_002", "init"]
    assert landscape_json(run, *FAST)["computed"] == []
    message = one_line_error(run, "--top-k", "2", *FAST)
    assert "other settings" in message and "--overwrite" in message
    replaced = landscape_json(run, "--top-k", "2", "--checkpoints", "cycle_002", "--overwrite", *FAST)
    assert replaced["computed"] == ["cycle_002"]
    ds = store.read_dataset(run / "analysis" / "sharpness.nc")
    assert ds.checkpoint.values.tolist() == ["cycle_002"] and ds.eig_index.size == 2
    assert store.settings_of(ds)["top_k"] == 2


def test_batch_size_does_not_change_the_result_and_seed_is_reproducible(run, tmp_path):
    a = landscape_json(run, "--checkpoints", "cycle_002", "--out", tmp_path / "a.nc", *FAST)
    b = landscape_json(run, "--checkpoints", "cycle_002", "--out", tmp_path / "b.nc", *FAST[:2], "--batch-size", "96")
    c = landscape_json(run, "--checkpoints", "cycle_002", "--out", tmp_path / "c.nc", *FAST)
    lam = [r["checkpoints"]["cycle_002"]["eigenvalues"][0] for r in (a, b, c)]
    assert lam[0] == lam[2] and lam[1] == pytest.approx(lam[0], rel=1e-4)


def test_backends_agree(run, tmp_path):
    values = {}
    for backend in ("lanczos", "power", "pyhessian"):
        out = landscape_json(run, "--checkpoints", "cycle_002", "--backend", backend, "--tol", "1e-4",
                             "--out", tmp_path / f"{backend}.nc", *FAST[:4], "--max-hvp", "300")
        values[backend] = out["checkpoints"]["cycle_002"]["eigenvalues"][0]
    assert values["power"] == pytest.approx(values["lanczos"], rel=2e-4)  # both within 1e-4 of the truth
    assert values["pyhessian"] == pytest.approx(values["lanczos"], rel=1e-2)


def test_density_and_full_subspace(run):
    result = landscape_json(run, "--checkpoints", "init,cycle_002", "--density", "--subspace", "full", *FAST)
    ds = store.read_dataset(result["output"])
    grid = ds.density_eigenvalue.values
    np.testing.assert_allclose(np.trapezoid(ds.density.values, grid, axis=1), 1.0, rtol=1e-3)
    assert grid.min() < float(ds.eigenvalue.min()) and grid.max() > float(ds.eigenvalue.max())
    full = int(ds.subspace_dim.sel(checkpoint="cycle_002"))
    assert full == sum(p.numel() for p in load_checkpoint(RunDir(run).checkpoint("cycle_002")).build_model().parameters())


def test_lone_checkpoint_and_plain_state_dict(run, tmp_path):
    ckpt = load_checkpoint(RunDir(run).checkpoint("cycle_002"))
    lone = tmp_path / "lone" / "best.pt"
    lone.parent.mkdir()
    shutil.copy(ckpt.path, lone)
    from_lone = landscape_json(lone, *FAST)
    assert from_lone["output"] == str(lone.with_name("best.sharpness.nc")) and lone.with_name("best.sharpness.nc").exists()
    ds = store.read_dataset(lone.with_name("best.sharpness.nc"))
    assert ds.checkpoint.values.tolist() == ["best"] and str(ds.run.values) == ""
    plain = tmp_path / "plain.pt"
    torch.save(ckpt.state_dict, plain)
    from_plain = landscape_json(plain, "--model", "resnet1d", "--model-kwargs", json.dumps(ckpt.model.kwargs),
                                "--data", "synthetic", *FAST)
    # The mask of a plain file is read from its exact zeros: the same subspace, the same eigenvalue.
    assert from_plain["checkpoints"]["plain"]["eigenvalues"] == from_lone["checkpoints"]["best"]["eigenvalues"]
    assert "--model" in one_line_error(plain, *FAST)


def test_bad_input_is_one_line_with_exit_code(run, tmp_path):
    assert "--samples 1000" in one_line_error(run, "--samples", "1000")
    assert "--top-k 100000" in one_line_error(run, "--checkpoints", "init", "--top-k", "100000", *FAST)
    assert "cycle_009" in one_line_error(run, "--checkpoints", "cycle_009")
    assert "--tol" in one_line_error(run, "--tol", "0")
    raw = torch_load_safe(RunDir(run).checkpoint("cycle_002"))
    # Finite weights whose logits overflow to inf: the loss is NaN.
    exploded = dict(raw, state_dict={k: (torch.full_like(v, 3e38) if k == "classifier.weight" else v)
                                     for k, v in raw["state_dict"].items()})
    save_checkpoint(tmp_path / "exploded.pt", exploded)
    assert "diverged" in one_line_error(tmp_path / "exploded.pt", *FAST)
    empty = dict(raw, masks={k: torch.zeros_like(m) for k, m in raw["masks"].items()})
    save_checkpoint(tmp_path / "empty.pt", empty)
    assert "keeps no prunable weight" in one_line_error(tmp_path / "empty.pt", *FAST)
    (run / "DONE").unlink()
    one_line_error(run, *FAST, expect=3)
    assert landscape_json(run, "--checkpoints", "init", "--allow-incomplete", *FAST)["computed"] == ["init"]
