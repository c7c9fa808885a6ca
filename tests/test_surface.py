"""Loss surfaces: a closed-form surface, the checkpoints at their own coordinates, masked and
filter-normalised directions checked by hand, agreement with the barrier path, and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_cli
from landscape.connectivity import Pair, compute_pairs
from landscape.directions import filter_normalised, random_frame
from landscape.interpolate import recompute_bn_statistics
from landscape.settings import PathSettings, SurfaceSettings
from landscape.surface import resolved, surface_dataset
from sparse_training.checkpoint import Checkpoint, load_checkpoint
from sparse_training.config import DataConfig, ModelConfig
from sparse_training.data import load_data
from sparse_training.errors import UserError
from sparse_training.trainer import evaluate


def linear_classifier(num_classes: int = 10, input_size: int = 40) -> nn.Module:
    """logits = W x: the logits are affine in the weights, so the loss on any plane of weights
    has a closed form."""
    return nn.Sequential(nn.Flatten(), nn.Linear(input_size, num_classes, bias=False))


def linear_checkpoint(seed: int) -> Checkpoint:
    torch.manual_seed(seed)
    state = {"1.weight": torch.randn(10, 40) * 0.3}
    return Checkpoint(path=Path(f"s{seed}.pt"), state_dict=state, masks={"1.weight": torch.ones(10, 40, dtype=torch.bool)},
                      model=ModelConfig("test_surface:linear_classifier", {}), data=DataConfig(name="synthetic"),
                      label=f"s{seed}", model_from_user=True)


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(y.size), y]))


def test_plane_through_three_checkpoints_matches_the_closed_form():
    checkpoints = [linear_checkpoint(seed) for seed in (1, 2, 3)]
    data = load_data(DataConfig(name="synthetic"), "cpu")
    settings = resolved(SurfaceSettings(grid=4, splits=("test",), batch_size=64), 3)
    ds = surface_dataset(checkpoints, ["a", "b", "c"], data, settings, "cpu")

    t1, t2, t3 = (c.state_dict["1.weight"].double().numpy() for c in checkpoints)
    u, w = t2 - t1, t3 - t1
    c = (w * u).sum() / (u * u).sum()
    v = w - c * u
    h = np.linalg.norm(v) / np.linalg.norm(u)
    np.testing.assert_allclose(ds.checkpoint_alpha.values, [0, 1, c], atol=1e-12)
    np.testing.assert_allclose(ds.checkpoint_beta.values, [0, 0, h], atol=1e-12)
    x, y = (t.numpy() for t in next(iter(data.eval_batches("test", 10_000))))
    for j, b in enumerate(ds.beta.values):
        for i, a in enumerate(ds.alpha.values):
            weight = t1 + a * u + b * v / h
            expected = cross_entropy(x.astype(np.float64) @ weight.T, y)
            assert float(ds.loss.sel(split="test").values[j, i]) == pytest.approx(expected, rel=2e-6)
    for k, ckpt in enumerate(checkpoints):  # each checkpoint at its own coordinates is itself
        own = cross_entropy(x.astype(np.float64) @ ckpt.state_dict["1.weight"].double().numpy().T, y)
        assert float(ds.checkpoint_loss.sel(split="test").values[k]) == pytest.approx(own, rel=2e-6)


def test_filter_normalisation_by_hand():
    weight = torch.tensor([[[[3.0, 4.0], [0.0, 0.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])  # filter norms 5 and 1
    direction = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[0.0, 2.0], [0.0, 0.0]]]], dtype=torch.float64)
    out = filter_normalised(direction, weight)
    np.testing.assert_allclose(out[0].flatten().numpy(), [2.5] * 4)  # 5 / |(1,1,1,1)| = 2.5
    np.testing.assert_allclose(out[1].flatten().numpy(), [0.0, 1.0, 0.0, 0.0])
    pruned = filter_normalised(direction, torch.zeros_like(weight))  # a pruned filter does not move
    assert not pruned.any()


def test_masked_random_directions_have_exact_zeros_outside_the_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(4 * 6, 3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {"0.weight": torch.rand(4, 1, 3) > 0.5, "3.weight": torch.rand(3, 24) > 0.7}
    for name, mask in masks.items():
        state[name] = state[name] * mask
    names = [name for name, _ in model.named_parameters()]
    frame = random_frame(state, names, masks, 2, seed=7, move_bias_norm=False)
    for direction in frame.directions:
        assert set(direction) == set(masks)  # biases and BatchNorm parameters stay put
        for name, mask in masks.items():
            assert not direction[name][~mask].any()
            kept_filters = state[name].flatten(1).norm(dim=1)
            np.testing.assert_allclose(direction[name].flatten(1).norm(dim=1).numpy(), kept_filters.numpy(), rtol=1e-6)
    point = frame.state(0.7, -1.3, state)
    for name, mask in masks.items():
        assert not point[name][~mask].any()
    assert torch.equal(point["1.running_mean"], state["1.running_mean"])
    again = random_frame(state, names, masks, 2, seed=7, move_bias_norm=False)  # seeded: the same directions
    assert all(torch.equal(again.directions[0][n], frame.directions[0][n]) for n in masks)


def test_line_agrees_with_the_barrier_path_and_checkpoints_with_their_own_evaluation(tiny_run, tmp_path):
    a, b = (tiny_run / "checkpoints" / f"cycle_00{k}.pt" for k in (1, 2))
    checkpoints = [load_checkpoint(a), load_checkpoint(b)]
    data = load_data(checkpoints[0].data, "cpu")
    common = dict(splits=("test",), bn_batches=2, batch_size=64)
    line = surface_dataset(checkpoints, ["cycle_001", "cycle_002"], data,
                           resolved(SurfaceSettings(grid=7, range=0.25, **common), 2), "cpu")
    np.testing.assert_allclose(line.alpha.values, [-0.25, 0, 0.25, 0.5, 0.75, 1, 1.25], atol=1e-15)
    path = compute_pairs([Pair("x", a, b)], PathSettings(points=5, **common), tmp_path / "p.nc").dataset
    np.testing.assert_allclose(line.loss.sel(split="test").values[0, 1:6], path.loss.sel(split="test").values[0],
                               rtol=1e-6)
    for k, ckpt in enumerate(checkpoints):  # BatchNorm recomputed on the same batches as the grid
        model = ckpt.build_model()
        recompute_bn_statistics(model, data.train_batches(64, 0, 0, augment=False), 2, "cpu")
        own = evaluate(model, data, "test", 64)
        assert float(line.checkpoint_loss.sel(split="test")[k]) == pytest.approx(own["loss"], rel=1e-6)
        assert float(line.checkpoint_error.sel(split="test")[k]) == pytest.approx(1 - own["accuracy"])
    assert int(line.bn_batches_used) == 2


def test_surface_cli_plane_reuse_plot_and_errors(tiny_run, tmp_path):
    args = ["surface", str(tiny_run), "--through", "cycle_000,cycle_001,cycle_002", "--grid", "3", "--samples", "32",
            "--bn-batches", "1", "--json"]
    first = json.loads(run_cli(*args).stdout)
    assert first["directions"] == "checkpoints" and first["computed"] == ["cycle_000", "cycle_001", "cycle_002"]
    assert first["output"].endswith("analysis/surface_cycle_000__cycle_001__cycle_002.nc")
    assert [first["checkpoints"]["cycle_001"][k] for k in ("alpha", "beta")] == [1.0, 0.0]
    assert json.loads(run_cli(*args).stdout)["reused"] == first["computed"]
    figure = json.loads(run_cli("plot", "surface", str(tiny_run), "--json").stdout)["figure"]
    assert Path(figure).stat().st_size > 10_000

    random = json.loads(run_cli("surface", f"{tiny_run}@cycle_002", "--grid", "3", "--dims", "1", "--samples", "32",
                                "--bn", "interpolate", "--subspace", "full", "--json").stdout)
    assert random["directions"] == "random" and random["beta"] == [0.0] and len(random["alpha"]) == 3
    for bad, message in [
        (["--through", "cycle_000,cycle_001", "--dims", "2"], "span a line"),
        (["--through", "cycle_000", "--directions", "checkpoints"], "needs two checkpoints"),
        (["--through", "cycle_000,cycle_001", "--directions", "random"], "around one checkpoint"),
        (["--grid", "1"], "--grid must be 2"),
        (["--through", "cycle_000,cycle_000,cycle_001"], "given twice"),
    ]:
        result = run_cli("surface", str(tiny_run), *bad, expect=2)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_collinear_checkpoints_are_refused():
    one, two = linear_checkpoint(1), linear_checkpoint(2)
    three = replace(two, state_dict={"1.weight": 2 * two.state_dict["1.weight"] - one.state_dict["1.weight"]})
    data = load_data(DataConfig(name="synthetic"), "cpu")
    with pytest.raises(UserError, match="lie on one line"):
        surface_dataset([one, two, three], ["a", "b", "c"], data, resolved(SurfaceSettings(grid=2), 3), "cpu")
