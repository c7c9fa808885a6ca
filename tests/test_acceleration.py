"""Precision, memory format, compilation, the on-device divergence watch and cheaper
evaluation: checked on CPU, where PyTorch runs all of them (bf16/fp16 autocast, channels-last,
inductor). Invariants: pruned weights exactly zero, exact pruned counts, files in the usual
contiguous layout, resume equal to the uninterrupted run bit for bit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from sparse_training.acceleration import CHECK_EVERY, DivergenceWatch, StepRunner, default_precision
from sparse_training.config import Config
from sparse_training.errors import TrainingDiverged
from sparse_training.io import torch_load_safe
from sparse_training.procedures import StopFlag, UserInterrupted, train_run

TINY = ["--data", "synthetic", "--model", "resnet1d", "--model-kwargs", '{"width": 8}', "--batch-size", "64",
        "--lr", "0.05", "--device", "cpu", "--epochs", "2"]
PAI = TINY + ["--method", "pai-cyclic", "--pruner", "random", "--sparsity", "0.75", "--cycles", "2"]
# CIFAR-shaped tensors through the npz source, for the 2-D convolutional models
IMAGES = {"x_train": (48, 3, 8, 8), "x_test": (16, 3, 8, 8)}


def _checkpoint(run: Path, label: str) -> dict:
    return torch_load_safe(run / "checkpoints" / f"{label}.pt", "checkpoint")


def _assert_exactly_masked(checkpoint: dict, sparsity: float) -> None:
    masks, state = checkpoint["masks"], checkpoint["state_dict"]
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round((1 - sparsity) * total)
    for name, mask in masks.items():
        assert torch.count_nonzero(state[name][~mask]) == 0, name


def _metric_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "run"
    run_cli("train", *PAI, "--precision", "fp32", "--out", str(out))
    return out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_with_exact_masks_and_is_recorded(tmp_path, precision, fp32_run):
    out = tmp_path / precision
    run_cli("train", *PAI, "--precision", precision, "--out", str(out))
    assert json.loads((out / "config.json").read_text())["run"]["precision"] == precision
    for label in ("cycle_000", "cycle_001"):
        _assert_exactly_masked(_checkpoint(out, label), 0.75)
    final = _checkpoint(out, "cycle_001")
    assert all(v.dtype == torch.float32 for v in final["state_dict"].values() if v.is_floating_point())
    state = torch_load_safe(out / "state.pt", "state")
    assert bool(state["grad_scaler"]) == (precision == "fp16")  # the scaler's scale is part of the resume state
    reference = _checkpoint(fp32_run, "cycle_001")
    assert all(torch.equal(final["masks"][n], m) for n, m in reference["masks"].items())  # same seed, same masks
    assert final["state_dict"]["classifier.weight"].ne(reference["state_dict"]["classifier.weight"]).any()  # other arithmetic
    assert abs(final["metrics"]["train_loss"] - reference["metrics"]["train_loss"]) < 0.01


def test_default_precision_is_fp32_on_cpu_and_recorded(tmp_path):
    assert default_precision("cpu") == "fp32"
    out = tmp_path / "run"
    run_cli("train", *TINY, "--epochs", "1", "--out", str(out))
    assert json.loads((out / "config.json").read_text())["run"]["precision"] == "fp32"


class StopAfter(StopFlag):
    """A stop request (as SIGTERM makes one) once the loop has asked `calls` times."""

    def __init__(self, calls: int):
        super().__init__()
        self.calls = calls

    def __bool__(self) -> bool:
        self.calls -= 1
        if self.calls < 0:
            self.signal_name = "SIGTERM"
        return self.calls < 0


def _config(**run) -> Config:
    """PAI's run as a Config (train_run resolves it, as the command line's does)."""
    return Config.from_dict({
        "data": {"name": "synthetic"}, "model": {"name": "resnet1d", "kwargs": {"width": 8}},
        "optim": {"batch_size": 64, "lr": 0.05},
        "prune": {"pruner": "random", "sparsity": 0.75},
        "run": {"device": "cpu", "epochs": 2, "method": "pai-cyclic", "cycles": 2, **run},
    })


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_resume_equals_the_uninterrupted_run(tmp_path, precision):
    config = _config(precision=precision)
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    train_run(config, reference, log=lambda message: None)
    with pytest.raises(UserInterrupted):
        train_run(config, stopped, log=lambda message: None, stop=StopAfter(10))  # mid-epoch of cycle 1
    train_run(config, stopped, resume=True, log=lambda message: None)
    for name in sorted(p.name for p in (reference / "checkpoints").iterdir()):
        assert (stopped / "checkpoints" / name).read_bytes() == (reference / "checkpoints" / name).read_bytes(), name
    assert (stopped / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()


def _images(tmp_path: Path) -> str:
    import numpy as np

    generator = np.random.default_rng(0)
    arrays = {key: generator.normal(size=shape).astype("float32") for key, shape in IMAGES.items()}
    arrays.update(y_train=np.arange(48) % 4, y_test=np.arange(16) % 4)
    path = tmp_path / "images.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_channels_last_trains_the_same_network_and_saves_contiguous_files(tmp_path):
    data = _images(tmp_path)
    common = ["--data", data, "--model", "resnet20", "--model-kwargs", '{"width": 0.5}', "--batch-size", "16",
              "--lr", "0.05", "--device", "cpu", "--epochs", "1", "--method", "pai", "--pruner", "magnitude",
              "--sparsity", "0.8"]
    last, plain = tmp_path / "channels_last", tmp_path / "contiguous"
    run_cli("train", *common, "--memory-format", "channels-last", "--out", str(last))
    run_cli("train", *common, "--memory-format", "contiguous", "--out", str(plain))
    a, b = _checkpoint(last, "cycle_000"), _checkpoint(plain, "cycle_000")
    _assert_exactly_masked(a, 0.8)
    assert all(t.is_contiguous() for t in [*a["state_dict"].values(), *a["masks"].values()])
    state = torch_load_safe(last / "state.pt", "state")
    buffers = [v for s in state["optimizer"]["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert buffers and all(t.is_contiguous() for t in [*state["model"].values(), *buffers])
    # the same arithmetic in another layout: equal masks, weights equal to float rounding
    assert all(torch.equal(a["masks"][n], b["masks"][n]) for n in a["masks"])
    for name, tensor in a["state_dict"].items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, b["state_dict"][name], rtol=1e-3, atol=1e-4)


def test_channels_last_on_a_model_without_2d_convolutions_is_one_line(tmp_path):
    result = run_cli("train", *TINY, "--memory-format", "channels-last", "--out", str(tmp_path / "r"), expect=2)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --memory-format channels-last applies to models with 2-D convolutions, and this one has none; "
        "use --memory-format auto or contiguous")
    assert not (tmp_path / "r").exists()


def test_divergence_watch_names_the_first_non_finite_step_without_reading_every_step():
    watch = DivergenceWatch("cpu")
    losses = [1.0] * 5 + [float("inf"), float("nan")] + [2.0] * 3
    for step, value in enumerate(losses):
        watch.observe(torch.tensor(value), step, cycle=0, epoch=1 + step // 4)
    assert len(watch.pending) == len(losses) < CHECK_EVERY  # nothing read yet
    with pytest.raises(TrainingDiverged, match=r"became inf at cycle 0, epoch 2, step 5;"):
        watch.check()


def test_fp16_step_runner_skips_an_overflowing_step_and_keeps_masked_weights_zero():
    """The gradient scaler skips a step whose gradients overflow; the mask multiply still runs."""
    from sparse_training.masks import MaskedStep

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    mask = {"weight": torch.tensor([[True, False, True, False]] * 3)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    masked = MaskedStep(model, mask, optimizer)
    masked()
    runner = StepRunner("cpu", "fp16")
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    before, scale = model.weight.detach().clone(), runner.scaler.get_scale()
    runner.update(runner.loss(model, x, y) * float("inf"), optimizer)  # every gradient overflows
    masked()
    assert torch.equal(model.weight, before) and runner.scaler.get_scale() < scale
    for _ in range(5):  # the scale keeps shrinking until fp16 gradients fit
        optimizer.zero_grad(set_to_none=True)
        runner.update(runner.loss(model, x, y), optimizer)
        masked()
    assert not torch.equal(model.weight, before) and torch.count_nonzero(model.weight[~mask["weight"]]) == 0


def test_eval_every_and_the_train_subset_are_recorded_and_checkpoints_stay_full(tmp_path):
    out = tmp_path / "run"
    run_cli("train", *TINY, "--epochs", "4", "--method", "pai", "--sparsity", "0.5", "--eval-every", "3",
            "--eval-train-samples", "100", "--save-every", "2", "--out", str(out))
    run = json.loads((out / "config.json").read_text())["run"]
    assert (run["eval_every"], run["eval_train_samples"]) == (3, 100)
    rows = _metric_rows(out)
    samples = {int(r["epoch"]): float(r["value"]) for r in rows if r["metric"] == "samples"}
    # epoch 0 (cycle start), 2 (--save-every checkpoint) and 4 (cycle end) on all 256; epoch 3 on the subset
    assert samples == {0: 256, 2: 256, 3: 100, 4: 256}
    assert sorted({int(r["epoch"]) for r in rows}) == [0, 2, 3, 4]
    subset_loss = next(float(r["value"]) for r in rows if (r["epoch"], r["split"], r["metric"]) == ("3", "train", "loss"))
    assert subset_loss > 0
    # a checkpoint's metrics are those of the whole split, which barrier endpoints are checked against
    at_2 = next(float(r["value"]) for r in rows if (r["epoch"], r["split"], r["metric"]) == ("2", "train", "loss"))
    assert _checkpoint(out, "cycle_000_epoch_002")["metrics"]["train_loss"] == at_2


def test_default_evaluation_keeps_every_epoch_on_the_whole_split(tmp_path):
    out = tmp_path / "run"
    run_cli("train", *TINY, "--epochs", "2", "--out", str(out))
    rows = _metric_rows(out)
    assert json.loads((out / "config.json").read_text())["run"]["eval_train_samples"] is None
    assert sorted({int(r["epoch"]) for r in rows}) == [0, 1, 2] and not any(r["metric"] == "samples" for r in rows)


def test_too_many_eval_train_samples_is_one_line(tmp_path):
    result = run_cli("train", *TINY, "--eval-train-samples", "1000", "--out", str(tmp_path / "r"), expect=2)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --eval-train-samples 1000 exceeds the 256 training samples of synthetic; choose at most 256")


def test_barrier_in_bf16_is_close_to_fp32_and_says_so(tiny_run, tmp_path):
    import xarray as xr

    base = ["barrier", str(tiny_run / "checkpoints" / "cycle_000.pt"), str(tiny_run / "checkpoints" / "cycle_001.pt"),
            "--points", "3", "--device", "cpu"]
    run_cli(*base, "--out", str(tmp_path / "fp32.nc"))
    run_cli(*base, "--precision", "bf16", "--out", str(tmp_path / "bf16.nc"))
    fp32, bf16 = xr.open_dataset(tmp_path / "fp32.nc"), xr.open_dataset(tmp_path / "bf16.nc")
    assert "precision" not in json.loads(fp32.attrs["settings"])  # the files written before --precision existed
    assert json.loads(bf16.attrs["settings"])["precision"] == "bf16"
    assert not bool((fp32.loss == bf16.loss).all())  # really another arithmetic
    assert float(abs(fp32.loss - bf16.loss).max()) < 0.05 * float(fp32.loss.max())


@pytest.mark.slow
def test_compiled_training_matches_eager_and_resumes(tmp_path):
    """torch.compile (inductor, on CPU) trains the same masked network as eager, to float
    rounding, and a compiled run resumes."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    config = _config(cycles=1).replace("model", name="mlp", kwargs={"hidden_size": 16})
    train_run(config, eager, log=lambda message: None)
    with pytest.raises(UserInterrupted):
        train_run(config.replace("run", compile=True), compiled, log=lambda message: None, stop=StopAfter(5))
    train_run(config.replace("run", compile=True), compiled, resume=True, log=lambda message: None)
    a, b = _checkpoint(eager, "cycle_000"), _checkpoint(compiled, "cycle_000")
    _assert_exactly_masked(b, 0.75)
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=1e-4, atol=1e-5)


def test_sharpness_in_fp64_agrees_with_fp32_and_reduced_precision_is_refused(tiny_run, tmp_path):
    import xarray as xr

    base = ["sharpness", str(tiny_run / "checkpoints" / "cycle_000.pt"), "--samples", "64", "--device", "cpu"]
    run_cli(*base, "--out", str(tmp_path / "fp32.nc"))
    run_cli(*base, "--precision", "fp64", "--out", str(tmp_path / "fp64.nc"))
    fp32, fp64 = xr.open_dataset(tmp_path / "fp32.nc"), xr.open_dataset(tmp_path / "fp64.nc")
    assert "precision" not in json.loads(fp32.attrs["settings"])
    assert json.loads(fp64.attrs["settings"])["precision"] == "fp64"
    top32, top64 = float(fp32.eigenvalue.values.ravel()[0]), float(fp64.eigenvalue.values.ravel()[0])
    assert top32 != top64 and abs(top32 - top64) <= 2e-3 * abs(top64)  # both within --tol 1e-3 of the truth
    refused = run_cli(*base, "--precision", "bf16", "--out", str(tmp_path / "bf16.nc"), expect=2)
    assert "bf16" in refused.stderr and not (tmp_path / "bf16.nc").exists()
