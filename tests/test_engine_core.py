"""Schedules, masks, config and cycle plans: oracles and invariants."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparse_training.config import Config, OptimConfig, load_toml, merge, resolve
from sparse_training.errors import UserError
from sparse_training.masks import (MaskedStep, collapsed_layers, is_subset, layer_sparsity, ones_mask,
                                   prunable_parameters, sparsity, validate_mask)
from sparse_training.methods import plan_cycles
from sparse_training.methods.iterative import iterative_sparsities
from sparse_training.schedules import learning_rate


# ---------------------------------------------------------------- schedules

def test_triangular_schedule_shape():
    optim = OptimConfig(lr=0.2, schedule="triangular", warmup_fraction=0.2, warmup_start=0.2)
    lr = [learning_rate(s, 100, optim) for s in range(100)]
    assert lr[0] == pytest.approx(0.04)  # the first step is 0.2 * lr, never full LR
    assert lr[10] == pytest.approx(0.04 + 0.16 * 10 / 20)
    assert lr[20] == pytest.approx(0.2)  # the peak, at the end of the warm-up
    assert lr[60] == pytest.approx(0.1)  # halfway down the linear decay
    assert lr[99] == pytest.approx(0.2 / 80)
    assert max(lr) == pytest.approx(0.2)


def test_step_and_cosine_and_constant_schedules():
    step = OptimConfig(lr=0.1, schedule="step", warmup_fraction=0.0, milestones=(0.5, 0.75), gamma=0.1)
    assert [learning_rate(s, 100, step) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    warm = OptimConfig(lr=0.1, schedule="step", warmup_fraction=0.1, warmup_start=0.0)
    assert learning_rate(0, 100, warm) == 0.0 and learning_rate(5, 100, warm) == pytest.approx(0.05)
    cosine = OptimConfig(lr=1.0, schedule="cosine", warmup_fraction=0.0)
    assert learning_rate(0, 100, cosine) == pytest.approx(1.0)
    assert learning_rate(50, 100, cosine) == pytest.approx(0.5)
    assert learning_rate(25, 100, cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    constant = OptimConfig(lr=0.3, schedule="constant")
    assert {learning_rate(s, 10, constant) for s in range(10)} == {0.3}
    with pytest.raises(ValueError):
        learning_rate(100, 100, constant)


# ---------------------------------------------------------------- masks

def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3))


def test_prunable_parameters_are_conv_and_linear_weights_only():
    assert list(prunable_parameters(_model())) == ["0.weight", "4.weight"]


def test_mask_statistics_by_hand():
    mask = {"a": torch.tensor([True, False, False, False]), "b": torch.tensor([[True, True], [False, True]])}
    assert sparsity(mask) == pytest.approx(4 / 8)
    assert layer_sparsity(mask) == pytest.approx({"a": 0.75, "b": 0.25})
    assert collapsed_layers({"a": torch.zeros(3, dtype=torch.bool), "b": mask["b"]}) == ["a"]
    assert is_subset({"a": mask["a"], "b": mask["b"] & False}, mask)
    assert not is_subset({"a": ~mask["a"], "b": mask["b"]}, mask)


def test_validate_mask_rejects_wrong_names_shapes_and_dtypes():
    model = _model()
    good = ones_mask(model)
    validate_mask(good, model)
    with pytest.raises(UserError, match="missing"):
        validate_mask({"0.weight": good["0.weight"]}, model)
    with pytest.raises(UserError, match="shape"):
        validate_mask({**good, "4.weight": torch.ones(2, 2, dtype=torch.bool)}, model)
    with pytest.raises(UserError, match="bool"):
        validate_mask({**good, "4.weight": torch.ones(3, 24)}, model)


def test_pruned_weights_stay_zero_with_momentum_and_weight_decay():
    model = _model()
    params = prunable_parameters(model)
    generator = torch.Generator().manual_seed(1)
    mask = {name: torch.rand(p.shape, generator=generator) < 0.5 for name, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            p.mul_(mask[name])
    before = {name: p.detach().clone() for name, p in params.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    step = MaskedStep(model, mask, optimizer)
    for i in range(25):
        x = torch.randn(8, 1, 8, generator=generator)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step()
    for name, p in params.items():
        assert torch.count_nonzero(p[~mask[name]]) == 0, name
        assert not torch.equal(p[mask[name]], before[name][mask[name]]), f"{name} did not train"
        buf = optimizer.state[p]["momentum_buffer"]
        assert torch.count_nonzero(buf[~mask[name]]) == 0, f"momentum of pruned {name} survives"


# ---------------------------------------------------------------- config

def test_config_json_round_trip_and_toml_overrides(tmp_path):
    config = resolve(Config().replace("run", method="pai-cyclic", cycles=3).replace("prune", sparsity=0.9, pruner="snip"))
    assert Config.from_json(config.to_json()) == config
    toml = tmp_path / "run.toml"
    toml.write_text('[run]\nmethod = "lrr"\nepochs = 5\n[prune]\nsparsity = 0.8\n[optim]\nmilestones = [0.3, 0.6]\n')
    raw = merge(load_toml(toml), {"run": {"epochs": 7}})
    loaded = resolve(Config.from_dict(raw))
    assert (loaded.run.method, loaded.run.epochs, loaded.prune.sparsity) == ("lrr", 7, 0.8)
    assert loaded.optim.milestones == (0.3, 0.6)
    assert loaded.prune.allocation == "erk"  # random pruner resolves to ERK


@pytest.mark.parametrize("raw, message", [
    ({"prune": {"sparsity": 1.0}, "run": {"method": "pai"}}, "sparsity must be in"),
    ({"prune": {"sparsity": -0.1}, "run": {"method": "pai"}}, "sparsity must be in"),
    ({"run": {"method": "magic"}}, "unknown method"),
    ({"prune": {"pruner": "oracle", "sparsity": 0.5}, "run": {"method": "pai"}}, "unknown pruner"),
    ({"run": {"method": "pai"}}, "needs --sparsity"),
    ({"run": {"method": "sculpt"}, "prune": {"sparsity": 0.5, "initial_sparsity": 0.7}}, "must be higher"),
    ({"run": {"method": "imp", "epochs": 5}, "prune": {"sparsity": 0.5, "rewind_epoch": 6}}, "beyond the cycle"),
    ({"run": {"method": "lrr"}, "prune": {"sparsity": 0.5, "prune_fraction": 1.0}}, "prune-fraction"),
    ({"bogus": {}}, "unknown config section"),
    ({"run": {"epochz": 3}}, "unknown key"),
])
def test_bad_configs_are_user_errors(raw, message):
    with pytest.raises(UserError, match=message):
        resolve(Config.from_dict(raw))


def test_bad_toml_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nmethod=")
    with pytest.raises(UserError, match="not valid TOML"):
        load_toml(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


# ---------------------------------------------------------------- plans

def test_iterative_sparsities_follow_the_geometric_rule():
    levels = iterative_sparsities(0.9, 0.2)
    assert levels[:-1] == pytest.approx([1 - 0.8 ** k for k in range(1, len(levels))])
    assert levels[-1] == 0.9 and levels[-2] < 0.9


def test_plans_of_each_method():
    def plan(method, **prune):
        raw = {"run": {"method": method, "cycles": 3, "epochs": 4}, "prune": {"sparsity": 0.5, **prune}}
        return plan_cycles(resolve(Config.from_dict(raw)))

    pai = plan("pai")
    assert len(pai) == 1 and pai[0].epochs == 12 and pai[0].mask_change.sparsity == 0.5
    cyclic = plan("pai-cyclic")
    assert [p.epochs for p in cyclic] == [4, 4, 4] and cyclic[0].mask_change and not cyclic[1].mask_change
    imp = plan("imp", rewind_epoch=1)
    assert imp[0].mask_change is None and imp[0].save_rewind_at == 1
    assert [p.mask_change.sparsity for p in imp[1:]] == pytest.approx([0.2, 0.36, 0.488, 0.5])
    assert {p.weights for p in imp[1:]} == {"rewind"}
    assert {p.weights for p in plan("lrr")[1:]} == {"continue"}
    sculpt = plan("sculpt", initial_sparsity=0.2)
    assert len(sculpt) == 4 and sculpt[0].mask_change.sparsity == 0.2
    assert sculpt[-1].mask_change.criterion == "magnitude" and sculpt[-1].mask_change.sparsity == 0.5
