"""Training FLOPs: hand-counted multiply-adds for small models, and the totals a run records."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparse_training.checkpoint import load_checkpoint
from sparse_training.records import read_meta, read_metrics
from sparse_training.rundir import RunDir
from sparse_training.flops import FlopCounter, LayerCost, forward_flops, layer_costs

from conftest import run_cli


def _two_layer() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _mask(first_kept: int, second_kept: int) -> dict[str, torch.Tensor]:
    first = torch.zeros(12, dtype=torch.bool)
    first[:first_kept] = True
    second = torch.zeros(6, dtype=torch.bool)
    second[:second_kept] = True
    return {"0.weight": first.view(3, 4), "2.weight": second.view(2, 3)}


def test_two_layer_linear_model_by_hand():
    costs = layer_costs(_two_layer(), (4,))
    assert costs == [LayerCost("0", "0.weight", 1, 12, 3), LayerCost("2", "2.weight", 1, 6, 2)]
    # dense forward: 4*3 multiply-adds + 3 bias adds + 3*2 + 2 = 23 per sample
    assert forward_flops(costs) == 23
    # 5 of 12 and 3 of 6 weights kept: 5 + 3 + 3 + 2 = 13 per sample
    assert forward_flops(costs, _mask(5, 3)) == 13
    counter = FlopCounter(costs)
    counter.add_step(8)  # dense: 8 samples x 3 x 23
    assert counter.total == 552
    counter.set_mask(_mask(5, 3))
    counter.add_step(8)  # 8 x 3 x 13
    assert counter.total == 552 + 312
    counter.add_step(2, dense_gradient=True)  # 2 x (3 x 13 + the 7 + 3 pruned weights' gradient)
    assert counter.total == 552 + 312 + 2 * (39 + 10)


def test_conv_batchnorm_model_by_hand():
    # Conv1d(2->4, kernel 3, stride 2, padding 1) on length 10: 5 output positions, so each of
    # its 24 weights does 5 multiply-adds (120); no bias. BatchNorm on 4 x 5 outputs: 2 each (40).
    # Linear(20 -> 3): 60 + 3 bias adds.
    model = nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(20, 3))
    model.train()
    costs = layer_costs(model, (2, 10))
    assert model.training  # the measuring pass restores the mode
    assert costs == [LayerCost("0", "0.weight", 5, 24, 0), LayerCost("1", None, 0, 0, 40),
                     LayerCost("4", "4.weight", 1, 60, 3)]
    assert forward_flops(costs) == 120 + 40 + 63
    half = {"0.weight": torch.arange(24).view(4, 2, 3) % 2 == 0, "4.weight": torch.ones(3, 20, dtype=torch.bool)}
    assert forward_flops(costs, half) == 12 * 5 + 40 + 63


def test_conv2d_with_groups_counts_output_positions_times_weights():
    model = nn.Conv2d(4, 8, 3, padding=1, groups=2)  # 8 x 2 x 3 x 3 weights on 6 x 6 outputs
    costs = layer_costs(model, (4, 6, 6))
    assert costs == [LayerCost("", "weight", 36, 144, 8 * 36)]
    assert forward_flops(costs) == 36 * 144 + 288


def test_a_run_records_the_hand_counted_total(tmp_path):
    """mlp 40-16-16-10 (uses 1 per weight; biases 16 + 16 + 10) on synthetic data (256 samples,
    batch 64: 4 steps of 64), pai-cyclic at sparsity 0.5 for 2 cycles of 2 epochs."""
    out = tmp_path / "mlp"
    result = run_cli("train", "--data", "synthetic", "--model", "mlp", "--model-kwargs", '{"hidden_size": 16}',
                     "--method", "pai-cyclic", "--sparsity", "0.5", "--cycles", "2", "--epochs", "2",
                     "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--out", str(out), "--json")
    run = RunDir(out)
    mask = load_checkpoint(run.checkpoint("cycle_000")).masks
    forward = sum(int(m.sum()) for m in mask.values()) + 16 + 16 + 10
    per_epoch = 4 * 64 * 3 * forward
    assert read_meta(run)["training_flops"] == 4 * per_epoch
    assert json.loads(result.stdout)["training_flops"] == 4 * per_epoch
    rows = [r for r in read_metrics(run) if r["metric"] == "flops"]
    ends = [(r["cycle"], r["epoch"], r["value"]) for r in rows if r["epoch"] > 0]
    assert ends == [(0, 1, per_epoch), (0, 2, 2 * per_epoch), (1, 1, 3 * per_epoch), (1, 2, 4 * per_epoch)]
    human = run_cli("train", "--data", "synthetic", "--model", "mlp", "--model-kwargs", '{"hidden_size": 16}',
                    "--method", "pai-cyclic", "--sparsity", "0.5", "--cycles", "2", "--epochs", "2",
                    "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--out", str(out))
    assert "already complete" in human.stdout and f"training FLOPs: {4 * per_epoch:.4g}" in human.stdout


def test_rigl_counts_its_dense_gradient_steps(tmp_path):
    """rigl with updates at steps 2 and 4 (every 2 steps until 0.75 of 8): those two steps
    also pay the pruned weights' gradient, batch x (dense - sparse) forward multiply-adds."""
    out = tmp_path / "rigl"
    run_cli("train", "--data", "synthetic", "--model", "mlp", "--model-kwargs", '{"hidden_size": 16}',
            "--method", "rigl", "--sparsity", "0.7", "--update-every", "2", "--epochs", "2",
            "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--out", str(out))
    run = RunDir(out)
    kept = sum(int(m.sum()) for m in load_checkpoint(run.checkpoint("cycle_000")).masks.values())
    total = 40 * 16 + 16 * 16 + 16 * 10
    sparse, dense = kept + 42, total + 42
    assert read_meta(run)["training_flops"] == 8 * 64 * 3 * sparse + 2 * 64 * (dense - sparse)


@pytest.mark.parametrize("dense_gradient", [False, True])
def test_counter_is_exact_in_integers(dense_gradient):
    counter = FlopCounter([LayerCost("big", "w", 10**6, 10**9, 0)], total=10**18)
    counter.set_mask({"w": torch.ones(3, dtype=torch.bool)})
    counter.add_step(1, dense_gradient=dense_gradient)
    assert counter.total == 10**18 + 3 * 3 * 10**6 + (10**6 * (10**9 - 3) if dense_gradient else 0)
