"""The Vision Transformers (`vit`, `vit1d`) and the CIFAR MobileNetV2 (`mobilenetv2`): parameter
counts against torchvision and hand counts, a functional oracle against torchvision's
VisionTransformer with copied weights, the CIFAR strides, the DeiT initialisation, and the
registry (image size learnt from the data, square images only, builder errors as UserErrors)."""

import re

import pytest
import torch
import torchvision
from torch import nn

from sparse_training.config import ModelConfig
from sparse_training.errors import UserError
from sparse_training.masks import prunable_parameters
from sparse_training.models import build_model, model_config_for, parameter_count, sized_model
from sparse_training.models.mobilenet import mobilenetv2
from sparse_training.models.transformers import vit, vit1d

SMALL = {"width": 16, "depth": 2, "heads": 2, "mlp_ratio": 2.0}


def vit_hand_count(num_classes, in_channels, image_size, patch_size, width, depth, heads, mlp_ratio, dims=2):
    hidden = round(mlp_ratio * width)
    tokens = (image_size // patch_size) ** dims
    patch = in_channels * patch_size ** dims * width + width
    embeddings = width + (tokens + 1) * width  # class token, position embedding
    block = (2 * 2 * width  # ln_1, ln_2
             + 3 * width * width + 3 * width  # fused in_proj
             + width * width + width  # out_proj
             + width * hidden + hidden + hidden * width + width)  # mlp
    return patch + embeddings + depth * block + 2 * width + width * num_classes + num_classes


def test_vit_default_is_deit_tiny_and_matches_torchvision_count():
    with torch.device("meta"):
        ours = vit()
        theirs = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=12, num_heads=3,
                                                      hidden_dim=192, mlp_dim=768, num_classes=10)
    expected = vit_hand_count(10, 3, 32, 4, 192, 12, 3, 4.0)
    assert expected == 5_362_762
    assert parameter_count(ours) == parameter_count(theirs) == expected
    assert sized_model(ModelConfig("vit")).class_token.is_meta  # the registry's meta build skips the init


def test_vit1d_default_count():
    model = vit1d()
    assert parameter_count(model) == vit_hand_count(10, 1, 40, 4, 32, 2, 2, 2.0, dims=1) == 18_026


def torchvision_name(name: str) -> str:
    """Our parameter name -> torchvision VisionTransformer's."""
    name = re.sub(r"^blocks\.(\d+)\.", r"encoder.layers.encoder_layer_\1.", name)
    name = name.replace(".attn.", ".self_attention.").replace(".mlp.2.", ".mlp.3.")
    fixed = {"pos_embedding": "encoder.pos_embedding", "norm.weight": "encoder.ln.weight",
             "norm.bias": "encoder.ln.bias", "classifier.weight": "heads.head.weight", "classifier.bias": "heads.head.bias"}
    return fixed.get(name, name)


def test_vit_computes_what_torchvision_computes_with_the_same_weights():
    torch.manual_seed(0)
    ours = vit(image_size=8, patch_size=4, **SMALL).eval()
    theirs = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                                                  mlp_dim=32, num_classes=10).eval()
    state = {torchvision_name(k): v for k, v in ours.state_dict().items()}
    assert set(state) == set(theirs.state_dict())
    theirs.load_state_dict(state)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert got.shape == (3, 10)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got.abs().max() > 1e-3  # not a trivially zero head


def test_vit_forward_is_deterministic_in_train_mode_and_attention_is_prunable():
    torch.manual_seed(0)
    model = vit(image_size=8, **SMALL).train()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), model(x))  # no dropout, no drop-path
    names = set(prunable_parameters(model))
    assert {"blocks.0.attn.in_proj_weight", "blocks.0.attn.out_proj.weight"} <= names


def test_vit1d_takes_flat_and_channel_sequences():
    torch.manual_seed(0)
    model = vit1d().eval()
    x = torch.randn(4, 40)
    with torch.no_grad():
        flat, channels = model(x), model(x.unsqueeze(1))
    assert flat.shape == (4, 10)
    assert torch.equal(flat, channels)


def test_vit_initialisation_is_deit_and_seeded():
    torch.manual_seed(0)
    model = vit(width=192, depth=1, heads=3)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    biases = [name for name, _ in model.named_parameters() if name.endswith("bias")]
    assert {"conv_proj.bias", "blocks.0.attn.in_proj_bias", "blocks.0.attn.out_proj.bias", "classifier.bias"} <= set(biases)
    assert all(torch.all(p == 0) for name, p in model.named_parameters() if name.endswith("bias"))
    assert abs(model.class_token.std().item() / 0.02 - 1) < 0.2
    for weight in (model.pos_embedding, model.blocks[0].attn.in_proj_weight, model.blocks[0].attn.out_proj.weight,
                   model.blocks[0].mlp[0].weight, model.classifier.weight):
        assert abs(weight.std().item() / 0.02 - 1) < 0.05
    fan_in = 3 * 4 * 4
    assert abs(model.conv_proj.weight.std().item() / (1 / fan_in) ** 0.5 - 1) < 0.1

    config = model_config_for("vit", {"width": 16, "depth": 1, "heads": 2}, 10, (3, 32, 32))
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        states.append(build_model(config).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])
    # the registry does not overwrite the DeiT init with its generic Kaiming init
    torch.manual_seed(0)
    assert torch.equal(states[0]["conv_proj.weight"], vit(**config.kwargs).state_dict()["conv_proj.weight"])


@pytest.mark.parametrize("kwargs, fragment", [
    ({"width": 15, "heads": 2}, "width 15 is not divisible by heads 2"),
    ({"image_size": 30}, "image_size 30 is not divisible by patch_size 4"),
    ({"depth": 0}, "depth must be a positive integer"),
    ({"patch_size": -4}, "patch_size must be a positive integer"),
    ({"mlp_ratio": 0.0}, "mlp_ratio must be a positive number"),
])
def test_vit_rejects_bad_sizes(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        vit(**kwargs)
    with pytest.raises(ValueError, match="input_length 42 is not divisible by patch_size 4"):
        vit1d(input_length=42)


def test_registry_learns_the_image_size_and_wants_square_images():
    config = model_config_for("vit", {"width": 16, "depth": 1, "heads": 2}, 10, (3, 32, 32))
    assert config.kwargs["image_size"] == 32 and config.kwargs["in_channels"] == 3
    model = build_model(config).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    mnist = build_model(model_config_for("vit", {"width": 16, "depth": 1, "heads": 2}, 10, (1, 28, 28))).eval()
    assert mnist.pos_embedding.shape == (1, 7 * 7 + 1, 16)
    assert mnist(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(UserError, match=r"needs square images .*\(3, 32, 28\)"):
        model_config_for("vit", {}, 10, (3, 32, 28))
    assert "image_size" not in model_config_for("resnet20", {}, 10, (3, 32, 28)).kwargs  # ResNets take any size
    with pytest.raises(UserError, match="image_size=16 contradicts"):
        model_config_for("vit", {"image_size": 16}, 10, (3, 32, 32))
    bad = model_config_for("vit", {"width": 15, "heads": 2}, 10, (3, 32, 32))
    with pytest.raises(UserError, match="not divisible by heads"):
        build_model(bad)
    assert model_config_for("vit1d", {}, 10, (40,)).kwargs == {
        "num_classes": 10, "in_channels": 1, "input_length": 40, "patch_size": 4, "width": 32, "depth": 2,
        "heads": 2, "mlp_ratio": 2.0}


def test_mobilenetv2_count_matches_torchvision():
    with torch.device("meta"):
        assert parameter_count(mobilenetv2()) == parameter_count(torchvision.models.mobilenet_v2(num_classes=10)) \
            == 2_236_682
        for width in (0.5, 1.4):  # the rounding to multiples of 8 is torchvision's
            assert parameter_count(mobilenetv2(width=width)) == \
                parameter_count(torchvision.models.mobilenet_v2(num_classes=10, width_mult=width))


def test_mobilenetv2_cifar_strides_and_depthwise_convs():
    torch.manual_seed(0)
    model = build_model(ModelConfig("mobilenetv2")).eval()
    sizes = {}
    for name, module in (("stem", model.stem), ("stage2", model.stages[1]), ("stage3", model.stages[2]),
                         ("last", model.last)):
        module.register_forward_hook(lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[1:])))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sizes == {"stem": (32, 32, 32), "stage2": (24, 32, 32), "stage3": (32, 16, 16), "last": (1280, 4, 4)}
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17  # one per inverted residual block
    assert all(m.groups == m.in_channels == m.out_channels and m.kernel_size == (3, 3) for m in depthwise)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)  # the registry's init_weights
