"""Models: shapes, parameter counts against hand counts and published values, exact
rebuilds from a ModelConfig, the kwargs completion, tv: and user factories."""

import json
import sys
from dataclasses import asdict

import pytest
import torch
from torch import nn

from sparse_training.config import ModelConfig
from sparse_training.errors import UserError
from sparse_training.masks import prunable_parameters
from sparse_training.models import MODEL_NAMES, build_model, model_config_for, parameter_count

SEQUENCE, IMAGE = (40,), (3, 32, 32)

# Hand counts (weights + biases + BN affine) and published counts: resnet20/32/56 are the
# option-A counts of He et al. (269,722 / 464,154 / 853,018) plus the two 1x1 projection
# convs and their BatchNorms (16*32 + 32*64 + 2*(32 + 64) = 2,752); resnet18/50 are the
# usual CIFAR-10 ResNet counts; vgg16 is the CIFAR VGG-16-BN count without conv biases.
EXPECTED_PARAMETERS = {
    "mlp": (40 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10),
    "cnn1d": (1 * 25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (25 * 5 * 10 + 10),
    "resnet1d": (5 * 10 + 20) + (2 * 10 * 10 * 3 + 40) + (10 * 20 * 3 + 20 * 20 * 3 + 10 * 20 + 3 * 40)
    + (20 * 40 * 3 + 40 * 40 * 3 + 20 * 40 + 3 * 80) + (40 * 10 + 10),
    "resnet20": 269_722 + 2_752,
    "resnet32": 464_154 + 2_752,
    "resnet56": 853_018 + 2_752,
    "resnet18": 11_173_962,
    "resnet50": 23_520_842,
    "vgg16": 14_728_266 - 4_224,
    "mobilenetv2": 2_236_682,  # torchvision's mobilenet_v2(num_classes=10): CIFAR strides hold no parameters
    "vit": 5_362_762,  # DeiT-Tiny with 4x4 patches on 32x32 (torchvision's VisionTransformer count)
    "vit1d": 18_026,  # hand count in test_models_transformers.py
}
SEQUENCE_MODELS = ("mlp", "cnn1d", "resnet1d", "vit1d")


def input_for(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *(SEQUENCE if name in SEQUENCE_MODELS else IMAGE))


def seeded(config: ModelConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(config)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count_and_output_shape(name):
    model = seeded(ModelConfig(name))
    assert parameter_count(model) == EXPECTED_PARAMETERS[name]
    model.eval()
    assert model(input_for(name)).shape == (2, 10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_rebuilds_bit_identically_from_its_config(name):
    shape = SEQUENCE if name in SEQUENCE_MODELS else IMAGE
    kwargs = {} if name in ("mlp", "cnn1d") else {"width": 0.5 if shape == IMAGE else 4}
    if name == "vit":
        kwargs = {"width": 16, "depth": 2, "heads": 2}
    config = model_config_for(name, kwargs, 7, shape)
    stored = ModelConfig(**json.loads(json.dumps(asdict(config))))  # as a checkpoint stores it
    a, b, other = seeded(config), seeded(stored), seeded(config, seed=1)
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert any(not torch.equal(state_a[k], v) for k, v in other.state_dict().items())
    assert a.eval()(input_for(name)).shape == (2, 7)


def test_width_multiplier_scales_every_stage():
    model = build_model(ModelConfig("resnet20", {"width": 0.25}))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sorted({c.out_channels for c in convs}) == [4, 8, 16]
    assert model.classifier.in_features == 16


def test_shortcut_convs_are_prunable_layers():
    names = list(prunable_parameters(build_model(ModelConfig("resnet20"))))
    shortcuts = [n for n in names if "shortcut" in n]
    assert len(shortcuts) == 2 and all(n.endswith("shortcut.0.weight") for n in shortcuts)
    assert len(names) == 1 + 2 * 9 + 2 + 1  # stem, 9 blocks of 2 convs, 2 projections, classifier


def test_conv_init_is_kaiming_normal_fan_out():
    model = seeded(ModelConfig("resnet20"))
    conv = model.stages[2][2].conv2  # 64 -> 64, 3x3: fan_out = 64 * 9
    expected = (2 / (64 * 9)) ** 0.5
    assert abs(conv.weight.std().item() / expected - 1) < 0.03
    assert abs(conv.weight.mean().item()) < 0.05 * expected
    cnn = seeded(ModelConfig("cnn1d"))
    assert all(float(m.bias.detach().abs().max()) == 0 for m in cnn.modules() if isinstance(m, nn.Conv1d))


def test_model_config_for_completes_kwargs_from_the_data():
    assert model_config_for("resnet1d", {}, 10, (40,)).kwargs == {"num_classes": 10, "in_channels": 1, "width": 10}
    assert model_config_for("cnn1d", {"channels": 8}, 4, (2, 60)).kwargs == {
        "num_classes": 4, "in_channels": 2, "input_length": 60, "channels": 8}
    assert model_config_for("mlp", {}, 10, (1, 28, 28)).kwargs["input_size"] == 784
    assert model_config_for("vgg16", {"width": 0.25}, 100, (1, 28, 28)).kwargs == {
        "num_classes": 100, "in_channels": 1, "width": 0.25}
    assert model_config_for("resnet20", {"num_classes": 12}, 10, IMAGE).kwargs["num_classes"] == 12
    model = build_model(model_config_for("vgg16", {"width": 0.125}, 10, (1, 28, 28))).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # five ceil-mode pools survive 28x28


@pytest.mark.parametrize("name, kwargs, shape, fragment", [
    ("resnet20", {}, SEQUENCE, "takes images"),
    ("cnn1d", {}, IMAGE, "takes sequences"),
    ("resnet20", {"in_channels": 1}, IMAGE, "in_channels=1 contradicts"),
    ("resnet20", {"num_classes": 5}, IMAGE, "num_classes=5 contradicts"),
    ("resnet20", {"depth": 3}, IMAGE, "takes no argument(s) depth"),
    ("tv:resnet18", {}, (1, 28, 28), "RGB images"),
    ("resnet21", {}, IMAGE, "unknown model 'resnet21'"),
])
def test_model_config_for_rejects_what_cannot_work(name, kwargs, shape, fragment):
    with pytest.raises(UserError) as error:
        model_config_for(name, kwargs, 10, shape)
    assert fragment in str(error.value)


def test_build_model_errors_name_the_problem():
    with pytest.raises(UserError) as error:
        build_model(ModelConfig("nope"))
    assert all(name in str(error.value) for name in MODEL_NAMES)
    with pytest.raises(UserError, match="width must be a positive integer"):
        build_model(ModelConfig("resnet1d", {"width": 0}))
    with pytest.raises(UserError, match="takes no argument"):
        build_model(ModelConfig("mlp", {"widht": 2}))


def test_torchvision_models_build_untrained():
    config = model_config_for("tv:resnet18", {}, 7, IMAGE)
    assert config.kwargs == {"num_classes": 7}
    a, b = seeded(config), seeded(config)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert a.eval()(torch.randn(1, *IMAGE)).shape == (1, 7)
    with pytest.raises(UserError, match="untrained"):
        build_model(ModelConfig("tv:resnet18", {"weights": "DEFAULT"}))
    with pytest.raises(UserError, match="unknown torchvision classifier 'resnet19'"):
        build_model(ModelConfig("tv:resnet19"))


FACTORY_SOURCE = '''
import torch
def make(num_classes=10, hidden=8):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes))
def not_a_model(**kwargs):
    return 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "user_models_for_test"
    (tmp_path / f"{name}.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_user_factory_is_imported_only_when_allowed(user_module):
    config = ModelConfig(f"{user_module}:make", {"num_classes": 3})
    with pytest.raises(UserError) as error:
        build_model(config)
    assert str(error.value) == (f"checkpoint names a user model factory {user_module}:make; "
                                f"pass --model {user_module}:make to allow importing it")
    assert user_module not in sys.modules  # refused before any import
    model = build_model(config, allow_import=True)
    assert model(torch.randn(2, 40)).shape == (2, 3)


def test_user_factory_config_and_errors(user_module):
    completed = model_config_for(f"{user_module}:make", {"hidden": 4}, 5, SEQUENCE, allow_import=True)
    assert completed.kwargs == {"hidden": 4, "num_classes": 5}  # in_channels is not a parameter of make
    assert model_config_for(f"{user_module}:make", {"hidden": 4}, 5, SEQUENCE).kwargs == {"hidden": 4}
    with pytest.raises(UserError, match="not a torch.nn.Module"):
        build_model(ModelConfig(f"{user_module}:not_a_model"), allow_import=True)
    with pytest.raises(UserError, match="has no 'missing'"):
        build_model(ModelConfig(f"{user_module}:missing"), allow_import=True)
    with pytest.raises(UserError, match="cannot import no_such_module_xyz"):
        build_model(ModelConfig("no_such_module_xyz:make"), allow_import=True)
    with pytest.raises(UserError, match="failed"):
        build_model(ModelConfig(f"{user_module}:make", {"bogus": 1}), allow_import=True)
    with pytest.raises(UserError, match="module.path:factory"):
        build_model(ModelConfig("os.path:join; rm"), allow_import=True)
