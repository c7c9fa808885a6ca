"""Mask overlap against hand-counted masks, closed-form chance levels and sampling bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from landscape.overlap import overlap_dataset, require_same_layout
from landscape.store import read_dataset, write_dataset
from sparse_training.errors import UserError


def mask(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits])


def test_identical_masks_have_jaccard_one_and_no_hamming_distance():
    a = {"fc1.weight": mask("1101000111"), "fc2.weight": mask("0110")}
    ds = overlap_dataset(["a", "b"], [a, {k: v.clone() for k, v in a.items()}])
    one = ds.sel(mask_a="a", mask_b="b")
    assert np.all(one.jaccard.values == 1.0) and one.jaccard_total.item() == 1.0
    assert np.all(one.hamming.values == 0.0) and np.all(one.coverage.values == 1.0)
    assert one.intersection.sel(layer="fc1.weight").item() == pytest.approx(0.6)
    assert one.intersection_total.item() == pytest.approx(8 / 14)


def test_disjoint_masks_have_jaccard_zero():
    a = {"w": mask("11000000"), "v": mask("1000")}
    b = {"w": mask("00111000"), "v": mask("0111")}
    one = overlap_dataset(["a", "b"], [a, b]).sel(mask_a="a", mask_b="b")
    assert np.all(one.jaccard.values == 0.0) and one.jaccard_total.item() == 0.0
    assert np.all(one.intersection.values == 0.0)
    assert one.hamming.sel(layer="w").item() == pytest.approx(5 / 8)
    assert one.hamming_total.item() == pytest.approx(9 / 12)


def test_hand_counted_pair_with_layer_weighted_chance_totals():
    # layer w (n=10): |A|=4, |B|=5, |A&B|=2, |A^B|=5;  layer v (n=4): |A|=2, |B|=1, |A&B|=1, |A^B|=1
    a = {"w": mask("1111000000"), "v": mask("1100")}
    b = {"w": mask("0011111000"), "v": mask("0100")}
    ds = overlap_dataset(["a", "b"], [a, b])
    w = ds.sel(mask_a="a", mask_b="b", layer="w")
    assert w.intersection.item() == pytest.approx(0.2)
    assert w.jaccard.item() == pytest.approx(2 / 7)
    assert w.coverage.item() == pytest.approx(2 / 5)
    assert w.hamming.item() == pytest.approx(0.5)
    assert w.chance_intersection.item() == pytest.approx(0.4 * 0.5)
    assert w.chance_jaccard.item() == pytest.approx(0.2 / (0.4 + 0.5 - 0.2))
    assert w.chance_hamming.item() == pytest.approx(0.4 + 0.5 - 2 * 0.2)
    assert w.chance_coverage.item() == pytest.approx(0.4)
    assert w.jaccard_ratio.item() == pytest.approx((2 / 7) / (0.2 / 0.7))
    total = ds.sel(mask_a="a", mask_b="b")
    assert total.intersection_total.item() == pytest.approx(3 / 14)
    assert total.jaccard_total.item() == pytest.approx(3 / 9)  # union: 7 + 2
    assert total.coverage_total.item() == pytest.approx(3 / 6)
    assert total.hamming_total.item() == pytest.approx(6 / 14)
    # expected |A&B| of independent masks: 10 * 0.4 * 0.5 + 4 * 0.5 * 0.25 = 2.5
    assert total.chance_intersection_total.item() == pytest.approx(2.5 / 14)
    assert total.chance_jaccard_total.item() == pytest.approx(2.5 / (6 + 6 - 2.5))
    assert total.chance_hamming_total.item() == pytest.approx((6 + 6 - 5) / 14)
    assert total.chance_coverage_total.item() == pytest.approx(2.5 / 6)
    assert total.density_a_total.item() == pytest.approx(6 / 14)
    # coverage is asymmetric: |A&B| / |B| one way, / |A| the other
    assert ds.coverage_total.sel(mask_a="b", mask_b="a").item() == pytest.approx(3 / 6)
    assert ds.coverage.sel(mask_a="b", mask_b="a", layer="w").item() == pytest.approx(2 / 4)


def test_independent_random_masks_meet_chance_within_sampling_error():
    n, p_a, p_b = 400_000, 0.3, 0.6
    generator = torch.Generator().manual_seed(0)
    a = {"big": torch.rand(n, generator=generator) < p_a}
    b = {"big": torch.rand(n, generator=generator) < p_b}
    one = overlap_dataset(["a", "b"], [a, b]).sel(mask_a="a", mask_b="b", layer="big")
    # Each weight is in both masks with probability p_a p_b independently: |A and B| is
    # binomial, and 5 standard errors bound the deviation (fails with probability < 1e-6).
    bound = 5 * math.sqrt(p_a * p_b * (1 - p_a * p_b) / n)
    assert abs(one.intersection.item() - p_a * p_b) < bound
    assert abs(one.intersection.item() - one.chance_intersection.item()) < bound
    assert one.intersection_ratio.item() == pytest.approx(1.0, abs=0.02)
    assert one.jaccard_ratio.item() == pytest.approx(1.0, abs=0.02)
    assert one.hamming.item() == pytest.approx(one.chance_hamming.item(), abs=0.01)
    assert one.density_a.item() == pytest.approx(p_a, abs=0.005)


def test_masks_drawn_layer_by_layer_beat_global_chance_but_not_layerwise_chance():
    # Two layers with very different densities: independent masks still agree more than
    # the global densities predict; the layer-weighted chance total accounts for that.
    generator = torch.Generator().manual_seed(1)
    draw = lambda: {"dense": torch.rand(50_000, generator=generator) < 0.9,  # noqa: E731
                    "sparse": torch.rand(50_000, generator=generator) < 0.1}
    one = overlap_dataset(["a", "b"], [draw(), draw()]).sel(mask_a="a", mask_b="b")
    global_chance = one.density_a_total.item() * one.density_b_total.item()
    assert one.intersection_total.item() > 1.5 * global_chance
    assert one.intersection_ratio_total.item() == pytest.approx(1.0, abs=0.02)


def test_empty_layer_gives_nan_fractions_that_the_store_accepts(tmp_path):
    a = {"w": mask("0000"), "v": mask("1010")}
    b = {"w": mask("0000"), "v": mask("0110")}
    ds = overlap_dataset(["a", "b"], [a, b])
    assert math.isnan(ds.jaccard.sel(mask_a="a", mask_b="b", layer="w").item())
    assert ds.hamming.sel(mask_a="a", mask_b="b", layer="w").item() == 0.0
    back = read_dataset(write_dataset(ds, tmp_path / "overlap.nc"))
    assert back.jaccard_total.sel(mask_a="a", mask_b="b").item() == pytest.approx(1 / 3)
    assert list(back.mask_a.values) == ["a", "b"] and list(back.layer.values) == ["w", "v"]


def test_every_variable_is_described_and_the_diagonal_is_self_overlap():
    generator = torch.Generator().manual_seed(2)
    masks = [{"w": torch.rand(3, 7, generator=generator) < 0.5} for _ in range(3)]
    ds = overlap_dataset(["x", "y", "z"], masks)
    assert ds.jaccard.dims == ("mask_a", "mask_b", "layer") and ds.jaccard_total.dims == ("mask_a", "mask_b")
    for var in ds.data_vars.values():
        assert {"long_name", "units", "description"} <= set(var.attrs)
    assert np.allclose(np.diagonal(ds.jaccard_total.values), 1.0)
    assert np.allclose(ds.jaccard_total.values, ds.jaccard_total.values.T)


def test_different_layouts_are_user_errors():
    with pytest.raises(UserError, match="different parameters"):
        require_same_layout({"a": torch.zeros(2)}, {"b": torch.zeros(2)}, "x", "y")
    with pytest.raises(UserError, match=r"shape \(2,\) vs \(3,\)"):
        require_same_layout({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, "x", "y")
