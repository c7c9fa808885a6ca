"""Training FLOPs of attention layers and depthwise/grouped convolutions, every number
counted by hand (one multiply-add = one FLOP, per sample)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from sparse_training.flops import FlopCounter, LayerCost, forward_flops, layer_costs
from sparse_training.masks import ones_mask, prunable_parameters


class SelfAttention(nn.Module):
    """(N, L, E) input; batch_first or sequence-first attention, keyword arguments when asked."""

    def __init__(self, batch_first: bool = True, keywords: bool = False, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kwargs)
        self.keywords = keywords

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.attn.batch_first:
            x = x.transpose(0, 1)
        if self.keywords:
            return self.attn(query=x, key=x, value=x, need_weights=False)[0]
        return self.attn(x, x, x, need_weights=False)[0]


class CrossAttention(nn.Module):
    """kdim 6, vdim 4 (separate q/k/v_proj_weight): input (N, 4, 18) holds a query of 3
    tokens of 8 (x[:, :3, :8]), keys of 4 tokens of 6 and values of 4 tokens of 4."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x[:, :3, :8], x[:, :, 8:14], x[:, :, 14:18], need_weights=False)[0]


class UnbatchedTwice(nn.Module):
    """No biases, sequence-first, unbatched 2-D inputs, called twice: self-attention on 5
    tokens, then 2 query tokens attending to the 5."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x[0]
        first = self.attn(tokens, tokens, tokens, need_weights=False)[0]
        second = self.attn(tokens[:2], tokens, tokens, need_weights=False)[0]
        return first.sum() + second.sum()


# MultiheadAttention(8, 2) on L = S = 5 tokens, per sample:
#   query rows of in_proj_weight: 8 x 8 = 64 weights x 5 uses = 320
#   key and value rows:          16 x 8 = 128 weights x 5 uses = 640
#   in_proj_bias: 5 x 8 + 2 x 5 x 8 = 120
#   Q K^T and attention x V: 2 x (5 x 5 x 8) = 400
#   out_proj: 64 x 5 = 320, its bias 5 x 8 = 40
#   total 320 + 640 + 120 + 400 + 320 + 40 = 1840
SELF_ATTENTION_DENSE = 1840


def _attention_mask() -> dict[str, torch.Tensor]:
    in_proj = torch.ones(24, 8, dtype=torch.bool)
    in_proj[0:2] = False  # 2 query rows: 16 weights
    in_proj[10] = False  # a key row: 8 weights
    in_proj[20] = False  # a value row: 8 weights
    in_proj[15, 3] = False  # one more key weight: 17 key/value weights pruned
    out_proj = torch.ones(8, 8, dtype=torch.bool)
    out_proj[0] = False
    out_proj[:, 7] = False  # 8 + 7 = 15 pruned, 49 kept
    return {"attn.in_proj_weight": in_proj, "attn.out_proj.weight": out_proj}


# Masked: query (64 - 16) x 5 = 240; key/value (128 - 17) x 5 = 555; biases 120; matmuls 400;
# out_proj 49 x 5 = 245 + 40 = 285: 240 + 555 + 120 + 400 + 285 = 1600
SELF_ATTENTION_MASKED = 1600


def _assert_everything_prunable_is_counted(model: nn.Module, costs: list[LayerCost]) -> None:
    counted = {c.weight for c in costs}
    assert set(prunable_parameters(model)) <= counted
    assert forward_flops(costs, ones_mask(model)) == forward_flops(costs)


def test_self_attention_by_hand():
    model = SelfAttention()
    costs = layer_costs(model, (5, 8))
    assert costs == [
        LayerCost("attn", "attn.in_proj_weight", 5, 64, 40, (0, 8)),
        LayerCost("attn", "attn.in_proj_weight", 5, 128, 80, (8, 24)),
        LayerCost("attn", None, 0, 0, 400),
        LayerCost("attn.out_proj", "attn.out_proj.weight", 5, 64, 40),
    ]
    assert forward_flops(costs) == SELF_ATTENTION_DENSE
    assert forward_flops(costs, _attention_mask()) == SELF_ATTENTION_MASKED
    # out_proj is counted once, through the attention module, never again as a Linear
    assert [c.weight for c in costs].count("attn.out_proj.weight") == 1
    _assert_everything_prunable_is_counted(model, costs)


@pytest.mark.parametrize("keywords", [False, True])
def test_sequence_first_attention_counts_the_same(keywords):
    model = SelfAttention(batch_first=False, keywords=keywords)
    costs = layer_costs(model, (5, 8))
    assert forward_flops(costs) == SELF_ATTENTION_DENSE
    assert forward_flops(costs, _attention_mask()) == SELF_ATTENTION_MASKED


def test_extra_keys_of_add_bias_kv_and_add_zero_attn_are_attended():
    # 5 keys + bias_k + a zero key = 7 attended: matmuls 2 x 5 x 7 x 8 = 560 instead of 400
    model = SelfAttention(add_bias_kv=True, add_zero_attn=True)
    costs = layer_costs(model, (5, 8))
    assert forward_flops(costs) == 1840 - 400 + 560
    _assert_everything_prunable_is_counted(model, costs)


def test_cross_attention_with_separate_projections_by_hand():
    model = CrossAttention()
    costs = layer_costs(model, (4, 18))
    # L = 3 query tokens, S = 4 key/value tokens, E = 8:
    #   q_proj (8, 8) = 64 x 3 = 192; k_proj (8, 6) = 48 x 4 = 192; v_proj (8, 4) = 32 x 4 = 128
    #   in_proj_bias 3 x 8 + 2 x 4 x 8 = 24 + 64 = 88 (split 24, 32, 32)
    #   matmuls 2 x (3 x 4 x 8) = 192; out_proj 64 x 3 = 192 + bias 3 x 8 = 24
    assert costs == [
        LayerCost("attn", "attn.q_proj_weight", 3, 64, 24),
        LayerCost("attn", "attn.k_proj_weight", 4, 48, 32),
        LayerCost("attn", "attn.v_proj_weight", 4, 32, 32),
        LayerCost("attn", None, 0, 0, 192),
        LayerCost("attn.out_proj", "attn.out_proj.weight", 3, 64, 24),
    ]
    # 192 + 192 + 128 + 88 + 192 + 192 + 24 = 1008
    assert forward_flops(costs) == 1008
    mask = ones_mask(model)
    mask["attn.q_proj_weight"] = torch.eye(8, dtype=torch.bool)  # 8 kept: (64 - 8) x 3 = 168 fewer
    mask["attn.k_proj_weight"][:, 0] = False  # 8 pruned: 8 x 4 = 32 fewer
    mask["attn.v_proj_weight"][0] = False  # 4 pruned: 4 x 4 = 16 fewer
    assert forward_flops(costs, mask) == 1008 - 168 - 32 - 16  # 792
    _assert_everything_prunable_is_counted(model, costs)


def test_unbatched_attention_called_twice_accumulates():
    model = UnbatchedTwice()
    costs = layer_costs(model, (5, 8))
    # query tokens 5 + 2 = 7, key/value tokens 5 + 5 = 10, pairs 5 x 5 + 2 x 5 = 35, no biases:
    #   query rows 64 x 7 = 448; key/value rows 128 x 10 = 1280; matmuls 2 x 35 x 8 = 560;
    #   out_proj 64 x 7 = 448: 448 + 1280 + 560 + 448 = 2736
    assert [(c.uses, c.dense) for c in costs] == [(7, 0), (10, 0), (0, 560), (7, 0)]
    assert forward_flops(costs) == 2736
    _assert_everything_prunable_is_counted(model, costs)


def test_tiny_torchvision_vit_by_hand():
    model = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2,
                                                 hidden_dim=8, mlp_dim=16, num_classes=3)
    costs = layer_costs(model, (3, 8, 8))
    # conv_proj Conv2d(3 -> 8, kernel 4, stride 4) on 8 x 8: 2 x 2 positions,
    #   3 x 4 x 4 x 8 = 384 weights x 4 = 1536, bias 8 x 4 = 32                       -> 1568
    # 4 patches + the class token = 5 tokens of 8 (position embedding: an addition, 0)
    # ln_1: 2 x 5 x 8 = 80
    # self_attention, L = S = 5, E = 8: 320 + 640 + 120 + 400 + 320 + 40 (as above)  -> 1840
    # ln_2: 80
    # mlp Linear(8 -> 16) on 5 tokens: 128 x 5 = 640 + bias 16 x 5 = 80               -> 720
    #     Linear(16 -> 8): 128 x 5 = 640 + bias 8 x 5 = 40 (GELU, dropout: 0)          -> 680
    # encoder.ln on all 5 tokens: 80
    # heads.head Linear(8 -> 3) on the class token only: 24 + bias 3                 -> 27
    # 1568 + 80 + 1840 + 80 + 720 + 680 + 80 + 27 = 5075
    by_module = {}
    for c in costs:
        by_module[c.module] = by_module.get(c.module, 0) + forward_flops([c])
    assert by_module == {
        "conv_proj": 1568,
        "encoder.layers.encoder_layer_0.ln_1": 80,
        "encoder.layers.encoder_layer_0.self_attention": 320 + 640 + 120 + 400,
        "encoder.layers.encoder_layer_0.self_attention.out_proj": 320 + 40,
        "encoder.layers.encoder_layer_0.ln_2": 80,
        "encoder.layers.encoder_layer_0.mlp.0": 720,
        "encoder.layers.encoder_layer_0.mlp.3": 680,
        "encoder.ln": 80,
        "heads.head": 27,
    }
    assert forward_flops(costs) == 5075
    _assert_everything_prunable_is_counted(model, costs)


def test_depthwise_and_grouped_convolutions_by_hand():
    depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)  # weight (4, 1, 3, 3) = 36
    costs = layer_costs(depthwise, (4, 5, 5))
    # 4 x 5 x 5 = 100 outputs, each 1 x 3 x 3 = 9 multiply-adds: 900 = 36 weights x 25 positions;
    # bias 100: 1000
    assert costs == [LayerCost("", "weight", 25, 36, 100)]
    assert forward_flops(costs) == 1000
    mask = torch.zeros(4, 1, 3, 3, dtype=torch.bool)
    mask[0] = True  # channel 0's 9 weights
    mask[1, 0, 1, 1] = True  # and channel 1's centre: 10 kept
    assert forward_flops(costs, {"weight": mask}) == 10 * 25 + 100  # 350

    grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)  # weight (4, 2, 3, 3) = 72
    costs = layer_costs(grouped, (4, 5, 5))
    # 100 outputs, each 2 x 3 x 3 = 18 multiply-adds: 1800 = 72 x 25; bias 100: 1900
    assert costs == [LayerCost("", "weight", 25, 72, 100)]
    assert forward_flops(costs) == 1900
    mask = torch.zeros(4, 2, 3, 3, dtype=torch.bool)
    mask[:2] = True  # output channels 0 and 1: 36 kept
    mask[3, 1, 0, :] = True  # 3 more: 39 kept
    assert forward_flops(costs, {"weight": mask}) == 39 * 25 + 100  # 1075


def test_counter_on_attention():
    counter = FlopCounter(layer_costs(SelfAttention(), (5, 8)))
    counter.add_step(4)  # 4 x 3 x 1840
    assert counter.total == 22080
    counter.set_mask(_attention_mask())
    # pruned weights' multiply-adds: query 16 x 5 + key/value 17 x 5 + out_proj 15 x 5 = 240
    assert counter.dense_gradient_extra == 240 == SELF_ATTENTION_DENSE - SELF_ATTENTION_MASKED
    counter.add_step(4)  # 4 x 3 x 1600
    assert counter.total == 22080 + 19200
    counter.add_step(2, dense_gradient=True)  # 2 x (3 x 1600 + 240)
    assert counter.total == 22080 + 19200 + 10080
