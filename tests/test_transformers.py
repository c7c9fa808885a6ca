"""Transformers and mobile CNNs through the engine: what the masks cover (built-in and tv:
models), exact kept counts and ERK's formula on attention and depthwise layers, every pruner
on a ViT, pruned attention weights exactly zero through AdamW training, AdamW's decay groups,
and one short CPU run of each new model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_cli
from sparse_training.checkpoint import load_checkpoint
from sparse_training.config import ALLOCATIONS, Config, DataConfig, OptimConfig
from sparse_training.data import load_data
from sparse_training.errors import UserError
from sparse_training.masks import MaskedStep, apply_mask_, kept_count, ones_mask, prunable_parameters, total_count
from sparse_training.models import build_model, model_config_for, sized_model
from sparse_training.procedures import UserInterrupted, train_run
from sparse_training.pruners import prune
from sparse_training.pruners.allocation import erk_densities, layer_keep_counts
from sparse_training.trainer import make_optimizer

TINY_VIT1D = {"width": 16, "depth": 2, "heads": 2}
SEQUENCE, IMAGE = (40,), (3, 32, 32)


def built(name: str, kwargs: dict, shape: tuple[int, ...], seed: int = 0, meta: bool = False) -> nn.Module:
    config = model_config_for(name, kwargs, 10, shape)
    if meta:
        return sized_model(config)
    torch.manual_seed(seed)
    return build_model(config)


def weight_matrices(model: nn.Module) -> set[str]:
    """What a user calls prunable, found independently of masks.py: every parameter with two
    or more axes, except class tokens and position embeddings (named as in our ViTs and
    torchvision's) and embedding tables."""
    tables = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return {name for name, p in model.named_parameters()
            if p.dim() >= 2 and name not in tables and not any(t in name for t in ("token", "pos_embed"))}


# ---------------------------------------------------------------- what is prunable

@pytest.mark.parametrize("name, kwargs, shape, attention_layers", [
    ("vit1d", TINY_VIT1D, SEQUENCE, 2),
    ("vit", {"width": 16, "depth": 3, "heads": 4}, IMAGE, 3),
    ("mobilenetv2", {"width": 0.25}, IMAGE, 0),
    ("tv:vit_b_16", {}, IMAGE, 12),
    ("tv:mobilenet_v2", {}, IMAGE, 0),
    ("tv:efficientnet_b0", {}, IMAGE, 0),
])
def test_masks_cover_every_weight_matrix_and_nothing_else(name, kwargs, shape, attention_layers):
    model = built(name, kwargs, shape, meta=True)
    found = prunable_parameters(model)
    assert set(found) == weight_matrices(model)
    assert sum(key.endswith("in_proj_weight") for key in found) == attention_layers
    assert sum(key.endswith("out_proj.weight") for key in found) == attention_layers
    one_dimensional = {name for name, p in model.named_parameters() if p.dim() == 1}
    assert one_dimensional and not one_dimensional & set(found)  # biases and norms are never pruned
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1 and m.groups == m.in_channels]
    assert bool(depthwise) == ("mobilenet" in name or "efficientnet" in name)
    assert sum(isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear)) for m in model.modules()) + attention_layers == len(found)


def test_separate_query_key_value_projections_are_prunable():
    attention = nn.MultiheadAttention(8, 2, kdim=3, vdim=5)
    assert list(prunable_parameters(attention)) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]


# ---------------------------------------------------------------- allocations

@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_every_allocation_keeps_exact_counts_on_attention_layers(allocation):
    model = built("vit1d", TINY_VIT1D, SEQUENCE)
    dense = ones_mask(model)
    mask = prune(model, dense, criterion="random", allocation=allocation, sparsity=0.8)
    assert kept_count(mask) == round(0.2 * total_count(dense))
    if allocation != "global":
        shapes = {name: tuple(m.shape) for name, m in dense.items()}
        expected = layer_keep_counts(shapes, kept_count(mask), allocation)
        assert {name: int(m.sum()) for name, m in mask.items()} == expected


def test_erk_on_fused_attention_and_depthwise_layers_follows_the_stated_formula():
    # Fused (3E, E): (3E + E) / (3E * E); out_proj (E, E): 2E / E^2; ratio 2/3 for any E.
    vit = built("vit1d", TINY_VIT1D, SEQUENCE, meta=True)
    shapes = {name: tuple(p.shape) for name, p in prunable_parameters(vit).items()}
    densities = erk_densities(shapes, 0.05)
    assert densities["blocks.0.attn.in_proj_weight"] / densities["blocks.0.attn.out_proj.weight"] == pytest.approx(2 / 3)
    # Depthwise (C, 1, 3, 3): (C + 1 + 3 + 3) / (9C); a 1x1 conv (Co, Ci, 1, 1): (Co + Ci + 2) / (Co Ci).
    mobile = built("mobilenetv2", {"width": 0.25}, IMAGE, meta=True)
    shapes = {name: tuple(p.shape) for name, p in prunable_parameters(mobile).items()}
    densities = erk_densities(shapes, 0.02)
    depthwise = next(n for n, s in shapes.items() if len(s) == 4 and s[1] == 1 and s[2] == 3)
    pointwise = next(n for n, s in shapes.items() if len(s) == 4 and s[2] == 1 and s[0] > 8 and s[1] > 8)
    c, (co, ci) = shapes[depthwise][0], shapes[pointwise][:2]
    assert max(densities.values()) < 1  # none capped at this density, so the ratio is the formula's
    assert densities[depthwise] / densities[pointwise] == pytest.approx(((c + 7) / (9 * c)) / ((co + ci + 2) / (co * ci)))


@pytest.mark.parametrize("criterion", ["magnitude", "snip", "grasp", "synflow"])
def test_every_scored_pruner_prunes_attention_to_the_exact_count(criterion):
    model = built("vit1d", TINY_VIT1D, SEQUENCE)
    data = load_data(DataConfig(name="synthetic"))
    dense = ones_mask(model)
    mask = prune(model, dense, criterion=criterion, allocation="global", sparsity=0.7, data=data, batch_size=64,
                 synflow_rounds=5)
    assert kept_count(mask) == round(0.3 * total_count(dense))
    attention = [m for name, m in mask.items() if "attn" in name]
    assert attention and all(0 < int(m.sum()) < m.numel() for m in attention)  # scored, neither kept whole nor emptied


# ---------------------------------------------------------------- AdamW

def test_adamw_decays_only_the_weight_matrices():
    model = built("vit1d", TINY_VIT1D, SEQUENCE)
    optimizer = make_optimizer(model, OptimConfig(optimizer="adamw", weight_decay=0.05))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[id(p)] for p in decayed["params"]} == set(prunable_parameters(model))
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    sgd = make_optimizer(model, OptimConfig(optimizer="sgd"))
    assert len(sgd.param_groups) == 1 and sgd.param_groups[0]["weight_decay"] == 5e-4


def test_pruned_attention_weights_stay_exactly_zero_through_adamw_steps():
    model = built("vit1d", TINY_VIT1D, SEQUENCE)
    mask = prune(model, ones_mask(model), criterion="random", allocation="erk", sparsity=0.9)
    apply_mask_(model, mask)
    optimizer = make_optimizer(model, OptimConfig(optimizer="adamw", lr=1e-2, weight_decay=0.05))
    step = MaskedStep(model, mask, optimizer)
    before = {name: p.detach().clone() for name, p in prunable_parameters(model).items()}
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        step()
    for name, p in prunable_parameters(model).items():
        assert torch.all(p[~mask[name]] == 0), name
        assert not torch.equal(p[mask[name]], before[name][mask[name]]), name  # the kept ones trained


def test_torchvision_vit_builds_prunes_and_trains():
    torch.manual_seed(0)
    model = build_model(model_config_for("tv:vit_b_16", {}, 10, IMAGE))  # image_size from the data
    mask = prune(model, ones_mask(model), criterion="magnitude", allocation="erk", sparsity=0.9)
    apply_mask_(model, mask)
    optimizer = make_optimizer(model, OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(2, *IMAGE)), torch.tensor([1, 2])).backward()
    optimizer.step()
    MaskedStep(model, mask, optimizer)()
    fused = model.encoder.layers.encoder_layer_0.self_attention.in_proj_weight
    kept = mask["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"]
    assert torch.all(fused[~kept] == 0) and 0 < int(kept.sum()) < kept.numel()
    assert kept_count(mask) == round(0.1 * total_count(mask))


# ---------------------------------------------------------------- short CPU runs

def _images(tmp_path) -> str:
    """CIFAR-shaped npz data: 32 train and 16 test images, 4 classes."""
    generator = np.random.default_rng(0)
    arrays = {"x_train": generator.normal(size=(32, *IMAGE)).astype("float32"),
              "x_test": generator.normal(size=(16, *IMAGE)).astype("float32"),
              "y_train": np.arange(32) % 4, "y_test": np.arange(16) % 4}
    np.savez(tmp_path / "images.npz", **arrays)
    return f"npz:{tmp_path / 'images.npz'}"


@pytest.mark.parametrize("model, kwargs, images", [
    ("vit1d", TINY_VIT1D, False),
    ("vit", {"width": 16, "depth": 1, "heads": 2}, True),
    ("mobilenetv2", {"width": 0.25}, True),
    ("tv:mobilenet_v2", {"width_mult": 0.25}, True),
    ("tv:efficientnet_b0", {}, True),
])
def test_one_epoch_sparse_run_of_each_new_model(tmp_path, model, kwargs, images):
    data = _images(tmp_path) if images else "synthetic"
    out = tmp_path / "run"
    summary = json.loads(run_cli(
        "train", "--data", data, "--model", model, "--model-kwargs", json.dumps(kwargs), "--method", "pai",
        "--pruner", "random", "--sparsity", "0.8", "--epochs", "1", "--batch-size", "16", "--optimizer", "adamw",
        "--lr", "1e-3", "--weight-decay", "0.05", "--schedule", "cosine", "--warmup-fraction", "0.3",
        "--device", "cpu", "--out", str(out), "--json").stdout)
    assert summary["training_flops"] > 0 and math.isfinite(summary["test_loss"])
    final = load_checkpoint(out / "checkpoints" / "cycle_000.pt")
    assert kept_count(final.masks) == round(0.2 * total_count(final.masks))
    for name, kept in final.masks.items():
        assert torch.all(final.state_dict[name][~kept] == 0), name


def test_cifar10_vit_preset_trains_with_its_recipe(tmp_path):
    preset = Path(__file__).parent.parent / "presets" / "cifar10-vit.toml"
    out = tmp_path / "run"
    run_cli("train", "--config", str(preset), "--data", _images(tmp_path), "--model-kwargs",
            '{"width": 16, "depth": 1, "heads": 2}', "--epochs", "1", "--cycles", "2", "--batch-size", "16",
            "--device", "cpu", "--out", str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["name"] == "vit" and config["run"]["method"] == "pai-cyclic"
    assert {k: config["optim"][k] for k in ("optimizer", "lr", "weight_decay", "schedule")} == {
        "optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.05, "schedule": "cosine"}
    assert config["prune"]["sparsity"] == 0.9
    assert load_checkpoint(out / "checkpoints" / "cycle_001.pt").sparsity == pytest.approx(0.9, abs=1e-3)


def test_rigl_moves_attention_masks_at_constant_sparsity_with_adamw(tmp_path):
    out = tmp_path / "rigl"
    run_cli("train", "--data", "synthetic", "--model", "vit1d", "--model-kwargs", json.dumps(TINY_VIT1D),
            "--method", "rigl", "--sparsity", "0.8", "--update-every", "2", "--epochs", "2", "--batch-size", "32",
            "--optimizer", "adamw", "--lr", "3e-3", "--save-every", "1", "--device", "cpu", "--out", str(out))
    # 8 steps per epoch, updates every 2 steps until step 12: the mask still moves after epoch 1.
    middle, final = (load_checkpoint(out / "checkpoints" / f"{label}.pt") for label in ("cycle_000_epoch_001", "cycle_000"))
    assert kept_count(final.masks) == kept_count(middle.masks) == round(0.2 * total_count(final.masks))
    name = "blocks.0.attn.in_proj_weight"
    assert not torch.equal(final.masks[name], middle.masks[name])  # drop and grow reached the fused projection
    for key, kept in final.masks.items():
        assert torch.all(final.state_dict[key][~kept] == 0), key


def test_adamw_vit_run_resumes_bitwise_and_a_one_group_state_is_explained(tmp_path):
    from test_train import StopAfter

    config = Config.from_dict({"data": {"name": "synthetic"}, "model": {"name": "vit1d", "kwargs": TINY_VIT1D},
                               "optim": {"optimizer": "adamw", "batch_size": 64, "lr": 3e-3, "weight_decay": 0.05},
                               "run": {"method": "pai-cyclic", "cycles": 2, "epochs": 1, "device": "cpu"},
                               "prune": {"sparsity": 0.7}})
    quiet = lambda message: None  # noqa: E731
    train_run(config, tmp_path / "straight", log=quiet)
    with pytest.raises(UserInterrupted):
        train_run(config, tmp_path / "resumed", log=quiet, stop=StopAfter(6))  # in the second cycle
    saved = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    train_run(config, tmp_path / "resumed", resume=True, log=quiet)
    for label in ("cycle_000", "cycle_001"):
        a, b = (load_checkpoint(tmp_path / run / "checkpoints" / f"{label}.pt").state_dict for run in ("straight", "resumed"))
        assert all(torch.equal(a[k], b[k]) for k in a), label

    # A state written when adamw had one group (every parameter decayed) is not "damaged".
    with pytest.raises(UserInterrupted):
        train_run(config, tmp_path / "legacy", log=quiet, stop=StopAfter(6))
    groups = saved["optimizer"]["param_groups"]
    saved["optimizer"]["param_groups"] = [{**groups[0], "params": sorted(p for g in groups for p in g["params"])}]
    torch.save(saved, tmp_path / "legacy" / "state.pt")
    with pytest.raises(UserError, match="saved when adamw decayed every parameter"):
        train_run(config, tmp_path / "legacy", resume=True, log=quiet)
