"""Permutation alignment (landscape/align.py) against ground truth: a network whose units the
test itself shuffles is put back exactly; alignment never changes what a network computes;
the groups of the built-in models match what is read off their code by hand; what alignment is
not defined for is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from landscape.align import align, apply_permutations, permutation_spec, weight_matching
from sparse_training.errors import UserError
from sparse_training.masks import ones_mask
from sparse_training.models.images import resnet20, vgg16
from sparse_training.models.mobilenet import mobilenetv2
from sparse_training.models.mnist1d import MLP, CNN1d, ResNet1d


def seeded(factory, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = factory()
    for module in model.modules():  # non-trivial BatchNorm, so a missed buffer shows
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_()
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def sparse(model: nn.Module, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's state_dict with half of every prunable weight zeroed, and that mask."""
    generator = torch.Generator().manual_seed(seed)
    mask = {name: torch.rand(m.shape, generator=generator) < 0.5 for name, m in ones_mask(model).items()}
    state = snapshot(model)
    for name, m in mask.items():
        state[name][~m] = 0
    return state, mask


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the state_dict (the state_dict itself aliases the parameters that load_state_dict overwrites)."""
    return {name: t.clone() for name, t in model.state_dict().items()}


def outputs(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)


def kept_per_layer(mask: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: int(m.sum()) for name, m in mask.items()}


class DepthwiseNet(nn.Module):
    """Pointwise, depthwise (a pass-through: its filters follow their channels), pointwise."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        out = torch.relu(self.bn(self.depthwise(self.expand(x))))
        return self.head(torch.nn.functional.relu(self.project(out)).mean(dim=(2, 3)))


class ScaledNet(nn.Module):
    """Parameters read directly in forward: a per-unit scale and shift join the group."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.scale = nn.Parameter(torch.randn(8))
        self.shift = nn.Parameter(torch.randn(1, 8))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x) * self.scale + self.shift))


MODELS = {
    "mlp": (lambda: MLP(hidden_size=12), (4, 40)),
    "cnn1d": (lambda: CNN1d(channels=6), (4, 40)),
    "resnet1d": (lambda: ResNet1d(width=4), (4, 40)),
    "resnet20": (lambda: resnet20(width=0.25), (2, 3, 8, 8)),
    "vgg16": (lambda: vgg16(width=0.125), (2, 3, 8, 8)),
    "depthwise": (DepthwiseNet, (2, 3, 6, 6)),
    "mobilenetv2": (lambda: mobilenetv2(width=0.25), (2, 3, 8, 8)),
    "scaled": (ScaledNet, (4, 5)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_shuffled_network_is_put_back_exactly(name):
    factory, shape = MODELS[name]
    model = seeded(factory, 0)
    x = torch.randn(*shape)
    original, mask = sparse(model, 1)
    spec = permutation_spec(model, x)
    generator = torch.Generator().manual_seed(2)
    shuffle = {g.name: torch.randperm(g.size, generator=generator) for g in spec.groups}
    shuffled, shuffled_mask = apply_permutations(original, spec, shuffle), apply_permutations(mask, spec, shuffle)
    assert any(not torch.equal(shuffled[k], original[k]) for k in original)
    torch.testing.assert_close(outputs(model, shuffled, x), outputs(model, original, x), rtol=1e-5, atol=1e-5)

    result = align(model, x, original, shuffled, shuffled_mask)
    assert result.state_dict.keys() == original.keys()
    assert all(torch.equal(result.state_dict[k], original[k]) for k in original)
    assert all(torch.equal(result.masks[k], mask[k]) for k in mask)
    for group in spec.groups:
        np.testing.assert_array_equal(result.permutations[group.name], np.argsort(shuffle[group.name].numpy()))
        assert result.permutations[group.name].dtype == np.int64


def test_shuffle_matches_a_hand_written_permutation():
    model = seeded(lambda: MLP(input_size=6, hidden_size=5, num_classes=3), 0)
    state = model.state_dict()
    p0, p1 = torch.tensor([3, 0, 4, 1, 2]), torch.tensor([1, 4, 0, 2, 3])
    spec = permutation_spec(model, torch.randn(2, 6))
    shuffled = apply_permutations(state, spec, {"layers.1": p0, "layers.3": p1.numpy()})
    expected = {
        "layers.1.weight": state["layers.1.weight"][p0], "layers.1.bias": state["layers.1.bias"][p0],
        "layers.3.weight": state["layers.3.weight"][p1][:, p0], "layers.3.bias": state["layers.3.bias"][p1],
        "layers.5.weight": state["layers.5.weight"][:, p1], "layers.5.bias": state["layers.5.bias"],
    }
    assert all(torch.equal(shuffled[k], v) for k, v in expected.items())


def test_apply_leaves_inputs_and_counters_alone():
    model = seeded(lambda: ResNet1d(width=3), 0)
    state = model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    spec = permutation_spec(model, torch.randn(2, 40))
    perms = {g.name: torch.randperm(g.size) for g in spec.groups}
    out = apply_permutations(state, spec, perms)
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert all(torch.equal(out[k], state[k]) for k in state if k.endswith("num_batches_tracked"))
    partial = {"stem.0.weight": state["stem.0.weight"] != 0}  # keys outside the dict are skipped
    assert set(apply_permutations(partial, spec, perms)) == {"stem.0.weight"}


@pytest.mark.parametrize("name", ["resnet1d", "resnet20", "vgg16", "depthwise"])
def test_alignment_keeps_the_function_and_the_sparsity(name):
    factory, shape = MODELS[name]
    model_a, model_b = seeded(factory, 10), seeded(factory, 11)
    state_a, _ = sparse(model_a, 12)
    state_b, mask_b = sparse(model_b, 13)
    x = torch.randn(*shape)
    result = align(model_b, x, state_a, state_b, mask_b, seed=3)
    assert any(not np.array_equal(p, np.arange(len(p))) for p in result.permutations.values())
    torch.testing.assert_close(outputs(model_b, result.state_dict, x), outputs(model_b, state_b, x),
                               rtol=1e-5, atol=1e-5)
    assert kept_per_layer(result.masks) == kept_per_layer(mask_b)
    assert not any(result.state_dict[k][~result.masks[k]].any() for k in mask_b)  # masks moved with weights


def test_torchvision_resnet18_groups_keep_the_function():
    torchvision = pytest.importorskip("torchvision")
    model = seeded(lambda: torchvision.models.resnet18(num_classes=10), 0)
    x = torch.randn(1, 3, 32, 32)
    spec = permutation_spec(model, x)
    assert len(spec.groups) == 12  # 4 residual streams (stem + 3 projected stages) + 8 inner convolutions
    assert {g.name for g in spec.groups} >= {"conv1", "layer2.0.conv2", "layer4.1.conv1"}
    state = snapshot(model)
    perms = {g.name: torch.randperm(g.size) for g in spec.groups}
    torch.testing.assert_close(outputs(model, apply_permutations(state, spec, perms), x), outputs(model, state, x),
                               rtol=1e-4, atol=1e-5)


def test_groups_of_the_mlp():
    spec = permutation_spec(MLP(hidden_size=7), torch.randn(2, 40))
    assert [(g.name, g.size, g.axes) for g in spec.groups] == [
        ("layers.1", 7, (("layers.1.weight", 0, 1), ("layers.1.bias", 0, 1), ("layers.3.weight", 1, 1))),
        ("layers.3", 7, (("layers.3.weight", 0, 1), ("layers.3.bias", 0, 1), ("layers.5.weight", 1, 1))),
    ]


def test_groups_of_cnn1d():
    spec = permutation_spec(CNN1d(channels=6), torch.randn(2, 40))
    assert [(g.name, g.size) for g in spec.groups] == [("features.0", 6), ("features.2", 6), ("features.4", 6)]
    assert spec.groups[0].axes == (("features.0.weight", 0, 1), ("features.0.bias", 0, 1), ("features.2.weight", 1, 1))
    assert spec.groups[2].axes[-1] == ("classifier.weight", 1, 5)  # 6 channels x 5 positions, flattened


def test_groups_of_resnet1d():
    spec = permutation_spec(ResNet1d(width=4), torch.randn(2, 40))
    group_of = {(key, axis): g.name for g in spec.groups for key, axis, _ in g.axes}
    stem = group_of[("stem.0.weight", 0)]
    for key in ("stem.1.running_var", "layers.0.conv2.weight", "layers.0.bn2.weight", "layers.0.bn2.running_mean"):
        assert group_of[(key, 0)] == stem
    assert group_of[("layers.1.conv1.weight", 1)] == group_of[("layers.1.shortcut.0.weight", 1)] == stem
    assert group_of[("layers.1.shortcut.0.weight", 0)] == group_of[("layers.1.conv2.weight", 0)] == "layers.1.conv2"
    assert group_of[("layers.1.shortcut.1.running_var", 0)] == "layers.1.conv2"
    assert group_of[("layers.2.conv2.weight", 0)] == group_of[("classifier.weight", 1)]
    assert ("classifier.weight", 0) not in group_of and ("classifier.bias", 0) not in group_of
    assert len(spec.groups) == 6  # 3 residual streams + 3 inner convolutions
    assert all(block == 1 for g in spec.groups for _, _, block in g.axes)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h)[0])


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.body = Gate()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(self.inp(x)))


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


@pytest.mark.parametrize("factory, shape, names", [
    (Attention, (2, 5, 6), ("attn", "MultiheadAttention", "across heads")),
    (Branching, (2, 6), ("body", "Gate", "torch.fx cannot trace")),
    (Concat, (2, 6), ("cat",)),
    (lambda: nn.Sequential(nn.Conv1d(1, 4, 3), nn.Conv1d(4, 4, 3, groups=2)), (2, 1, 9), ("1 (Conv1d)", "groups=2")),
    (lambda: nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 2)), (2, 6), ("1 (LayerNorm)",)),
    (lambda: nn.Sequential(nn.Conv1d(1, 4, 3), nn.GroupNorm(2, 4), nn.Conv1d(4, 2, 1)), (2, 1, 9), ("1 (GroupNorm)",)),
    (lambda: nn.Sequential(nn.Linear(6, 4), nn.Softmax(dim=1), nn.Linear(4, 2)), (2, 6), ("1 (Softmax)",)),
])
def test_refusals_are_one_line_and_name_the_layer(factory, shape, names):
    with pytest.raises(UserError) as error:
        permutation_spec(factory(), torch.randn(*shape))
    message = str(error.value)
    assert "\n" not in message and message.startswith("cannot align through ")
    assert all(name in message for name in names), message
    assert "without --align" in message


class LogSoftmaxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.classifier = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return torch.log_softmax(self.classifier(torch.relu(self.hidden(x))), dim=1).view(-1)


def test_an_unknown_op_after_the_classifier_only_pins_its_classes():
    spec = permutation_spec(LogSoftmaxHead(), torch.randn(2, 6))
    assert [(g.name, g.size) for g in spec.groups] == [("hidden", 5)]
    assert ("classifier.weight", 1, 1) in spec.groups[0].axes


def test_vision_transformer_is_refused_at_its_first_attention_layer():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
                              num_classes=3)
    with pytest.raises(UserError) as error:
        permutation_spec(model, torch.randn(1, 3, 32, 32))
    message = str(error.value)
    assert "\n" not in message and "encoder_layer_0.self_attention (MultiheadAttention)" in message
    assert "across heads" in message and "without --align" in message


def test_tracing_leaves_the_model_as_it_was():
    model = seeded(lambda: ResNet1d(width=3), 0).train()
    before = snapshot(model)
    permutation_spec(model, torch.randn(4, 40))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def matching_objective(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k].double() * b[k].double()).sum()) for k in a if a[k].is_floating_point())


def trained_mlp(seed: int, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(seed)
    model = MLP(input_size=10, hidden_size=16, num_classes=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def test_matching_never_lowers_the_objective():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 10, generator=generator)
    y = (x @ torch.randn(10, 3, generator=generator)).argmax(1)
    model_a, model_b = trained_mlp(1, x, y), trained_mlp(2, x, y)
    state_a, state_b = snapshot(model_a), snapshot(model_b)
    result = align(model_a, x[:2], state_a, state_b, ones_mask(model_b))
    assert matching_objective(state_a, result.state_dict) > matching_objective(state_a, state_b)
    torch.testing.assert_close(outputs(model_b, result.state_dict, x), outputs(model_b, state_b, x),
                               rtol=1e-5, atol=1e-5)
    assert result.iterations >= 1
    again = weight_matching(result.spec, state_a, state_b)
    assert all(np.array_equal(again[k], result.permutations[k]) for k in again)  # seeded: reproducible


def test_a_network_aligned_to_itself_stays_put():
    model = seeded(lambda: ResNet1d(width=3), 0)
    state = model.state_dict()
    result = align(model, torch.randn(2, 40), state, state, ones_mask(model))
    assert result.iterations == 1
    assert all(np.array_equal(p, np.arange(len(p))) for p in result.permutations.values())
