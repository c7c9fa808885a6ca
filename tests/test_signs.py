"""Sign flips against hand counts; reference choice; the dataset and its merge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from landscape.signs import SignCounts, SignPair, merge_signs, reference_pairs, sign_counts, signs_dataset
from sparse_training.errors import UserError


def bools(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits])


# Layer "a": reference and checkpoint values, masks; the expected counts done by hand below.
REF = {"a": torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, 0.0, 7.0, -8.0]), "b": torch.tensor([[0.5, -0.5], [0.5, -0.5]])}
NEW = {"a": torch.tensor([2.0, 2.0, -3.0, -1.0, 0.0, 1.0, -7.0, 8.0]), "b": torch.tensor([[-0.1, -0.1], [0.2, 0.3]])}
REF_MASK = {"a": bools("11111101"), "b": torch.tensor([[True, True], [True, False]])}
NEW_MASK = {"a": bools("11111110"), "b": torch.tensor([[True, True], [False, True]])}


def test_hand_built_pair_matches_hand_count_per_layer():
    counts = sign_counts(REF, NEW, REF_MASK, NEW_MASK)
    # layer a, kept in both: indices 0..5. 0: +/+ same; 1: -/+ flip; 2: +/- flip; 3: -/- same;
    # 4: +/0 zero; 5: 0/+ zero. Index 6 (+/-) is pruned in the reference, 7 in the checkpoint.
    assert counts["a"] == SignCounts(kept_both=6, flipped=2, matched=2, zero_valued=2, kept=7)
    # layer b, kept in both: (0,0) +/- flip, (0,1) -/- same; (1,0) and (1,1) are pruned in one of them.
    assert counts["b"] == SignCounts(kept_both=2, flipped=1, matched=1, zero_valued=0, kept=3)


def test_weights_pruned_in_either_checkpoint_never_count():
    ref, new = {k: v.clone() for k, v in REF.items()}, {k: v.clone() for k, v in NEW.items()}
    for name in ref:  # flip every value outside the common mask: nothing may change
        outside = ~(REF_MASK[name] & NEW_MASK[name])
        ref[name][outside] = -ref[name][outside] - 1.0
        new[name][outside] = 3.0
    assert sign_counts(ref, new, REF_MASK, NEW_MASK) == sign_counts(REF, NEW, REF_MASK, NEW_MASK)


def test_tiny_weights_of_opposite_sign_flip_although_their_product_underflows():
    counts = sign_counts({"w": torch.tensor([1e-30, 1e-30])}, {"w": torch.tensor([-1e-30, 2e-30])},
                         {"w": bools("11")}, {"w": bools("11")})
    assert counts["w"] == SignCounts(kept_both=2, flipped=1, matched=1, zero_valued=0, kept=2)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 1.0), st.floats(0.05, 1.0))
def test_counts_partition_the_common_mask(seed, p_ref, p_new):
    generator = torch.Generator().manual_seed(seed)
    shape = (17, 5)
    ref_w, new_w = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    new_w[0, :3] = 0.0  # a few kept weights exactly zero
    ref_m, new_m = torch.rand(shape, generator=generator) < p_ref, torch.rand(shape, generator=generator) < p_new
    c = sign_counts({"w": ref_w}, {"w": new_w}, {"w": ref_m}, {"w": new_m})["w"]
    both = (ref_m & new_m).numpy()
    product = np.sign(ref_w.numpy()) * np.sign(new_w.numpy())
    assert c.kept_both == both.sum() == c.flipped + c.matched + c.zero_valued
    assert c.flipped == np.sum(both & (product < 0)) and c.kept == new_m.sum()


def test_references_of_a_run():
    with_rewind = ["init", "rewind", "cycle_000", "cycle_001", "cycle_002"]
    assert reference_pairs(with_rewind, "init", "r") == [("init", "cycle_000"), ("init", "cycle_001"), ("init", "cycle_002")]
    assert reference_pairs(with_rewind, "rewind", "r")[0] == ("rewind", "cycle_000")
    assert reference_pairs(with_rewind, "previous", "r") == [("rewind", "cycle_000"), ("cycle_000", "cycle_001"),
                                                             ("cycle_001", "cycle_002")]
    assert reference_pairs(["init", "cycle_000", "cycle_001"], "previous", "r") == [("init", "cycle_000"),
                                                                                     ("cycle_000", "cycle_001")]
    with pytest.raises(UserError, match="no rewind point"):
        reference_pairs(["init", "cycle_000"], "rewind", "r")
    with pytest.raises(UserError, match="no cycle checkpoint"):
        reference_pairs(["init"], "init", "r")


def _pair(reference: str, checkpoint: str, a: SignCounts, b: SignCounts) -> SignPair:
    return SignPair(reference, checkpoint, int(checkpoint[-3:]), {"l1": a, "l2": b})


def test_dataset_totals_fractions_and_nan_for_an_empty_common_mask():
    empty = SignCounts(kept_both=0, flipped=0, matched=0, zero_valued=0, kept=0)
    ds = signs_dataset([_pair("init", "cycle_000", SignCounts(10, 3, 6, 1, 12), SignCounts(30, 6, 24, 0, 40)),
                        _pair("init", "cycle_001", SignCounts(5, 5, 0, 0, 5), empty)], run="r", method="imp")
    assert ds.flip_fraction.dims == ("pair", "layer") and list(ds.pair.values) == ["init..cycle_000", "init..cycle_001"]
    first = ds.sel(pair="init..cycle_000")
    assert first.flip_fraction.sel(layer="l1").item() == pytest.approx(0.3)
    assert first.match_fraction.sel(layer="l1").item() == pytest.approx(0.5)
    assert first.kept_both_total.item() == 40 and first.flipped_total.item() == 9
    assert first.flip_fraction_total.item() == pytest.approx(9 / 40)
    assert first.match_fraction_total.item() == pytest.approx(30 / 52)
    assert math.isnan(ds.flip_fraction.sel(pair="init..cycle_001", layer="l2").item())
    assert ds.flip_fraction.attrs["allow_nan"] == 1
    assert ds.cycle.values.tolist() == [0, 1] and ds.reference.values.tolist() == ["init", "init"]
    assert str(ds.run.values) == "r" and str(ds.method.values) == "imp"
    for var in ds.data_vars.values():
        assert {"long_name", "units", "description"} <= set(var.attrs)


def test_merge_replaces_pairs_of_the_same_label_and_appends_new_ones():
    c = SignCounts(4, 1, 3, 0, 4)
    old = signs_dataset([_pair("init", "cycle_000", c, c), _pair("init", "cycle_001", c, c)], run="r", method="imp")
    changed = SignCounts(4, 4, 0, 0, 4)
    new = signs_dataset([_pair("init", "cycle_001", changed, changed), _pair("cycle_000", "cycle_001", c, c)],
                        run="r", method="imp")
    merged = merge_signs(old, new)
    assert list(merged.pair.values) == ["init..cycle_000", "init..cycle_001", "cycle_000..cycle_001"]
    assert merged.flipped_total.sel(pair="init..cycle_001").item() == 8
    assert merged.reference.values.tolist() == ["init", "init", "cycle_000"]
    assert str(merged.run.values) == "r"
    other_run = signs_dataset([_pair("init", "cycle_002", c, c)], run="s", method="imp")
    assert str(merge_signs(old, other_run).run.values) == ""
    other_layers = SignPair("init", "cycle_002", 2, {"x": c})
    with pytest.raises(UserError, match="other layers"):
        merge_signs(old, signs_dataset([other_layers]))
