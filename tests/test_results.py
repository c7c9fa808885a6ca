"""landscape.results: the one helper every analysis updates its dataset through (reuse what is
done, refuse other settings, merge in order, keep what an interrupted run finished), and the
top-level JSON keys every analysis command shares."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import xarray as xr

from conftest import run_cli
from landscape import store
from landscape.results import merge_along, update_labels, update_whole
from sparse_training.errors import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "pre_renovation_run"


def part(label: str, value: float, run: str = "r", inputs: tuple[str, ...] = ()) -> xr.Dataset:
    """A one-label dataset along `item`, as an analysis computes it."""
    ds = xr.Dataset({"v": store.described([value], ("item",), "v", "1", "a value")},
                    coords={"item": [label], "run": run, "method": "m"})
    ds.attrs = {"analysis": "toy", "inputs": json.dumps(list(inputs)), "settings": store.settings_json({"k": 1})}
    return ds


class Toy:
    """prepare/merge for update_labels that records what it computed and can fail on a label."""

    def __init__(self, fail_on: str | None = None):
        self.computed: list[str] = []
        self.fail_on = fail_on

    def prepare(self, todo: list[str]):
        def compute(label: str) -> xr.Dataset:
            if label == self.fail_on:
                raise RuntimeError(f"killed at {label}")
            self.computed.append(label)
            return part(label, float(len(self.computed)), inputs=(f"{label}.pt",))

        return compute

    def update(self, path: Path, labels: list[str], settings=None, overwrite: bool = False):
        return update_labels(path, "toy", labels, self.prepare, lambda ds, new: merge_along(ds, new, "item"),
                             dim="item", settings={"k": 1} if settings is None else settings, overwrite=overwrite)


def test_labels_already_stored_are_reused_and_only_the_missing_ones_computed(tmp_path):
    path = tmp_path / "toy.nc"
    first = Toy().update(path, ["a", "b"])
    assert (first.computed, first.reused) == (["a", "b"], [])
    stamp = path.stat().st_mtime_ns
    toy = Toy()
    second = toy.update(path, ["c", "a", "b"])
    assert toy.computed == ["c"] and (second.computed, second.reused, second.labels) == (["c"], ["a", "b"], ["c", "a", "b"])
    ds = store.read_dataset(path)
    assert ds["item"].values.tolist() == ["a", "b", "c"]  # merged after the stored ones
    assert json.loads(ds.attrs["inputs"]) == ["a.pt", "b.pt", "c.pt"]
    toy = Toy()
    assert toy.update(path, ["a"]).reused == ["a"] and toy.computed == []
    assert path.stat().st_mtime_ns > stamp


def test_other_settings_are_refused_unless_overwrite(tmp_path):
    path = tmp_path / "toy.nc"
    Toy().update(path, ["a", "b"])
    with pytest.raises(UserError, match=r"other settings \(k=1 there, 2 now\); pass --overwrite") as error:
        Toy().update(path, ["a"], settings={"k": 2})
    assert "\n" not in str(error.value)
    replaced = Toy().update(path, ["a"], settings={"k": 2}, overwrite=True)
    assert replaced.computed == ["a"] and store.read_dataset(path)["item"].values.tolist() == ["a"]
    store.write_dataset(xr.Dataset(attrs={"analysis": "other"}), path)
    with pytest.raises(UserError, match="is not a toy dataset"):
        Toy().update(path, ["a"])


def test_overwrite_recomputes_what_is_asked_and_keeps_the_rest_of_a_file_with_the_same_settings(tmp_path):
    path = tmp_path / "toy.nc"
    Toy().update(path, ["a", "b"])
    toy = Toy()
    again = toy.update(path, ["b"], overwrite=True)
    assert toy.computed == ["b"] and again.reused == []
    assert store.read_dataset(path)["item"].values.tolist() == ["a", "b"]


def test_an_interrupted_computation_keeps_the_labels_it_finished(tmp_path):
    path = tmp_path / "toy.nc"
    with pytest.raises(RuntimeError, match="killed at c"):
        Toy(fail_on="c").update(path, ["a", "b", "c", "d"])
    assert store.read_dataset(path)["item"].values.tolist() == ["a", "b"]
    rerun = Toy().update(path, ["a", "b", "c", "d"])
    assert (rerun.computed, rerun.reused) == (["c", "d"], ["a", "b"])


def test_merge_appends_new_and_replaced_labels_and_keeps_scalars_only_where_they_agree():
    merged = merge_along(merge_along(None, part("a", 1.0), "item"), part("b", 2.0, run="s"), "item")
    assert merged["item"].values.tolist() == ["a", "b"] and str(merged.run.values) == ""
    replaced = merge_along(merged, part("a", 5.0), "item")
    assert replaced["item"].values.tolist() == ["b", "a"] and replaced.v.values.tolist() == [2.0, 5.0]
    assert str(merge_along(part("a", 1.0), part("b", 2.0), "item").method.values) == "m"


def test_a_whole_dataset_is_reused_with_the_same_inputs_and_replaced_otherwise(tmp_path):
    path, notes = tmp_path / "whole.nc", []
    attrs = {**part("x", 0.0).attrs, "analysis": "whole"}
    made = update_whole(path, "whole", ["x"], lambda: part("x", 1.0), attrs)
    assert (made.computed, made.reused) == (["x"], [])
    kept = update_whole(path, "whole", ["x"], lambda: pytest.fail("recomputed"), attrs)
    assert (kept.computed, kept.reused) == ([], ["x"])
    changed = {**attrs, "settings": store.settings_json({"k": 2})}
    redone = update_whole(path, "whole", ["x"], lambda: part("x", 3.0), changed, log=notes.append)
    assert redone.computed == ["x"] and "replacing it" in notes[0]
    assert store.read_dataset(path).v.values.tolist() == [3.0]


def test_every_analysis_command_prints_the_same_top_level_keys(tmp_path):
    run = Path(shutil.copytree(FIXTURE, tmp_path / FIXTURE.name))
    checkpoints = run / "checkpoints"
    commands = [["barrier", checkpoints / "cycle_000.pt", checkpoints / "cycle_001.pt", "--points", "3"],
                ["connectivity", run, "--points", "3"], ["sharpness", run, "--samples", "64"], ["signs", run],
                ["overlap", run, "--across-cycles"], ["metrics", run]]
    for command in commands:
        result = json.loads(run_cli(*map(str, command), "--json").stdout)
        assert {"computed", "reused", "output"} <= set(result), command
        assert result["computed"] == [] and result["reused"], command
        assert Path(result["output"]).parent == run / "analysis", command


def test_checkpoints_outside_any_run_get_their_dataset_beside_the_first_one(tmp_path):
    for label in ("cycle_000", "cycle_001"):
        shutil.copy(FIXTURE / "checkpoints" / f"{label}.pt", tmp_path / f"{label}.pt")
    a, b = str(tmp_path / "cycle_000.pt"), str(tmp_path / "cycle_001.pt")
    for command, name in ((["signs", a, b], "signs"), (["overlap", a, b], "overlap")):
        result = json.loads(run_cli(*command, "--json").stdout)
        assert result["output"] == str(tmp_path / f"cycle_000__cycle_001.{name}.nc") and result["computed"]
