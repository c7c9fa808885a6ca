"""Interpolation paths (landscape.interpolate) against independent computations: a linear
classifier's path in closed form, identical endpoints, a permuted MLP, BatchNorm statistics
recomputed by hand."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from landscape.barrier import with_barriers
from landscape.interpolate import PathSettings, check_compatible, evaluate_states_path, recompute_bn_statistics
from landscape.settings import validated
from sparse_training.checkpoint import Checkpoint
from sparse_training.config import DataConfig, ModelConfig
from sparse_training.data.tensors import TensorData
from sparse_training.errors import UserError
from sparse_training.trainer import evaluate


def blobs(n_train=240, n_test=120, dim=8, classes=4, seed=0) -> TensorData:
    """Classes as Gaussian blobs around the vertices of a hypercube's XOR pattern: learnable
    by an MLP, not linearly separable in the first two coordinates."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        corner = torch.randint(0, 2, (n, 2), generator=g)
        y = corner[:, 0] * 2 + (corner[:, 0] ^ corner[:, 1])
        x = torch.randn(n, dim, generator=g) * 0.35
        x[:, :2] += corner * 2.0 - 1.0
        return x, y

    return TensorData("blobs", *draw(n_train), *draw(n_test), num_classes=classes)


def train(model: nn.Module, data: TensorData, steps=150, lr=0.1, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    epoch = 0
    while steps > 0:
        for x, y in data.train_batches(32, seed, epoch, augment=False):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            steps -= 1
            if steps == 0:
                break
        epoch += 1
    return model.eval()


def mlp(seed: int, dim=8, hidden=32, classes=4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def bn_net(seed: int, dim=8, hidden=32, classes=4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, classes))


def path(model_a: nn.Module, model_b: nn.Module, data, **settings):
    scratch = copy.deepcopy(model_a)
    return evaluate_states_path(scratch, model_a.state_dict(), model_b.state_dict(), data,
                                validated(PathSettings(**{"batch_size": 64, **settings})), "cpu")


def as_dataset(curves) -> xr.Dataset:
    dims = ("split", "alpha")
    coords = {"alpha": curves.alpha, "split": list(curves.splits)}
    return with_barriers(xr.Dataset({"error": (dims, curves.error), "loss": (dims, curves.loss)}, coords=coords))


@pytest.fixture(scope="module")
def data() -> TensorData:
    return blobs()


def test_linear_classifier_path_matches_closed_form(data):
    # Logits are linear in the parameters, so along the line z(a) = (1-a) z_A + a z_B exactly.
    torch.manual_seed(1)
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    curves = path(a, b, data, points=9)
    ds = as_dataset(curves)
    alpha = np.linspace(0, 1, 9)
    np.testing.assert_array_equal(curves.alpha, alpha)
    for i, split in enumerate(("train", "test")):
        x, y = data.x[split].double().numpy(), data.y[split].numpy()
        za = x @ a.weight.detach().double().numpy().T + a.bias.detach().double().numpy()
        zb = x @ b.weight.detach().double().numpy().T + b.bias.detach().double().numpy()
        z = (1 - alpha)[:, None, None] * za + alpha[:, None, None] * zb  # (alpha, n, class)
        zmax = z.max(-1, keepdims=True)
        logsumexp = (zmax + np.log(np.exp(z - zmax).sum(-1, keepdims=True)))[..., 0]
        loss = (logsumexp - np.take_along_axis(z, y[None, :, None], -1)[..., 0]).mean(-1)
        error = (z.argmax(-1) != y).mean(-1)
        np.testing.assert_allclose(curves.loss[i], loss, rtol=1e-5)
        np.testing.assert_allclose(curves.error[i], error, rtol=0, atol=1e-12)
        for name, values in (("error", error), ("loss", loss)):
            chord = (1 - alpha) * values[0] + alpha * values[-1]
            assert float(ds[f"{name}_barrier"][i]) == pytest.approx(values.max() - (values[0] + values[-1]) / 2, abs=1e-5)
            assert float(ds[f"{name}_barrier_linear"][i]) == pytest.approx((values - chord).max(), abs=1e-5)
        assert float(ds.loss_barrier_alpha[i]) == alpha[loss.argmax()]


def test_identical_endpoints_give_zero_barriers_with_bn_recompute(data):
    net = train(bn_net(0), data, steps=40)
    curves = path(net, copy.deepcopy(net), data, points=5, bn="recompute", bn_batches=3)
    ds = as_dataset(curves)
    assert curves.bn_batches_used == 3
    for name in ("error_barrier", "error_barrier_linear", "loss_barrier", "loss_barrier_linear"):
        np.testing.assert_allclose(ds[name].values, 0.0, atol=1e-12)
    np.testing.assert_array_equal(curves.loss, curves.loss[:, :1].repeat(5, axis=1))


def permuted(model: nn.Sequential, seed: int) -> nn.Sequential:
    """The same function with the units of both hidden layers permuted."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    first, second, head = out[0], out[2], out[4]
    p1, p2 = torch.randperm(first.out_features, generator=g), torch.randperm(second.out_features, generator=g)
    with torch.no_grad():
        first.weight.copy_(first.weight[p1]); first.bias.copy_(first.bias[p1])
        second.weight.copy_(second.weight[p2][:, p1]); second.bias.copy_(second.bias[p2])
        head.weight.copy_(head.weight[:, p2])
    return out


def test_permuted_mlp_has_equal_endpoints_and_a_barrier(data):
    net = train(mlp(0, hidden=16), data, steps=200)
    twin = permuted(net, seed=3)
    x = data.x["test"]
    torch.testing.assert_close(twin(x), net(x), rtol=1e-5, atol=1e-5)
    curves = path(net, twin, data, points=11)
    ds = as_dataset(curves)
    np.testing.assert_array_equal(curves.error[:, 0], curves.error[:, -1])
    np.testing.assert_allclose(curves.loss[:, 0], curves.loss[:, -1], rtol=1e-5)
    assert curves.error[1, 0] < 0.15  # the network has learned the task
    assert (ds.error_barrier.values > 0.1).all()
    assert (ds.loss_barrier.values > 0.1).all()
    assert 0 < float(ds.error_barrier_alpha.sel(split="test")) < 1


def test_endpoint_state_dicts_are_never_modified(data):
    a, b = train(bn_net(0), data, steps=30), train(bn_net(1), data, steps=30)
    state_a = {k: v.clone() for k, v in a.state_dict().items()}
    state_b = {k: v.clone() for k, v in b.state_dict().items()}
    path(a, b, data, points=3, bn="recompute")
    for before, model in ((state_a, a), (state_b, b)):
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)


def test_recomputed_statistics_are_the_plain_average_over_batches(data):
    # Dropout before the first BatchNorm would change its statistics if it were active.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 4))
    model[1].running_mean.fill_(5.0)
    batches = list(data.train_batches(50, 7, 0, augment=False))[:3]
    used = recompute_bn_statistics(model, iter(batches), 3, "cpu")
    assert used == 3 and not model.training and model[1].momentum == 0.1
    means = torch.stack([x.mean(0) for x, _ in batches]).mean(0)
    variances = torch.stack([x.var(0, unbiased=True) for x, _ in batches]).mean(0)
    torch.testing.assert_close(model[1].running_mean, means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, variances, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def trained_bn_pair(data):
    return train(bn_net(0), data, steps=60, seed=0), train(bn_net(1), data, steps=60, seed=1)


def test_bn_interpolate_endpoints_reproduce_each_checkpoints_own_evaluation(data, trained_bn_pair):
    a, b = trained_bn_pair
    for mode in ("interpolate", "none"):
        curves = path(a, b, data, points=5, bn=mode)
        for i, split in enumerate(("train", "test")):
            own_a, own_b = evaluate(a, data, split, 64), evaluate(b, data, split, 64)
            assert curves.loss[i, 0] == own_a["loss"] and curves.error[i, 0] == 1 - own_a["accuracy"]
            assert curves.loss[i, -1] == own_b["loss"] and curves.error[i, -1] == 1 - own_b["accuracy"]
        assert curves.bn_batches_used == 0


def test_bn_recompute_treats_endpoints_like_every_point(data, trained_bn_pair):
    a, b = trained_bn_pair
    curves = path(a, b, data, points=5, bn="recompute", bn_batches=2, seed=4)
    recomputed = copy.deepcopy(a)
    recompute_bn_statistics(recomputed, data.train_batches(64, 4, 0, augment=False), 2, "cpu")
    assert curves.loss[1, 0] == evaluate(recomputed, data, "test", 64)["loss"]
    assert curves.loss[1, 0] != evaluate(a, data, "test", 64)["loss"]


def test_bn_interpolate_and_recompute_give_different_midpoints(data, trained_bn_pair):
    a, b = trained_bn_pair
    interpolated = path(a, b, data, points=3, bn="interpolate")
    recomputed = path(a, b, data, points=3, bn="recompute")
    assert abs(interpolated.loss[1, 1] - recomputed.loss[1, 1]) > 1e-3


def test_samples_evaluate_the_fixed_seeded_subset(data):
    torch.manual_seed(2)
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    curves = path(a, b, data, points=2, samples=50, seed=9, splits=("test",))
    assert curves.samples == {"test": 50} and curves.splits == ("test",)
    subset = data.subset_indices("test", 50, 9)
    assert curves.loss[0, 0] == evaluate(a, data, "test", 64, indices=subset)["loss"]
    assert path(a, b, data, points=2, samples=10_000).samples == {"train": 240, "test": 120}


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="--points must be at least 2"):
        validated(PathSettings(points=1))
    with pytest.raises(UserError, match="--bn-batches"):
        validated(PathSettings(bn_batches=0))
    with pytest.raises(UserError, match="--samples"):
        validated(PathSettings(samples=0))


def checkpoint(model_config: ModelConfig, state: dict, data="synthetic") -> Checkpoint:
    return Checkpoint(path=Path(f"{model_config.name}.pt"), state_dict=state, masks={},
                      model=model_config, data=DataConfig(name=data), label="x")


def test_incompatible_checkpoints_are_user_errors():
    small, wide = mlp(0).state_dict(), mlp(0, hidden=16).state_dict()
    config = ModelConfig("mlp", {"hidden_size": 32})
    with pytest.raises(UserError, match="same architecture"):
        check_compatible(checkpoint(config, small), checkpoint(ModelConfig("cnn1d", {}), small))
    with pytest.raises(UserError, match=r"\(32, 8\).*\(16, 8\)"):
        check_compatible(checkpoint(config, small), checkpoint(config, wide))
    with pytest.raises(UserError, match="same data"):
        check_compatible(checkpoint(config, small), checkpoint(config, small, data="mnist1d"))
