"""Iterative pruning (imp, lrr), SCULPT-ing, the coupling experiments (transfer), gmp and rigl:
invariants of each method on tiny runs (resnet1d with BatchNorm, width 8, synthetic data,
4 steps per epoch), and every bad input as a one-line exit 2 that writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_cli, train_tiny
from sparse_training.checkpoint import checkpoint_payload, load_checkpoint, save_checkpoint
from sparse_training.rundir import RunDir
from sparse_training.config import Config, DataConfig, ModelConfig, PruneConfig
from sparse_training.methods.dynamic import GradualMagnitudePruning, RigL, drop_and_grow
from sparse_training.methods.transfer import fresh_initialisation
from sparse_training.masks import is_subset, kept_count, prunable_parameters, total_count
from sparse_training.models import build_model
from sparse_training.procedures import UserInterrupted, train_run
from sparse_training.run.session import RunSession
from test_train import StopAfter


# ---------------------------------------------------------------- recording runs

class Recorder:
    """What the model looked like right after each cycle start, and the per-layer kept
    counts after every step, of the runs trained while it is installed."""

    def __init__(self) -> None:
        self.starts: dict[int, dict] = {}
        self.kept_after_step: list[dict[str, int]] = []
        self.masks_after_step: list[dict[str, torch.Tensor]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        start_cycle, after_step = RunSession.start_cycle, RunSession.after_step

        def recording_start(session, plan, *args):
            start_cycle(session, plan, *args)
            self.starts[plan.index] = {
                "state": {k: v.detach().clone() for k, v in session.model.state_dict().items()},
                "mask": {k: v.clone() for k, v in session.mask.items()},
                "optimizer_state": len(session.optimizer.state),
            }

        def recording_step(session, position):
            after_step(session, position)
            params = prunable_parameters(session.model)
            assert all(torch.count_nonzero(params[n][~m]) == 0 for n, m in session.mask.items())
            self.kept_after_step.append({n: int(m.sum()) for n, m in session.mask.items()})
            self.masks_after_step.append({n: m.clone() for n, m in session.mask.items()})

        monkeypatch.setattr(RunSession, "start_cycle", recording_start)
        monkeypatch.setattr(RunSession, "after_step", recording_step)


def _recorded(out: Path, *flags: str) -> tuple[Path, Recorder, dict]:
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder.install(monkeypatch)
        result = run_cli("train", "--data", "synthetic", "--model", "resnet1d", "--model-kwargs", '{"width": 8}',
                         "--epochs", "2", "--batch-size", "64", "--lr", "0.05", "--device", "cpu",
                         "--out", str(out), "--json", *flags)
    return out, recorder, json.loads(result.stdout)


@pytest.fixture(scope="module")
def imp_run(tmp_path_factory):
    # prune 30 % per cycle to 0.6: levels 0.3, 0.51, then 0.6 (clipped); rewind to epoch 1
    return _recorded(tmp_path_factory.mktemp("methods") / "imp", "--method", "imp", "--sparsity", "0.6",
                     "--prune-fraction", "0.3", "--rewind-epoch", "1")


@pytest.fixture(scope="module")
def lrr_run(tmp_path_factory):
    # dense cycle 0, then two pruning cycles: 0.5, 0.75
    return _recorded(tmp_path_factory.mktemp("methods") / "lrr", "--method", "lrr", "--sparsity", "0.75",
                     "--prune-fraction", "0.5")


def _checkpoints(out: Path) -> list:
    run = RunDir(out)
    return [load_checkpoint(run.checkpoint(label)) for label in run.cycle_labels()]


def _global_magnitude_mask(state: dict, mask: dict, keep: int) -> dict:
    """Oracle: the `keep` kept weights of largest |w| over all layers at once."""
    names = list(mask)
    scores = torch.cat([torch.where(mask[n], state[n].abs(), torch.tensor(-1.0)).flatten() for n in names])
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen[torch.topk(scores, keep).indices] = True
    return {n: c.view(mask[n].shape) for n, c in zip(names, chosen.split([mask[n].numel() for n in names]))}


def _equal_masks(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------- imp

def test_imp_cycle_sparsities_follow_the_geometric_rule_exactly(imp_run):
    out, _recorder, summary = imp_run
    checkpoints = _checkpoints(out)
    total = total_count(checkpoints[0].masks)
    levels = [0.0, 1 - 0.7, 1 - 0.7 ** 2, 0.6]  # 1 - (1 - p)^k, the last clipped to the target
    assert [kept_count(c.masks) for c in checkpoints] == [round((1 - s) * total) for s in levels]
    assert summary["cycles"] == 4 and summary["sparsity"] == pytest.approx(0.6, abs=1 / total)


def test_imp_masks_shrink_and_each_cut_is_global_on_the_trained_weights(imp_run):
    out, recorder, _summary = imp_run
    checkpoints = _checkpoints(out)
    for previous, current in zip(checkpoints, checkpoints[1:]):
        assert is_subset(current.masks, previous.masks)
        oracle = _global_magnitude_mask(previous.state_dict, previous.masks, kept_count(current.masks))
        assert _equal_masks(current.masks, oracle), f"cycle {current.cycle} did not prune the trained magnitudes"


def test_imp_rewinds_to_the_rewind_point_bitwise(imp_run):
    out, recorder, _summary = imp_run
    rewind = load_checkpoint(RunDir(out).checkpoint("rewind"))
    assert (rewind.cycle, rewind.epoch, rewind.step) == (0, 1, 4)
    for cycle in (1, 2, 3):
        start = recorder.starts[cycle]
        assert start["optimizer_state"] == 0  # the optimizer is reset, not carried over
        for name, value in rewind.state_dict.items():
            mask = start["mask"].get(name)
            expected = value if mask is None else torch.where(mask, value, torch.zeros_like(value))
            assert torch.equal(start["state"][name], expected), f"cycle {cycle}: {name}"


# ---------------------------------------------------------------- lrr

def test_lrr_continues_from_the_previous_cycle_and_masks_shrink(lrr_run):
    out, recorder, summary = lrr_run
    checkpoints = _checkpoints(out)
    assert summary["cycles"] == 3 and [c.cycle for c in checkpoints] == [0, 1, 2]
    for previous, current in zip(checkpoints, checkpoints[1:]):
        assert is_subset(current.masks, previous.masks)
        start = recorder.starts[current.cycle]
        for name, value in previous.state_dict.items():
            mask = start["mask"].get(name)
            expected = value if mask is None else torch.where(mask, value, torch.zeros_like(value))
            assert torch.equal(start["state"][name], expected), f"cycle {current.cycle}: {name}"
    total = total_count(checkpoints[0].masks)
    assert [kept_count(c.masks) for c in checkpoints] == [total, round(0.5 * total), round(0.25 * total)]
    # the warm-up point the coupling experiments transfer (the cycle is shorter than epoch 10)
    assert load_checkpoint(RunDir(out).checkpoint("rewind")).epoch == 2


# ---------------------------------------------------------------- sculpt

def test_sculpt_end_to_end_final_sparsity_exact_and_cut_global(tmp_path):
    out = tmp_path / "sculpt"
    train_tiny(out, "--method", "sculpt", "--initial-sparsity", "0.5", "--sparsity", "0.8", "--cycles", "2")
    run = RunDir(out)
    checkpoints = _checkpoints(out)
    assert [c.cycle for c in checkpoints] == [0, 1, 2] and run.is_done()
    total = total_count(checkpoints[0].masks)
    assert kept_count(checkpoints[0].masks) == kept_count(checkpoints[1].masks) == round(0.5 * total)
    assert kept_count(checkpoints[2].masks) == round(0.2 * total)
    oracle = _global_magnitude_mask(checkpoints[1].state_dict, checkpoints[1].masks, round(0.2 * total))
    assert _equal_masks(checkpoints[2].masks, oracle)
    summary = json.loads(run_cli("train", "--resume", str(out), "--json").stdout)
    assert summary["status"] == "already complete" and summary["sparsity"] == pytest.approx(0.8, abs=1 / total)


# ---------------------------------------------------------------- transfer

def test_transfer_lrr_mask_with_warm_up_init(lrr_run, tmp_path):
    source, _recorder, _summary = lrr_run
    mask_source, warm_up = RunDir(source).checkpoint("cycle_002"), RunDir(source).checkpoint("rewind")
    out, recorder, summary = _recorded(tmp_path / "warm", "--method", "transfer", "--mask-from", str(mask_source),
                                       "--weights-from", str(warm_up), "--cycles", "2")
    assert summary["cycles"] == 2
    init, rewind = load_checkpoint(RunDir(out).checkpoint("init")), load_checkpoint(warm_up)
    assert all(torch.equal(init.state_dict[k], v) for k, v in rewind.state_dict.items())
    source_mask = load_checkpoint(mask_source).masks
    for checkpoint in _checkpoints(out):
        assert _equal_masks(checkpoint.masks, source_mask)
    start = recorder.starts[0]
    for name, mask in source_mask.items():
        assert torch.equal(start["state"][name], torch.where(mask, rewind.state_dict[name], torch.tensor(0.0)))


def test_transfer_signs_only_gives_the_source_signs_on_every_kept_weight(lrr_run, tmp_path):
    source, _recorder, _summary = lrr_run
    mask_source, warm_up = RunDir(source).checkpoint("cycle_002"), RunDir(source).checkpoint("rewind")
    out, recorder, _summary = _recorded(tmp_path / "signs", "--method", "transfer", "--mask-from", str(mask_source),
                                        "--weights-from", "random", "--signs-from", str(warm_up), "--epochs", "1")
    config = load_checkpoint(RunDir(out).checkpoint("init"))
    fresh = fresh_initialisation(config.model, seed=0)
    signs = load_checkpoint(warm_up).state_dict
    source_init = load_checkpoint(RunDir(source).checkpoint("init")).state_dict
    start = recorder.starts[0]
    for name, mask in load_checkpoint(mask_source).masks.items():
        kept = start["state"][name][mask]
        assert torch.equal(torch.sign(kept), torch.sign(signs[name][mask])), name
        assert torch.equal(kept.abs(), fresh[name][mask].abs()), name
        # a fresh draw, not the source run's own init (same seed, same architecture)
        assert not torch.equal(fresh[name].abs(), source_init[name].abs()), name


# ---------------------------------------------------------------- gmp and rigl

def test_gmp_cubic_schedule_by_hand():
    gmp = GradualMagnitudePruning(PruneConfig(sparsity=0.8, update_every=10, update_end=0.75, allocation="global"), 100)
    assert (gmp.start, gmp.end) == (0, 75)
    assert gmp.sparsity_at(0) == 0.0
    assert gmp.sparsity_at(25) == pytest.approx(0.8 * (1 - (2 / 3) ** 3))
    assert gmp.sparsity_at(75) == gmp.sparsity_at(100) == 0.8
    assert [t for t in range(1, 101) if gmp.is_update_step(t)] == [10, 20, 30, 40, 50, 60, 70, 75]


def test_rigl_cosine_fraction_and_update_steps_by_hand():
    rigl = RigL(PruneConfig(sparsity=0.9, update_every=10, update_end=0.75, rigl_fraction=0.3), 100)
    assert rigl.fraction_at(0) == pytest.approx(0.3) and rigl.fraction_at(37.5) == pytest.approx(0.15)
    assert [t for t in range(1, 101) if rigl.is_update_step(t)] == [10, 20, 30, 40, 50, 60, 70]


def test_drop_and_grow_by_hand():
    mask = torch.tensor([True, True, True, False, False, False])
    weight = torch.tensor([0.5, -0.1, 0.3, 0.0, 0.0, 0.0])
    gradient = torch.tensor([0.0, 0.0, 0.0, 0.2, -0.9, 0.1])
    assert drop_and_grow(mask, weight, gradient, 1).tolist() == [True, False, True, False, True, False]
    assert drop_and_grow(mask, weight, gradient, 2).tolist() == [True, False, False, True, True, False]
    assert torch.equal(drop_and_grow(mask, weight, gradient, 0), mask)


def test_rigl_update_zeroes_grown_weights_and_their_momentum():
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -0.1, 0.0]]))
    mask = {"weight": torch.tensor([[True, True, False]])}
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer.weight.grad = torch.tensor([[0.0, 0.0, 2.0]])
    optimizer.step()  # creates the momentum buffer
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -0.1, 0.7]]))  # a pruned weight moved by the step
    rigl = RigL(PruneConfig(sparsity=0.5, update_every=1, update_end=1.0, rigl_fraction=1.0), 4)
    new = rigl.update(layer, mask, optimizer, 2)  # fraction 0.5: drop one (-0.1), grow one (index 2)
    assert new["weight"].tolist() == [[True, False, True]]
    assert layer.weight.tolist() == [[0.5, 0.0, 0.0]]
    assert optimizer.state[layer.weight]["momentum_buffer"][0, 1:].tolist() == [0.0, 0.0]


def test_rigl_keeps_every_layer_sparsity_constant_at_every_step(tmp_path):
    out, recorder, summary = _recorded(tmp_path / "rigl", "--method", "rigl", "--sparsity", "0.7",
                                       "--update-every", "2")
    assert len(recorder.kept_after_step) == 8
    assert all(counts == recorder.kept_after_step[0] for counts in recorder.kept_after_step)
    initial = recorder.starts[0]["mask"]
    assert sum(kept for kept in recorder.kept_after_step[0].values()) == kept_count(initial)
    changed = [step + 1 for step, mask in enumerate(recorder.masks_after_step)
               if not _equal_masks(mask, recorder.masks_after_step[step - 1] if step else initial)]
    assert changed == [2, 4]  # updates every 2 steps until 0.75 of the 8 steps
    assert summary["sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_gmp_reaches_the_target_with_shrinking_masks(tmp_path):
    out, recorder, summary = _recorded(tmp_path / "gmp", "--method", "gmp", "--sparsity", "0.8",
                                       "--update-every", "2")
    masks = recorder.masks_after_step
    assert all(is_subset(later, earlier) for earlier, later in zip(masks, masks[1:]))
    total = total_count(masks[0])
    kept = [kept_count(m) for m in masks]
    # cubic schedule over steps 0..6 (0.75 of 8), pruning at 2, 4 and 6
    expected = {t: round((1 - 0.8 * (1 - (1 - t / 6) ** 3)) * total) for t in (2, 4, 6)}
    assert kept == [total, expected[2], expected[2], expected[4], expected[4], expected[6], expected[6], expected[6]]
    assert _checkpoints(out)[-1].sparsity == pytest.approx(0.8, abs=1 / total)


@pytest.mark.parametrize("method", ["gmp", "rigl"])
def test_resumed_moving_mask_run_equals_uninterrupted(tmp_path, method):
    config = Config.from_dict({
        "data": {"name": "synthetic"}, "model": {"name": "resnet1d", "kwargs": {"width": 8}},
        "optim": {"batch_size": 64, "lr": 0.05}, "run": {"method": method, "epochs": 2, "device": "cpu"},
        "prune": {"sparsity": 0.7, "update_every": 2}})
    quiet = lambda message: None  # noqa: E731
    train_run(config, tmp_path / "straight", log=quiet)
    with pytest.raises(UserInterrupted):
        train_run(config, tmp_path / "resumed", log=quiet, stop=StopAfter(3))  # between two updates
    train_run(config, tmp_path / "resumed", resume=True, log=quiet)
    a, b = RunDir(tmp_path / "straight"), RunDir(tmp_path / "resumed")
    for label in a.checkpoint_labels():
        ca, cb = load_checkpoint(a.checkpoint(label)), load_checkpoint(b.checkpoint(label))
        assert all(torch.equal(ca.state_dict[k], cb.state_dict[k]) for k in ca.state_dict), label
        assert _equal_masks(ca.masks, cb.masks), label
    assert a.metrics.read_text() == b.metrics.read_text()  # flops rows included


# ---------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def other_architecture(tmp_path_factory) -> Path:
    """A checkpoint of an mlp, written directly (no training needed)."""
    path = tmp_path_factory.mktemp("other") / "mlp.pt"
    config = ModelConfig("mlp", {"num_classes": 10, "input_size": 40, "hidden_size": 8})
    model = build_model(config)
    save_checkpoint(path, checkpoint_payload(
        model=model, masks={n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(model).items()},
        model_config=config, data_config=DataConfig(name="synthetic"), label="cycle_000", cycle=0, epoch=1, step=4,
        sparsity=0.0, method="dense", metrics={}, config={}))
    return path


@pytest.mark.parametrize("flags, message", [
    (["--method", "transfer", "--mask-from", "OTHER"], "does not fit the model"),
    (["--method", "transfer", "--mask-from", "MISSING"], "does not exist"),
    (["--method", "transfer", "--mask-from", "OTHER", "--sparsity", "0.5"], "takes its sparsity from --mask-from"),
    (["--method", "lrr", "--sparsity", "0.5", "--mask-from", "OTHER"], "belong(s) to method transfer"),
    (["--method", "sculpt", "--initial-sparsity", "0.7", "--sparsity", "0.5"], "must be higher than initial-sparsity"),
    (["--method", "imp", "--sparsity", "0.5", "--rewind-epoch", "3"], "beyond the cycle"),
    (["--method", "imp", "--sparsity", "0.5", "--prune-fraction", "1.0"], "prune-fraction must be in (0, 1)"),
    (["--method", "lrr", "--sparsity", "0.5", "--prune-fraction", "0"], "prune-fraction must be in (0, 1)"),
    (["--method", "rigl", "--sparsity", "0.5", "--rigl-fraction", "1.5"], "rigl-fraction must be in (0, 1)"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, other_architecture, flags, message):
    out = tmp_path / "run"
    flags = [str(other_architecture) if f == "OTHER" else str(tmp_path / "missing.pt") if f == "MISSING" else f
             for f in flags]
    result = run_cli("train", "--data", "synthetic", "--model", "resnet1d", "--model-kwargs", '{"width": 8}',
                     "--epochs", "2", "--device", "cpu", "--out", str(out), *flags, expect=2)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and result.stdout == ""
    assert not out.exists()
