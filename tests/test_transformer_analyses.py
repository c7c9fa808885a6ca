"""Every analysis on a tiny ViT (vit1d), on CPU: Hessian-vector products through attention
against a dense Hessian, barriers of a model with LayerNorm and BatchNorm against a hand
recomputation, and connectivity, sharpness, signs, overlap and surfaces through the CLI;
alignment refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import run_cli
from landscape import store
from landscape.hessian import HessianOperator
from landscape.interpolate import evaluate_states_path
from landscape.settings import PathSettings
from sparse_training.acceleration import twice_differentiable
from sparse_training.checkpoint import load_checkpoint
from sparse_training.config import DataConfig
from sparse_training.data import load_data
from sparse_training.models import build_model, model_config_for
from test_hessian import dense_hessian, restricted

TINY = {"width": 8, "depth": 1, "heads": 2, "patch_size": 8}


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """pai-cyclic, random ERK mask at 0.5, 3 cycles of 1 epoch, AdamW."""
    out = tmp_path_factory.mktemp("vit") / "run"
    run_cli("train", "--data", "synthetic", "--model", "vit1d", "--model-kwargs", json.dumps(TINY), "--epochs", "1",
            "--batch-size", "32", "--optimizer", "adamw", "--lr", "3e-3", "--weight-decay", "0.05",
            "--method", "pai-cyclic", "--pruner", "random", "--sparsity", "0.5", "--cycles", "3", "--device", "cpu",
            "--out", str(out))
    return out


def as_json(*args: str) -> dict:
    return json.loads(run_cli(*args, "--json").stdout)


# ---------------------------------------------------------------- oracles

def test_hessian_products_through_attention_equal_the_dense_hessian():
    torch.manual_seed(0)
    model = build_model(model_config_for("vit1d", {**TINY, "width": 4, "patch_size": 4}, 5, (12,))).double().eval()
    x, y = torch.randn(20, 12, dtype=torch.float64), torch.randint(0, 5, (20,))
    mask = {name: torch.rand(p.shape) > 0.4 for name, p in model.named_parameters()
            if name.endswith(("in_proj_weight", "out_proj.weight"))}
    with twice_differentiable():
        hessian = dense_hessian(model, x, y)
    op = HessianOperator(model, [(x[:12], y[:12]), (x[12:], y[12:])], mask)
    for seed in range(2):
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        torch.testing.assert_close(op.matvec(v), restricted(hessian, model, mask) @ v, rtol=1e-9, atol=1e-11)


class Hybrid(nn.Module):
    """Conv + BatchNorm stem, then one pre-norm attention block with LayerNorm."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv1d(1, 8, 4, stride=4), nn.BatchNorm1d(8)
        self.norm, self.attn = nn.LayerNorm(8), nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        tokens = torch.relu(self.bn(self.stem(x.unsqueeze(1)))).transpose(1, 2)
        h = self.norm(tokens)
        return self.head((tokens + self.attn(h, h, h, need_weights=False)[0]).mean(1))


def test_barrier_recomputes_batchnorm_and_interpolates_layernorm():
    data = load_data(DataConfig(name="synthetic"))
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append({k: v.clone() for k, v in Hybrid().state_dict().items()})
    settings = PathSettings(points=3, splits=("test",), bn_batches=2, batch_size=64)
    curves = evaluate_states_path(Hybrid(), states[0], states[1], data, settings, "cpu")
    assert curves.bn_batches_used == 2
    # By hand at the midpoint: the average state, BatchNorm's statistics as the plain average of
    # the per-batch mean and unbiased variance of its input over the first two batches.
    middle = Hybrid()
    middle.load_state_dict({k: (a + b) / 2 if a.is_floating_point() else a for (k, a), b in
                            zip(states[0].items(), states[1].values())})
    inputs = []
    for x, _ in list(data.train_batches(64, settings.seed, 0, augment=False))[:2]:
        with torch.no_grad():
            inputs.append(middle.stem(x.unsqueeze(1)))
    middle.bn.running_mean = torch.stack([t.mean((0, 2)) for t in inputs]).mean(0)
    middle.bn.running_var = torch.stack([t.var((0, 2), unbiased=True) for t in inputs]).mean(0)
    middle.eval()
    x, y = data.x["test"], data.y["test"]  # synthetic data: no normalisation
    with torch.no_grad():
        logits = middle(x)
    assert curves.loss[0, 1] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert curves.error[0, 1] == pytest.approx((logits.argmax(1) != y).float().mean().item(), abs=1e-9)


# ---------------------------------------------------------------- the commands on a ViT run

def test_connectivity_sharpness_signs_and_overlap_on_a_vit_run(vit_run):
    connectivity = as_json("connectivity", str(vit_run), "--points", "3")
    assert len(connectivity["pairs"]) == 2
    ds = store.read_dataset(vit_run / "analysis" / "connectivity.nc")
    assert np.isfinite(ds.loss.values).all() and (ds.bn_batches_used == 0).all()  # LayerNorm only: nothing recomputed

    sharpness = as_json("sharpness", str(vit_run), "--checkpoints", "cycle_002", "--samples", "64", "--batch-size", "32", "--max-hvp", "20")
    assert np.isfinite(sharpness["checkpoints"]["cycle_002"]["eigenvalues"][0])

    signs = as_json("signs", str(vit_run))
    final = load_checkpoint(vit_run / "checkpoints" / "cycle_002.pt")
    init = load_checkpoint(vit_run / "checkpoints" / "init.pt")
    name = "blocks.0.attn.in_proj_weight"
    kept = final.masks[name]
    flipped = int(((init.state_dict[name] * final.state_dict[name] < 0) & kept).sum())
    ds = store.read_dataset(vit_run / "analysis" / "signs.nc")
    assert int(ds.flipped.sel(pair=signs["pairs"][-1]["pair"], layer=name)) == flipped

    overlap = as_json("overlap", str(vit_run), "--across-cycles")
    ds = store.read_dataset(vit_run / "analysis" / "overlap.nc")
    assert overlap["computed"] and float(ds.jaccard_total.min()) == 1.0  # pai keeps one mask in every cycle


def test_surface_through_three_vit_checkpoints(vit_run):
    result = as_json("surface", str(vit_run), "--through", "cycle_000,cycle_001,cycle_002", "--grid", "3")
    ds = store.read_dataset(result["output"])
    assert np.isfinite(ds.loss.values).all() and ds.loss.shape[-2:] == (3, 3)
    for index, label in enumerate(("cycle_000", "cycle_001", "cycle_002")):
        # Each checkpoint at its own coordinates is the network evaluated after its epoch.
        metrics = load_checkpoint(vit_run / "checkpoints" / f"{label}.pt").metrics
        assert float(ds.checkpoint_loss.sel(split="test").values[index]) == pytest.approx(metrics["test_loss"], rel=1e-5)


def test_alignment_of_a_vit_is_refused_in_one_line(vit_run, tmp_path):
    result = run_cli("connectivity", str(vit_run), "--align", "weights", "--out", str(tmp_path / "c.nc"), expect=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "blocks.0.attn (MultiheadAttention)" in lines[0] and "without --align" in lines[0]
    assert not (tmp_path / "c.nc").exists()
