"""Pruners against hand-computed oracles: exact kept counts per allocation, ERK and
ER-balanced by hand, SNIP/SynFlow/GraSP against closed forms and a dense Hessian, and the
invariants (masks only shrink, scoring leaves the model alone, random is seeded)."""

import copy

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

from sparse_training import pruners
from sparse_training.errors import UserError
from sparse_training.masks import collapsed_layers, is_subset, kept_count, ones_mask, prunable_parameters

ALLOCATIONS = ("global", "uniform", "erk", "er-balanced")
CRITERIA = ("random", "magnitude", "snip", "synflow", "grasp")


class TensorData:
    """Stands in for sparse_training.data.Data: the members the pruners use."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y
        self.input_shape = tuple(x.shape[1:])

    def train_batches(self, batch_size, seed, epoch, augment=True):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(1000 * seed + epoch))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            yield self.x[index], self.y[index]


def three_layer_model() -> nn.Module:
    """Prunable shapes: conv (4, 4, 3) = 48, linear (16, 16) = 256, linear (2, 16) = 32; 336 in all.
    Input (4, 6)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(4, 4, 3), nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


CONV, HIDDEN, OUT = "0.weight", "2.weight", "4.weight"
SHAPES = {CONV: (4, 4, 3), HIDDEN: (16, 16), OUT: (2, 16)}


def counts(mask):
    return {name: int(m.sum()) for name, m in mask.items()}


def tensor_data(input_shape, classes, n=32, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *input_shape), generator=g, dtype=dtype)
    return TensorData(x, torch.randint(0, classes, (n,), generator=g))


# ----------------------------------------------------------------------------- allocation


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.97, 0.995])
def test_every_allocation_keeps_exactly_the_rounded_count(allocation, sparsity):
    model = three_layer_model()
    mask = pruners.prune(model, ones_mask(model), criterion="magnitude", allocation=allocation, sparsity=sparsity)
    assert kept_count(mask) == round((1 - sparsity) * 336)


@pytest.mark.parametrize("sparsity, expected", [
    (0.5, {CONV: 24, HIDDEN: 128, OUT: 16}),  # exact halves
    # keep round(33.6) = 34; 4.8 / 25.6 / 3.2 -> floors 4 / 25 / 3, two more to the largest remainders .8, .6
    (0.9, {CONV: 5, HIDDEN: 26, OUT: 3}),
])
def test_uniform_counts_by_hand(sparsity, expected):
    model = three_layer_model()
    mask = pruners.prune(model, ones_mask(model), criterion="magnitude", allocation="uniform", sparsity=sparsity)
    assert counts(mask) == expected


def test_erk_densities_by_hand_with_a_layer_capped_at_one():
    # ERK weight of a layer (size * sum/prod) = sum(shape): conv 11, hidden 32, out 18 (61 in all).
    # density 0.25: keep 84, no layer over 1: layer count = 84 * sum / 61.
    low = pruners.erk_densities(SHAPES, 0.25)
    assert low[CONV] == pytest.approx(84 * 11 / 61 / 48)
    assert low[HIDDEN] == pytest.approx(84 * 32 / 61 / 256)
    assert low[OUT] == pytest.approx(84 * 18 / 61 / 32)
    # density 0.5: keep 168; out would get 168 * 18 / 61 = 49.6 > 32, so it is dense and the
    # other two share 168 - 32 = 136 in proportion 11 : 32.
    high = pruners.erk_densities(SHAPES, 0.5)
    assert high[OUT] == pytest.approx(1.0)
    assert high[CONV] == pytest.approx(136 * 11 / 43 / 48)  # 0.72481
    assert high[HIDDEN] == pytest.approx(136 * 32 / 43 / 256)  # 0.39535
    # Uncapped layers keep the ERK ratio (sum/prod) between them.
    assert high[CONV] / high[HIDDEN] == pytest.approx((11 / 48) / (32 / 256))


def test_erk_counts_by_hand():
    # From the densities above: 34.79 / 101.21 / 32 -> floors 34 / 101 / 32 = 167, one more to conv (.79).
    assert pruners.layer_keep_counts(SHAPES, 168, "erk") == {CONV: 35, HIDDEN: 101, OUT: 32}
    model = three_layer_model()
    mask = pruners.prune(model, ones_mask(model), criterion="random", allocation="erk", sparsity=0.5)
    assert counts(mask) == {CONV: 35, HIDDEN: 101, OUT: 32}


def test_er_balanced_counts_by_hand():
    # keep 168: 56 each; out holds only 32, so 136 for the other two, 68 each; conv holds only 48,
    # so hidden takes the remaining 88.
    assert pruners.layer_keep_counts(SHAPES, 168, "er-balanced") == {CONV: 48, HIDDEN: 88, OUT: 32}
    # keep 34: 11.33 each -> 11 each, the one left over to the first layer (equal remainders).
    assert pruners.layer_keep_counts(SHAPES, 34, "er-balanced") == {CONV: 12, HIDDEN: 11, OUT: 11}
    model = three_layer_model()
    mask = pruners.prune(model, ones_mask(model), criterion="random", allocation="er-balanced", sparsity=0.5)
    assert counts(mask) == {CONV: 48, HIDDEN: 88, OUT: 32}


def test_layer_counts_respect_capacity():
    # Uniform would give conv 24 at keep 168, but conv only has 10 left: the 14 go to the others
    # in proportion to their sizes 256 : 32.
    got = pruners.layer_keep_counts(SHAPES, 168, "uniform", capacity={CONV: 10, HIDDEN: 256, OUT: 32})
    assert got == {CONV: 10, HIDDEN: 140, OUT: 18}  # 158 * 256/288 = 140.44, 158 * 32/288 = 17.56


def test_global_magnitude_keeps_the_largest_weights_overall():
    model = three_layer_model()
    mask = pruners.magnitude_prune(model, ones_mask(model), 0.8)
    magnitudes = {n: p.detach().abs() for n, p in prunable_parameters(model).items()}
    kept = torch.cat([magnitudes[n][mask[n]] for n in mask])
    pruned = torch.cat([magnitudes[n][~mask[n]] for n in mask])
    assert len(kept) == round(0.2 * 336)
    assert kept.min() > pruned.max()


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_masks_only_shrink_even_when_pruned_weights_are_large(allocation):
    model = three_layer_model()
    start = pruners.prune(model, ones_mask(model), criterion="random", allocation="global", sparsity=0.5, seed=3)
    with torch.no_grad():  # pruned weights made the largest: magnitude would pick them if allowed
        for name, p in prunable_parameters(model).items():
            p[~start[name]] = 100.0
    mask = pruners.magnitude_prune(model, start, 0.8, allocation)
    assert is_subset(mask, start)
    assert kept_count(mask) == round(0.2 * 336)


def test_ties_are_broken_by_layer_then_index():
    mask = {"a": torch.ones(2, 3, dtype=torch.bool), "b": torch.ones(4, dtype=torch.bool)}
    mask["a"][0, 0] = False
    scores = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    # keep round(0.6 * 10) = 6 of the 9 kept: the first 6 kept positions in order.
    got = pruners.allocate(scores, mask, 0.4, "global")
    assert got["a"].tolist() == [[False, True, True], [True, True, True]]
    assert got["b"].tolist() == [True, False, False, False]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30), st.data())
def test_global_selection_equals_a_stable_sort_of_the_kept_scores(values, draw):
    # Few distinct values: many ties at the threshold.
    n = len(values)
    kept = torch.tensor(draw.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    assume(kept.any())  # sparsity 1 (nothing kept) is not a valid target
    keep = draw.draw(st.integers(1, int(kept.sum())))
    scores = torch.tensor(values, dtype=torch.float32)
    candidates = [i for i in range(n) if kept[i]]
    reference = sorted(candidates, key=lambda i: -values[i])[:keep]  # sorted() is stable
    got = pruners.allocate({"w": scores}, {"w": kept}, 1 - keep / n, "global")["w"]
    assert got.nonzero().flatten().tolist() == sorted(reference)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "0.5"])
def test_sparsity_outside_range_is_a_user_error(bad):
    model = three_layer_model()
    with pytest.raises(UserError, match="sparsity"):
        pruners.prune(model, ones_mask(model), criterion="random", allocation="global", sparsity=bad)


def test_unknown_names_and_a_target_below_the_current_sparsity_are_user_errors():
    model = three_layer_model()
    mask = ones_mask(model)
    with pytest.raises(UserError, match="unknown pruner 'obd'"):
        pruners.prune(model, mask, criterion="obd", allocation="global", sparsity=0.5)
    with pytest.raises(UserError, match="unknown allocation 'erdos'"):
        pruners.prune(model, mask, criterion="random", allocation="erdos", sparsity=0.5)
    with pytest.raises(UserError, match="needs the data set"):
        pruners.prune(model, mask, criterion="snip", allocation="global", sparsity=0.5)
    half = pruners.magnitude_prune(model, mask, 0.5)
    with pytest.raises(UserError, match="masks only shrink"):
        pruners.magnitude_prune(model, half, 0.3)


# ----------------------------------------------------------------------------- scores


def test_random_scores_are_seeded_and_leave_the_global_rng_alone():
    mask = ones_mask(three_layer_model())
    state = torch.get_rng_state()
    first = pruners.score("random", None, mask, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    again = pruners.score("random", None, mask, seed=5)
    other = pruners.score("random", None, mask, seed=6)
    assert all(torch.equal(first[n], again[n]) for n in mask)
    assert not any(torch.equal(first[n], other[n]) for n in mask)


def test_snip_equals_the_closed_form_gradient_of_softmax_regression():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 3, bias=False)).double()
    mask = {"0.weight": torch.rand(3, 5) > 0.3}
    data = tensor_data((5,), 3, n=12, dtype=torch.float64)
    got = pruners.score("snip", model, mask, data=data, batch_size=4, batches=2, seed=7)
    w = model[0].weight.detach() * mask["0.weight"]
    grads = []
    for x, y in list(data.train_batches(4, 7, 0))[:2]:  # dL/dW = (softmax(x W^T) - onehot(y))^T x / n
        grads.append((torch.softmax(x @ w.T, 1) - F.one_hot(y, 3)).T @ x / len(y))
    expected = ((grads[0] + grads[1]) / 2 * w).abs()
    torch.testing.assert_close(got["0.weight"], expected)


def test_synflow_equals_the_closed_form_path_products():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False), nn.ReLU(),
                          nn.Linear(3, 2, bias=False))
    mask = {n: torch.rand(p.shape) > 0.4 for n, p in prunable_parameters(model).items()}
    a1, a2, a3 = (prunable_parameters(model)[n].detach().double().abs() * mask[n] for n in mask)
    ones_in, ones_out = torch.ones(4, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    # R = 1^T A3 A2 A1 1; dR/dA2[i, j] = (A3^T 1)_i (A1 1)_j, and so on.
    expected = {
        "0.weight": torch.outer(a2.T @ (a3.T @ ones_out), ones_in) * a1,
        "2.weight": torch.outer(a3.T @ ones_out, a1 @ ones_in) * a2,
        "4.weight": torch.outer(ones_out, a2 @ (a1 @ ones_in)) * a3,
    }
    data = tensor_data((4,), 2)
    got = pruners.score("synflow", model, mask, data=data)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    # One round of `prune` is one scoring plus the global top-k.
    one_round = pruners.prune(model, mask, criterion="synflow", allocation="global", sparsity=0.8, data=data,
                              synflow_rounds=1)
    by_hand = pruners.allocate(expected, mask, 0.8, "global")
    assert all(torch.equal(one_round[n], by_hand[n]) for n in mask)


def test_synflow_uses_batchnorm_in_eval_mode_with_absolute_statistics():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
    bn = model[1]
    with torch.no_grad():
        bn.weight.copy_(torch.randn(4))
        bn.bias.copy_(torch.randn(4))
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.5)
    mask = ones_mask(model)
    a1, a2 = (p.detach().double().abs() for p in prunable_parameters(model).values())
    # BN(h) = a * h + b with a = |gamma| / sqrt(|var| + eps), b = |beta| - a |mean|.
    a = bn.weight.detach().double().abs() / torch.sqrt(bn.running_var.double().abs() + bn.eps)
    b = bn.bias.detach().double().abs() - a * bn.running_mean.double().abs()
    ones_in, ones_out = torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    expected = {
        "0.weight": torch.outer(a * (a2.T @ ones_out), ones_in) * a1,
        "2.weight": torch.outer(ones_out, a * (a1 @ ones_in) + b) * a2,
    }
    got = pruners.score("synflow", model.train(), mask, data=tensor_data((3,), 2))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_equals_weights_times_dense_hessian_times_gradient(temperature):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False)).double()
    mask = {n: torch.rand(p.shape) > 0.25 for n, p in prunable_parameters(model).items()}
    data = tensor_data((3,), 2, n=10, dtype=torch.float64)
    x, y = next(data.train_batches(16, 0, 0))
    shapes = [mask[n].shape for n in mask]
    theta = torch.cat([(prunable_parameters(model)[n].detach() * mask[n]).flatten() for n in mask])

    def loss(flat):
        w1, w2 = flat[:12].view(shapes[0]), flat[12:].view(shapes[1])
        return F.cross_entropy(torch.tanh(x @ w1.T) @ w2.T / temperature, y)

    gradient = torch.autograd.functional.jacobian(loss, theta)
    hessian = torch.autograd.functional.hessian(loss, theta)
    expected = theta * (hessian @ gradient)
    expected = expected / (expected.sum().abs() + 1e-10)
    got = pruners.score("grasp", model, mask, data=data, batch_size=16, grasp_temperature=temperature)
    torch.testing.assert_close(torch.cat([got[n].flatten() for n in mask]), expected)


def bn_dropout_model() -> nn.Module:
    torch.manual_seed(6)
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                         nn.Linear(12, 3))


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("training", [True, False])
def test_scoring_leaves_weights_buffers_dtype_and_mode_untouched(criterion, training):
    model = bn_dropout_model()
    model.train(training)
    model[3].eval()  # a mixed mode must survive too
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    mask = pruners.prune(model, ones_mask(model), criterion="random", allocation="global", sparsity=0.3)
    data = tensor_data((2, 6), 3)
    scores = pruners.score(criterion, model, mask, data=data, batch_size=8, batches=2)
    assert set(scores) == set(mask) and all(scores[n].shape == mask[n].shape for n in mask)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_prune_reaches_the_target_within_the_old_mask(criterion, allocation):
    model = bn_dropout_model()
    start = pruners.magnitude_prune(model, ones_mask(model), 0.2)
    mask = pruners.prune(model, start, criterion=criterion, allocation=allocation, sparsity=0.75,
                         data=tensor_data((2, 6), 3), batch_size=8, synflow_rounds=10)
    assert kept_count(mask) == round(0.25 * 54)  # 18 + 36 prunable weights
    assert is_subset(mask, start)


def test_iterative_synflow_avoids_the_layer_collapse_of_random_and_one_round_pruning():
    # A bottleneck: 10000 + 1000 + 6 weights; at 99.5 % only 55 stay. Global random pruning keeps
    # each weight with probability 0.5 %, so the 6-weight classifier is almost surely emptied.
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(20, 500), nn.ReLU(), nn.Linear(500, 2), nn.ReLU(), nn.Linear(2, 3))
    dense, data = ones_mask(model), tensor_data((20,), 3)
    random_mask = pruners.prune(model, dense, criterion="random", allocation="global", sparsity=0.995, seed=0)
    assert collapsed_layers(random_mask) == ["4.weight"]
    # SynFlow in one round (the authors' pitfall) empties the wide first layer instead.
    one_round = pruners.prune(model, dense, criterion="synflow", allocation="global", sparsity=0.995, data=data,
                              synflow_rounds=1)
    assert collapsed_layers(one_round) == ["0.weight"]
    iterative = pruners.prune(model, dense, criterion="synflow", allocation="global", sparsity=0.995, data=data)
    assert kept_count(iterative) == 55
    assert collapsed_layers(iterative) == []


def test_synflow_rounds_follow_the_exponential_schedule(monkeypatch):
    model = three_layer_model()
    targets = []
    real_allocate = pruners.allocate

    def recording_allocate(scores, mask, sparsity, allocation):
        targets.append(sparsity)
        return real_allocate(scores, mask, sparsity, allocation)

    monkeypatch.setattr(pruners, "allocate", recording_allocate)
    pruners.prune(model, ones_mask(model), criterion="synflow", allocation="erk", sparsity=0.96,
                  data=tensor_data((4, 6), 2), synflow_rounds=4)
    # density_r = 0.04 ** (r / 4): 0.4472, 0.2, 0.0894, 0.04
    assert targets == pytest.approx([1 - 0.04 ** 0.25, 1 - 0.2, 1 - 0.04 ** 0.75, 0.96])


@pytest.mark.parametrize("model_name", ["cnn1d", "resnet1d"])
def test_every_pruner_on_the_registry_models_and_synthetic_data(model_name):
    from sparse_training.config import DataConfig
    from sparse_training.data import load_data
    from sparse_training.models import build_model, model_config_for

    data = load_data(DataConfig(name="synthetic"))
    torch.manual_seed(0)
    model = build_model(model_config_for(model_name, {}, data.num_classes, data.input_shape))
    before = copy.deepcopy(model.state_dict())
    dense = ones_mask(model)
    total = sum(m.numel() for m in dense.values())
    for criterion in CRITERIA:
        for allocation in ("global", "erk"):
            mask = pruners.prune(model, dense, criterion=criterion, allocation=allocation, sparsity=0.9, data=data,
                                 batch_size=64, batches=2, synflow_rounds=20)
            assert kept_count(mask) == round(0.1 * total), (criterion, allocation)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training
