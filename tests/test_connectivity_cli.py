"""`landscape barrier`, `landscape connectivity` and `landscape info` as a user runs them:
datasets on disk, --json output, reuse of computed pairs, exit codes for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from cli.main import cli
from landscape import store
from landscape.connectivity import LoadOptions, checkpoint_pair, compute_pairs
from landscape.interpolate import PathSettings
from sparse_training.checkpoint import checkpoint_payload, save_checkpoint
from sparse_training.io import write_json_atomic
from sparse_training.rundir import RunDir
from sparse_training.config import Config, DataConfig
from sparse_training.data import load_data
from sparse_training.masks import ones_mask
from sparse_training.models import build_model, model_config_for
from sparse_training.trainer import evaluate

EVAL_BATCH = 100  # not the default 1024: endpoints must reproduce metrics recorded with the run's own batch size


def landscape(*args: str, expect: int = 0):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def landscape_json(*args: str) -> dict:
    return json.loads(landscape(*args, "--json").stdout)


def make_run(path: Path, seed: int, cycles: int = 3, width: int = 8, done: bool = True, model: str = "resnet1d") -> Path:
    """A small run written as training writes one: config.json, one checkpoint per cycle
    (a few SGD steps each) with the metrics evaluated at that point, DONE."""
    data_config = DataConfig(name="synthetic")
    data = load_data(data_config)
    model_config = model_config_for(model, {"width": width} if model == "resnet1d" else {}, data.num_classes,
                                    data.input_shape)
    config = Config(data=data_config, model=model_config)
    config = config.replace("run", method="pai-cyclic", cycles=cycles, epochs=1, seed=seed)
    config = config.replace("optim", eval_batch_size=EVAL_BATCH).replace("prune", sparsity=0.5)
    run = RunDir(path)
    path.mkdir(parents=True)
    write_json_atomic(run.config, config.to_dict())
    torch.manual_seed(seed)
    net = build_model(model_config)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for cycle in range(cycles):
        net.train()
        for x, y in data.train_batches(64, seed, cycle):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
        metrics = {f"{split}_{k}": v for split in ("train", "test") for k, v in evaluate(net, data, split, EVAL_BATCH).items()}
        save_checkpoint(run.checkpoint(f"cycle_{cycle:03d}"), checkpoint_payload(
            model=net, masks=ones_mask(net), model_config=model_config, data_config=data_config,
            label=f"cycle_{cycle:03d}", cycle=cycle, epoch=1, step=4 * (cycle + 1), sparsity=0.0, method="pai-cyclic",
            metrics=metrics, config=config.to_dict()))
    if done:
        run.done.write_text("")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("made")
    return {"a": make_run(root / "run_a", seed=0), "b": make_run(root / "run_b", seed=1),
            "mlp": make_run(root / "run_mlp", seed=0, cycles=1, model="mlp"),
            "narrow": make_run(root / "run_narrow", seed=0, cycles=1, width=4)}


@pytest.fixture
def run_a(runs, tmp_path) -> Path:
    """A private copy: tests write into its analysis/."""
    return Path(shutil.copytree(runs["a"], tmp_path / "run_a"))


def ckpt(run: Path, label: str) -> Path:
    return RunDir(run).checkpoint(label)


FAST = ("--points", "3", "--bn-batches", "2")


def test_barrier_writes_a_described_dataset_that_round_trips(run_a):
    result = landscape_json("barrier", ckpt(run_a, "cycle_001"), ckpt(run_a, "cycle_002"), *FAST)
    path = run_a / "analysis" / "barrier_cycle_001__cycle_002.nc"
    assert result["output"] == str(path) and result["computed"] == ["cycle_001..cycle_002"]
    assert result["bn_mode"] == "recompute" and result["alpha"] == [0.0, 0.5, 1.0]
    test = result["pairs"]["cycle_001..cycle_002"]["splits"]["test"]
    assert test["error_barrier"] >= 0 and test["error_barrier_linear"] >= 0 and len(test["error"]) == 3

    ds = store.read_dataset(path)
    assert dict(ds.sizes) == {"pair": 1, "split": 2, "alpha": 3, "endpoint": 2}
    assert list(ds.split.values) == ["train", "test"] and list(ds.endpoint.values) == ["a", "b"]
    assert ds.checkpoint_a.item() == "cycle_001" and int(ds.cycle_b.item()) == 2
    assert ds.run.item() == "run_a" and ds.method.item() == "pai-cyclic" and ds.attrs["bn_mode"] == "recompute"
    assert store.settings_of(ds)["bn"] == "recompute" and json.loads(ds.attrs["inputs"]) == [
        "checkpoints/cycle_001.pt", "checkpoints/cycle_002.pt"]
    for name in ("error", "loss", "error_barrier", "error_barrier_linear", "error_barrier_alpha", "loss_barrier",
                 "loss_barrier_linear", "loss_barrier_alpha", "endpoint_error_gap"):
        assert {"long_name", "units", "description"} <= set(ds[name].attrs), name
    assert ds.error.dims == ("pair", "split", "alpha")
    assert ds.endpoint_error_gap.dims == ("pair", "split", "endpoint")
    assert float(ds.error_barrier.sel(split="test").item()) == pytest.approx(test["error_barrier"])
    with xr.open_dataset(path) as plain:
        xr.testing.assert_identical(plain.load(), ds)


def test_dataset_in_memory_is_identical_to_the_file(run_a):
    pair = checkpoint_pair(ckpt(run_a, "cycle_000"), ckpt(run_a, "cycle_001"))
    out = run_a / "analysis" / "x.nc"
    outcome = compute_pairs([pair], PathSettings(points=3, bn_batches=1, batch_size=EVAL_BATCH), out,
                            options=LoadOptions())
    xr.testing.assert_identical(outcome.dataset, store.read_dataset(out))


def test_bn_none_endpoints_reproduce_recorded_metrics_and_recompute_reports_the_gap(run_a):
    a, b = ckpt(run_a, "cycle_000"), ckpt(run_a, "cycle_002")
    none = landscape_json("barrier", a, b, "--points", "3", "--bn", "none", "--out", run_a / "none.nc")
    assert none["bn_mode"] == "interpolate"
    ds = store.read_dataset(run_a / "none.nc")
    np.testing.assert_array_equal(ds.endpoint_error_gap.values, 0.0)
    np.testing.assert_array_equal(ds.endpoint_loss_gap.values, 0.0)
    assert store.settings_of(ds)["bn"] == "interpolate" and ds.attrs["bn_mode"] == "interpolate"

    landscape_json("barrier", a, b, "--points", "3", "--out", run_a / "recompute.nc")
    recomputed = store.read_dataset(run_a / "recompute.nc")
    assert np.isfinite(recomputed.endpoint_loss_gap.values).all()
    assert (recomputed.endpoint_loss_gap.values != 0).any()
    assert recomputed.bn_batches_used.item() > 0
    # Both modes evaluate the same endpoint weights; only the statistics differ.
    assert (recomputed.loss.values[..., 1] != ds.loss.values[..., 1]).all()


def test_already_computed_pairs_are_reused_unless_overwrite(run_a):
    args = ("barrier", ckpt(run_a, "cycle_000"), ckpt(run_a, "cycle_001"), *FAST)
    first = landscape_json(*args)
    path = Path(first["output"])
    stamp = path.stat().st_mtime_ns
    second = landscape_json(*args)
    assert second["computed"] == [] and second["reused"] == ["cycle_000..cycle_001"]
    assert second["pairs"] == first["pairs"] and path.stat().st_mtime_ns == stamp
    third = landscape_json(*args, "--overwrite")
    assert third["computed"] == ["cycle_000..cycle_001"] and third["pairs"] == first["pairs"]

    changed = landscape("barrier", *args[1:3], "--points", "5", expect=2)
    assert "other settings" in changed.stderr and "--overwrite" in changed.stderr
    assert store.read_dataset(path).sizes["alpha"] == 3


def test_connectivity_of_a_run_computes_only_missing_pairs(run_a):
    full = landscape_json("connectivity", run_a, *FAST)
    path = run_a / "analysis" / "connectivity.nc"
    labels = ["cycle_000..cycle_001", "cycle_001..cycle_002"]
    assert full["output"] == str(path) and full["computed"] == labels
    ds = store.read_dataset(path)
    assert list(ds.pair.values) == labels and list(ds.cycle_a.values) == [0, 1]

    store.write_dataset(ds.isel(pair=[1]), path)  # as if the run had been analysed before its last cycle
    again = landscape_json("connectivity", run_a, *FAST)
    assert again["computed"] == ["cycle_000..cycle_001"] and again["reused"] == ["cycle_001..cycle_002"]
    merged = store.read_dataset(path)
    assert list(merged.pair.values) == labels
    xr.testing.assert_allclose(merged.drop_attrs(), ds.drop_attrs(), rtol=0, atol=0)

    summary = landscape("connectivity", run_a, *FAST).stdout
    assert "cycle_000..cycle_001" in summary and "connectivity.nc" in summary


def test_connectivity_along_an_explicit_checkpoint_sequence(run_a):
    """--checkpoints a,c: the pair a..c, with the numbers `barrier` gives for those two files."""
    result = landscape_json("connectivity", run_a, "--checkpoints", "cycle_000,cycle_002", *FAST)
    assert result["computed"] == ["cycle_000..cycle_002"]
    pair = result["pairs"]["cycle_000..cycle_002"]["splits"]["test"]
    direct = landscape_json("barrier", ckpt(run_a, "cycle_000"), ckpt(run_a, "cycle_002"), *FAST,
                            "--out", run_a / "direct.nc")
    oracle = direct["pairs"]["cycle_000..cycle_002"]["splits"]["test"]
    assert pair["error"] == oracle["error"] and pair["loss"] == oracle["loss"]
    assert pair["error_barrier_linear"] == oracle["error_barrier_linear"]
    summary = landscape("connectivity", run_a, "--checkpoints", "cycle_000,cycle_002", *FAST).stdout
    header = summary.splitlines()[0]
    assert header.index("error barrier (linear)") < header.index("error (midpoint)")
    assert "Entezari" in summary and "Frankle" in summary


@pytest.mark.parametrize("labels,message", [
    ("cycle_001", "at least two"), ("cycle_000,cycle_000", "twice"), ("cycle_000,cycle_007", "no checkpoint cycle_007"),
    ("cycle_000,../x", "label"),
])
def test_bad_checkpoint_sequences_are_one_line_exit_2(run_a, labels, message):
    result = landscape("connectivity", run_a, "--checkpoints", labels, *FAST, expect=2)
    assert one_line_error(result) and message in result.stderr
    assert not (run_a / "analysis").exists()


def test_a_file_written_before_the_gap_flag_gains_it_when_a_pair_is_added(run_a):
    landscape("connectivity", run_a, "--checkpoints", "cycle_000,cycle_001", *FAST)
    path = run_a / "analysis" / "connectivity.nc"
    old = store.read_dataset(path).drop_vars(["error_barrier_gap_dominated", "error_endpoint_difference"])
    store.write_dataset(old, path)
    landscape("connectivity", run_a, *FAST)  # adds cycle_001..cycle_002, reuses cycle_000..cycle_001
    ds = store.read_dataset(path)
    expected = (abs(ds.error.isel(alpha=-1) - ds.error.isel(alpha=0)) > ds.error_barrier).astype(int)
    np.testing.assert_array_equal(ds.error_barrier_gap_dominated.values, expected.values)


def test_connectivity_of_two_runs_pairs_matching_cycles(runs, run_a):
    result = landscape_json("connectivity", run_a, runs["b"], "--points", "2", "--split", "test", "--bn-batches", "1")
    labels = [f"run_a/cycle_00{i}..run_b/cycle_00{i}" for i in range(3)]
    assert result["computed"] == labels
    ds = store.read_dataset(run_a / "analysis" / "connectivity_run_b.nc")
    assert list(ds.split.values) == ["test"] and list(ds.run_b.values) == ["run_b"] * 3
    assert ds.run.item() == "" and ds.method.item() == "pai-cyclic"
    assert (ds.checkpoint_a.values == ds.checkpoint_b.values).all()


def test_incomplete_run_exits_3_unless_allowed(runs, tmp_path):
    run = Path(shutil.copytree(runs["a"], tmp_path / "unfinished"))
    RunDir(run).done.unlink()
    result = landscape("connectivity", run, *FAST, expect=3)
    assert result.stderr.startswith("error:") and "--allow-incomplete" in result.stderr
    assert not (run / "analysis").exists()
    landscape("connectivity", run, *FAST, "--allow-incomplete", "--split", "test")
    assert (run / "analysis" / "connectivity.nc").is_file()


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def test_bad_input_is_one_line_with_exit_2_and_writes_nothing(runs, run_a, tmp_path):
    good = ckpt(run_a, "cycle_000")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt(run_a, "cycle_001").read_bytes()[:2000])
    cases = {
        "resnet1d": ckpt(runs["mlp"], "cycle_000"),  # another architecture
        "width": ckpt(runs["narrow"], "cycle_000"),  # same architecture, other parameter shapes
        "not a readable checkpoint": text,
        "truncated": truncated,
        "does not exist": tmp_path / "missing.pt",
    }
    for expected, other in cases.items():
        line = one_line_error(landscape("barrier", good, other, *FAST, expect=2))
        assert expected in line or "not a readable checkpoint" in line, line
    assert "at least 2" in one_line_error(landscape("barrier", good, ckpt(run_a, "cycle_001"), "--points", "1", expect=2))
    assert "--split" in one_line_error(landscape("barrier", good, good, "--split", "val", expect=2))
    assert "directory" in one_line_error(landscape("barrier", run_a, good, expect=2))
    assert "not a run directory" in one_line_error(landscape("connectivity", tmp_path / "nowhere", expect=2))
    assert not (run_a / "analysis").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.pt", "run_a", "truncated.pt"]


def test_plain_state_dicts_with_model_and_data(tmp_path):
    data = load_data(DataConfig(name="synthetic"))
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = build_model(model_config_for("mlp", {"hidden_size": 16}, data.num_classes, data.input_shape))
        paths.append(tmp_path / f"mine_{seed}.pt")
        torch.save(net.state_dict(), paths[-1])
    missing = landscape("barrier", *paths, *FAST, expect=2)
    assert "--model" in one_line_error(missing)
    options = ("--model", "mlp", "--model-kwargs", '{"hidden_size": 16}', "--data", "synthetic")
    result = landscape_json("barrier", *paths, *FAST, *options)
    assert result["output"] == str(tmp_path / "mine_0__mine_1.barrier.nc")
    gaps = result["pairs"]["mine_0..mine_1"]["splits"]["test"]["endpoint_error_gap"]
    assert gaps == {"a": None, "b": None}  # a plain state_dict records no metrics
    ds = store.read_dataset(result["output"])
    assert np.isnan(ds.endpoint_error_gap.values).all() and int(ds.cycle_a.item()) == -1 and ds.run.item() == ""
    info = landscape_json("info", paths[0], *options)
    assert info["plain"] and info["model"]["name"] == "mlp" and info["kept_weights"] == info["prunable_weights"]


def test_large_endpoint_gap_is_warned_about(run_a, tmp_path):
    payload = torch.load(ckpt(run_a, "cycle_001"), weights_only=True)
    payload["metrics"]["test_accuracy"] -= 0.25  # not what the file holds
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(wrong, payload)
    result = landscape("barrier", ckpt(run_a, "cycle_000"), wrong, "--points", "2", "--bn", "interpolate",
                       "--out", tmp_path / "w.nc")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "test error of wrong" in warnings[0] and "by -0.2500" in warnings[0]


def test_info_on_a_run_and_a_checkpoint(run_a):
    landscape("barrier", ckpt(run_a, "cycle_000"), ckpt(run_a, "cycle_001"), *FAST)
    info = landscape_json("info", run_a)
    assert info["method"] == "pai-cyclic" and info["complete"] and info["cycles"] == 3
    assert info["model"]["name"] == "resnet1d" and info["data"] == "synthetic" and info["target_sparsity"] == 0.5
    assert [c["label"] for c in info["checkpoints"]] == ["cycle_000", "cycle_001", "cycle_002"]
    assert info["checkpoints"][2]["step"] == 12 and 0 <= info["checkpoints"][2]["metrics"]["test_accuracy"] <= 1
    assert info["analyses"] == [{"file": "barrier_cycle_000__cycle_001.nc", "analysis": "connectivity",
                                 "dims": {"pair": 1, "split": 2, "alpha": 3, "endpoint": 2},
                                 "settings": info["analyses"][0]["settings"]}]
    text = landscape("info", run_a).stdout
    assert "pai-cyclic" in text and "cycle_002" in text and "barrier_cycle_000__cycle_001.nc" in text
    one = landscape_json("info", ckpt(run_a, "cycle_001"))
    assert one["label"] == "cycle_001" and one["cycle"] == 1 and one["run"] == str(run_a)
    assert "does not exist" in one_line_error(landscape("info", run_a / "nope", expect=2))


def test_trained_run_end_to_end(tiny_run, tmp_path):
    """On a run trained by `landscape train`: --bn none endpoints are each checkpoint's own
    recorded evaluation, bit for bit; recomputed statistics move the midpoint."""
    labels = ["cycle_000..cycle_001", "cycle_001..cycle_002"]
    none = landscape_json("connectivity", tiny_run, "--bn", "none", "--points", "3", "--out", tmp_path / "none.nc")
    assert none["computed"] == labels
    ds = store.read_dataset(tmp_path / "none.nc")
    np.testing.assert_array_equal(ds.endpoint_error_gap.values, 0.0)
    np.testing.assert_array_equal(ds.endpoint_loss_gap.values, 0.0)
    assert ds.method.item() == "pai-cyclic" and ds.attrs["model"] == "resnet1d"
    assert np.allclose(ds.sparsity_a.values, 0.5, atol=0.01)
    landscape("connectivity", tiny_run, "--points", "3", "--split", "test", "--out", tmp_path / "re.nc")
    recomputed = store.read_dataset(tmp_path / "re.nc")
    midpoint = dict(split="test", alpha=0.5)
    assert (recomputed.loss.sel(**midpoint).values != ds.loss.sel(**midpoint).values).all()
    assert not (Path(tiny_run) / "analysis").exists()
