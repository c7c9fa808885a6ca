"""`landscape signs`, `overlap` and `metrics` as a user runs them, on small trained runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import run_cli, train_tiny
from test_dynamics import csv_rows_of

from sparse_training.checkpoint import checkpoint_payload, load_checkpoint, save_checkpoint
from sparse_training.io import torch_load_safe
from sparse_training.records import append_metrics, read_metrics
from sparse_training.rundir import RunDir
from sparse_training.config import ModelConfig
from sparse_training.models import build_model


@pytest.fixture(scope="module")
def imp_run(tmp_path_factory):
    """IMP with a rewind point at epoch 1: a dense cycle 0, then sparsity 0.2 and 0.36."""
    return train_tiny(tmp_path_factory.mktemp("runs") / "imp", "--method", "imp", "--sparsity", "0.36",
                      "--rewind-epoch", "1")


@pytest.fixture()
def pai(tiny_run, tmp_path):
    """A private copy of the shared pai-cyclic run, so that its analysis/ starts empty."""
    return shutil.copytree(tiny_run, tmp_path / "pai_cyclic", ignore=shutil.ignore_patterns("analysis", "figures"))


def as_json(*args: str, expect: int = 0) -> dict:
    return json.loads(run_cli(*args, "--json", expect=expect).stdout)


def fails(*args: str, code: int) -> str:
    """Run a command that must fail with `code` and one line on stderr; return that line."""
    result = run_cli(*args, expect=code)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and result.stdout == "", result.stderr
    return lines[0]


def independent_sign_count(reference_path, checkpoint_path) -> dict[str, tuple[int, int]]:
    """(kept in both, opposite signs) per layer, counted with numpy."""
    ref, ckpt = load_checkpoint(reference_path), load_checkpoint(checkpoint_path)
    out = {}
    for name in ckpt.masks:
        both = (ref.masks[name] & ckpt.masks[name]).numpy()
        signs = np.sign(ref.state_dict[name].numpy()) * np.sign(ckpt.state_dict[name].numpy())
        out[name] = (int(both.sum()), int((both & (signs < 0)).sum()))
    return out


# ---------------------------------------------------------------- signs

def test_signs_of_a_run_against_init_match_an_independent_count(pai):
    result = as_json("signs", str(pai))
    assert result["computed"] == ["init..cycle_000", "init..cycle_001", "init..cycle_002"]
    ds = xr.open_dataset(pai / "analysis" / "signs.nc")
    assert ds.flip_fraction.dims == ("pair", "layer") and str(ds.method.values) == "pai-cyclic"
    for pair in result["pairs"]:
        expected = independent_sign_count(pai / "checkpoints" / "init.pt", pai / "checkpoints" / f"{pair['checkpoint']}.pt")
        for layer, (kept_both, flipped) in expected.items():
            one = ds.sel(pair=pair["pair"], layer=layer)
            assert (one.kept_both.item(), one.flipped.item()) == (kept_both, flipped)
        assert pair["kept_both"] == sum(k for k, _ in expected.values())
        assert pair["flipped"] == sum(f for _, f in expected.values())
        # init is dense: every weight of the checkpoint's mask is compared
        assert (ds.kept_both.sel(pair=pair["pair"]) == ds.kept.sel(pair=pair["pair"])).all()
    assert ds.cycle.values.tolist() == [0, 1, 2]


def test_signs_skip_pairs_already_stored_and_add_other_references(pai):
    as_json("signs", str(pai))
    previous = as_json("signs", str(pai), "--reference", "previous")
    # pai-cyclic has no rewind point: cycle_000's previous checkpoint is init, already computed
    assert previous["reused"] == ["init..cycle_000"]
    assert previous["computed"] == ["cycle_000..cycle_001", "cycle_001..cycle_002"]
    again = as_json("signs", str(pai))
    assert again["computed"] == [] and len(again["reused"]) == 3
    ds = xr.open_dataset(pai / "analysis" / "signs.nc")
    assert ds.sizes["pair"] == 5 and set(ds.reference.values) == {"init", "cycle_000", "cycle_001"}
    summary = run_cli("signs", str(pai)).stdout
    assert "init..cycle_002" in summary and "flip_fraction" in summary
    assert len(as_json("signs", str(pai), "--overwrite")["computed"]) == 3


def test_imp_signs_against_the_rewind_point(imp_run):
    rewind = as_json("signs", str(imp_run), "--reference", "rewind")
    assert [p["pair"] for p in rewind["pairs"]] == ["rewind..cycle_000", "rewind..cycle_001", "rewind..cycle_002"]
    previous = as_json("signs", str(imp_run), "--reference", "previous")
    assert previous["pairs"][0]["pair"] == "rewind..cycle_000"
    # IMP masks only shrink: every weight kept by a cycle was kept by the one before it
    for pair in previous["pairs"]:
        ds = xr.open_dataset(imp_run / "analysis" / "signs.nc").sel(pair=pair["pair"])
        assert (ds.kept_both.values == ds.kept.values).all()


def test_signs_bad_input_is_a_one_line_error_with_the_right_exit_code(pai, tmp_path):
    assert "no rewind point" in fails("signs", str(pai), "--reference", "rewind", code=2)
    assert "first one is the reference" in fails("signs", f"{pai}@init", f"{pai}@cycle_001", "--reference", "init", code=2)
    fails("signs", str(pai / "checkpoints" / "init.pt"), code=2)
    fails("signs", str(pai), str(pai), str(pai), code=2)
    assert "has no checkpoint 'cycle_009'" in fails("signs", f"{pai}@init", f"{pai}@cycle_009", code=2)
    fails("signs", str(tmp_path / "missing"), code=2)
    other = tmp_path / "narrow.pt"
    ckpt = load_checkpoint(pai / "checkpoints" / "cycle_000.pt")
    config = ModelConfig(ckpt.model.name, {**ckpt.model.kwargs, "width": 4})
    model = build_model(config)
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.state_dict().items() if name in ckpt.masks}
    save_checkpoint(other, checkpoint_payload(model=model, masks=masks, model_config=config, data_config=ckpt.data,
                                              label="narrow", cycle=0, epoch=2, step=8, sparsity=0.0, method="dense",
                                              metrics={}, config={}))
    assert "compare checkpoints of the same architecture" in fails("signs", f"{pai}@cycle_000", str(other), "--out",
                                                                   str(tmp_path / "s.nc"), code=2)
    assert "same architecture" in fails("overlap", str(pai), str(other), "--out", str(tmp_path / "o.nc"), code=2)


def test_an_incomplete_run_exits_3_unless_allowed(pai):
    (pai / "DONE").unlink()
    for command in (["signs", str(pai)], ["overlap", str(pai), "--across-cycles"], ["metrics", str(pai)],
                    ["overlap", str(pai), f"{pai}@init"]):
        assert "incomplete" in fails(*command, code=3)
        run_cli(*command, "--allow-incomplete")


def test_signs_between_runs_and_of_plain_state_dicts(pai, imp_run, tmp_path):
    assert "--out" in fails("signs", f"{pai}@cycle_002", f"{imp_run}@cycle_002", code=2)
    across = as_json("signs", f"{pai}@cycle_002", str(imp_run), "--out", str(tmp_path / "s.nc"))
    assert across["pairs"][0]["pair"] == "pai_cyclic/cycle_002..imp/cycle_002"
    expected = independent_sign_count(pai / "checkpoints" / "cycle_002.pt", imp_run / "checkpoints" / "cycle_002.pt")
    assert across["pairs"][0]["kept_both"] == sum(k for k, _ in expected.values())
    assert across["pairs"][0]["flipped"] == sum(f for _, f in expected.values())

    # A user's plain state_dicts: the masks are their exact zeros, so the answer is the same.
    stored = as_json("signs", f"{pai}@cycle_000", f"{pai}@cycle_002")["pairs"][0]
    kwargs = json.dumps(load_checkpoint(pai / "checkpoints" / "cycle_000.pt").model.kwargs)
    for label in ("cycle_000", "cycle_002"):
        torch.save(torch_load_safe(pai / "checkpoints" / f"{label}.pt")["state_dict"], tmp_path / f"{label}.pt")
    plain_args = [str(tmp_path / "cycle_000.pt"), str(tmp_path / "cycle_002.pt"), "--out", str(tmp_path / "plain.nc")]
    assert "--model" in fails("signs", *plain_args, code=2)
    plain = as_json("signs", *plain_args, "--model", "resnet1d", "--model-kwargs", kwargs)["pairs"][0]
    assert plain["pair"] == "cycle_000..cycle_002"
    assert (plain["kept_both"], plain["flipped"]) == (stored["kept_both"], stored["flipped"])


# ---------------------------------------------------------------- overlap

def test_overlap_across_imp_cycles_sees_nested_masks(imp_run):
    result = run_cli("overlap", str(imp_run), "--across-cycles", "--json")
    assert "cycle_000 has no pruned weights (dense)" in result.stderr
    out = json.loads(result.stdout)
    assert out["masks"] == ["cycle_000", "cycle_001", "cycle_002"] and not out["reused"]
    ds = xr.open_dataset(imp_run / "analysis" / "overlap.nc")
    assert ds.jaccard.dims == ("mask_a", "mask_b", "layer")
    density = {m: out["density"][m] for m in out["masks"]}
    assert density["cycle_000"] == 1.0 and density["cycle_002"] == pytest.approx(0.64, abs=1e-3)
    one = ds.sel(mask_a="cycle_001", mask_b="cycle_002")
    # nested masks (cycle_002 inside cycle_001): coverage 1 and Jaccard = |B| / |A|, per layer too
    assert one.coverage_total.item() == 1.0
    assert one.jaccard_total.item() == pytest.approx(density["cycle_002"] / density["cycle_001"])
    assert np.allclose(one.jaccard.values, one.density_b.values / one.density_a.values)
    assert run_cli("overlap", str(imp_run), "--across-cycles", "--json").stdout.count('"reused": ["cycle_000", "cycle_001", "cycle_002"]') == 1


def test_overlap_of_two_runs_matches_numpy_and_notes_the_dense_mask(pai, imp_run, tiny_dense_run, tmp_path):
    out = tmp_path / "overlap.nc"
    result = run_cli("overlap", str(pai), f"{imp_run}@cycle_002", str(tiny_dense_run), "--out", str(out), "--json")
    assert "dense" in result.stderr and "dense/cycle_001" in result.stderr
    labels = json.loads(result.stdout)["masks"]
    assert labels == ["pai_cyclic/cycle_002", "imp/cycle_002", "dense/cycle_001"]
    ds = xr.open_dataset(out)
    a = load_checkpoint(pai / "checkpoints" / "cycle_002.pt").masks
    b = load_checkpoint(imp_run / "checkpoints" / "cycle_002.pt").masks
    for layer in a:
        x, y = a[layer].numpy(), b[layer].numpy()
        one = ds.sel(mask_a=labels[0], mask_b=labels[1], layer=layer)
        assert one.jaccard.item() == pytest.approx((x & y).sum() / (x | y).sum())
        assert one.chance_intersection.item() == pytest.approx(x.mean() * y.mean())
    with_dense = ds.sel(mask_a=labels[0], mask_b=labels[2])
    assert with_dense.intersection_total.item() == pytest.approx(with_dense.density_a_total.item())
    assert with_dense.intersection_ratio_total.item() == pytest.approx(1.0)
    assert str(ds.run.values) == "" and "command" in ds.attrs


def test_overlap_bad_input(pai, tiny_dense_run, tmp_path):
    assert "given twice" in fails("overlap", str(pai), str(pai), "--out", str(tmp_path / "o.nc"), code=2)
    assert "--across-cycles" in fails("overlap", str(pai), code=2)
    assert "--out" in fails("overlap", str(pai), str(tiny_dense_run), code=2)
    assert "not a run directory" in fails("overlap", f"{tmp_path}/nothing@cycle_000", str(pai), code=2)
    assert "one run directory" in fails("overlap", str(pai), str(pai), "--across-cycles", code=2)


# ---------------------------------------------------------------- metrics

def test_metrics_of_one_run_round_trip_its_csv(pai):
    result = as_json("metrics", str(pai))
    assert result["output"] == str(RunDir(pai).analysis_file("metrics")) and not result["reused"]
    assert [row["cycle"] for row in result["cycles"]] == [0, 1, 2]
    ds = xr.open_dataset(pai / "analysis" / "metrics.nc")
    assert ds.sparsity.sel(run="pai_cyclic").values.tolist() == [0.5, 0.5, 0.5]
    assert ds.training_flops.sel(run="pai_cyclic").item() == ds.flops.sel(run="pai_cyclic").max().item() > 0
    rebuilt = RunDir(pai.parent / "rebuilt")
    rebuilt.path.mkdir()
    append_metrics(rebuilt, csv_rows_of(ds, "pai_cyclic"))
    # the same rows in the same order with the same values (training writes FLOPs as integers)
    assert read_metrics(rebuilt) == read_metrics(RunDir(pai))
    assert as_json("metrics", str(pai))["reused"]
    with open(pai / "metrics.csv", "a") as handle:  # new rows: the dataset is rebuilt
        handle.write("3,0,24,train,loss,1.5\n")
    assert not as_json("metrics", str(pai))["reused"]


def test_metrics_of_several_runs_need_out(pai, imp_run, tmp_path):
    assert "--out" in fails("metrics", str(pai), str(imp_run), code=2)
    result = as_json("metrics", str(pai), str(imp_run), "--out", str(tmp_path / "m.nc"))
    assert result["runs"] == ["pai_cyclic", "imp"]
    ds = xr.open_dataset(tmp_path / "m.nc")
    assert ds.method.values.tolist() == ["pai-cyclic", "imp"]
    assert ds.sparsity.sel(run="imp").values == pytest.approx([0.0, 0.2, 0.36], abs=1e-3)
    assert "not a run directory" in fails("metrics", str(pai / "metrics.csv"), code=2)
