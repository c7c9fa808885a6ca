"""Methods and pruning criteria are plug-ins: one class and one `register` call, and the CLI,
the config's choices and the figures' styles follow from the registry."""

from __future__ import annotations

import json

import pytest
import torch

from cli.train import train
from conftest import run_cli, train_tiny
from sparse_training import methods, pruners
from sparse_training.checkpoint import load_checkpoint
from sparse_training.errors import UserError
from sparse_training.masks import kept_count, ones_mask, prunable_parameters, total_count
from sparse_training.methods import CyclePlan, Method, Pruning, Style
from sparse_training.pruners import Criterion
from sparse_training.rundir import RunDir


class OneShotMagnitude(Method):
    """One cycle after pruning the initial weights by global magnitude."""

    def plan(self, config):
        return [CyclePlan(0, config.run.epochs, Pruning("magnitude", "global", config.prune.sparsity))]


class SmallestFirst(Criterion):
    """Keeps the smallest weights: the opposite of magnitude pruning."""

    name = "smallest-first"
    needs_data = False

    def score(self, model, mask, inputs):
        params = prunable_parameters(model)
        return {name: -params[name].detach().abs() for name in mask}


@pytest.fixture
def toy_method():
    method = methods.register(OneShotMagnitude("toy-oneshot", Style("#123456", "p")))
    yield method
    methods.METHODS.unregister(method.name)


@pytest.fixture
def toy_criterion():
    criterion = pruners.register(SmallestFirst())
    yield criterion
    pruners.CRITERIA.unregister(criterion.name)


def _choices(name: str) -> tuple[str, ...]:
    return tuple(next(p for p in train.params if p.name == name).type.choices)


def _initial_model(run: RunDir):
    return load_checkpoint(run.checkpoint("init")).build_model()


def test_the_cli_offers_exactly_the_registered_names():
    assert _choices("run__method") == methods.names()
    assert _choices("prune__pruner") == pruners.names()


def test_a_registered_method_trains_through_the_cli_and_is_listed(toy_method, tmp_path):
    assert "[" + "|".join(methods.names()) + "]" in run_cli("train", "--help").stdout
    assert methods.names()[-1] == "toy-oneshot"
    run = RunDir(train_tiny(tmp_path / "toy", "--method", "toy-oneshot", "--sparsity", "0.5"))
    assert run.is_done() and run.cycle_labels() == ["cycle_000"]
    assert json.loads(run.config.read_text())["run"]["method"] == "toy-oneshot"
    final = load_checkpoint(run.checkpoint("cycle_000"))
    assert final.method == "toy-oneshot" and kept_count(final.masks) == round(0.5 * total_count(final.masks))
    model = _initial_model(run)
    expected = pruners.magnitude_prune(model, ones_mask(model), 0.5)
    assert all(torch.equal(final.masks[name], expected[name]) for name in expected)
    assert methods.style_table()["toy-oneshot"] == {"colour": "#123456", "marker": "p", "levelwise": False}


def test_a_registered_criterion_is_usable_with_pruner(toy_criterion, tmp_path):
    assert "smallest-first" in run_cli("train", "--help").stdout
    run = RunDir(train_tiny(tmp_path / "smallest", "--method", "pai", "--pruner", "smallest-first",
                            "--sparsity", "0.5", "--epochs", "1"))
    assert json.loads(run.config.read_text())["prune"]["allocation"] == "global"  # the criterion's default
    model = _initial_model(run)
    kept = load_checkpoint(run.checkpoint("cycle_000")).masks
    weights = torch.cat([p.detach().abs().flatten() for p in prunable_parameters(model).values()])
    kept_weights = torch.cat([p.detach().abs()[kept[name]] for name, p in prunable_parameters(model).items()])
    assert kept_weights.numel() == round(0.5 * weights.numel())
    assert kept_weights.max() <= weights.sort().values[kept_weights.numel()]  # the smallest ones


@pytest.mark.parametrize("registry", [methods, pruners])
def test_an_unknown_name_is_a_one_line_user_error_listing_the_known_ones(registry):
    with pytest.raises(UserError) as caught:
        registry.get("nope")
    message = str(caught.value)
    assert "'nope'" in message and "\n" not in message
    assert all(name in message for name in registry.names())


def test_a_name_is_registered_once(toy_method):
    with pytest.raises(ValueError, match="registered already"):
        methods.register(OneShotMagnitude("toy-oneshot", Style("#654321", "p")))
