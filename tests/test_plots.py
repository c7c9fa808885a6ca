"""Figures (landscape.plots) on small hand-made datasets, and `landscape plot` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from click.testing import CliRunner

import plot_datasets as make
from plot_datasets import METHOD_STYLE
from cli.main import cli
from landscape import plots
from landscape.store import write_dataset


def _one_sharpness_per_method():
    runs = [make.sharpness(run=m, method=m, cycles=c, scale=s, trace=t)
            for m, c, s, t in [("dense", 1, 0.8, True), ("pai-cyclic", 4, 1.0, True), ("lrr", 5, 0.5, False)]]
    runs[0] = runs[0].assign_coords(sparsity=("checkpoint", [0.0, 0.0]))
    return runs


CASES = {
    "connectivity-one": (plots.plot_connectivity, lambda: [make.connectivity()], {}),
    "connectivity-two": (plots.plot_connectivity, lambda: [make.connectivity(), make.connectivity("lrr", "lrr", 3)], {}),
    "sharpness": (plots.plot_sharpness, _one_sharpness_per_method, {}),
    "signs-one": (plots.plot_signs, lambda: [make.signs()], {}),
    "signs-three": (plots.plot_signs, lambda: [make.signs(), make.signs("pai", "pai", 2, ("init",)),
                                               make.signs("dense", "dense", 1, ("init",))], {}),
    "overlap": (plots.plot_overlap, lambda: [make.overlap()], {}),
    "metrics": (plots.plot_metrics, lambda: [make.metrics()], {}),
    "sparsity": (plots.plot_sparsity, lambda: [make.metrics()], {}),
    "sparsity-flops": (plots.plot_sparsity, lambda: [make.metrics()], {"x": "flops"}),
}


@pytest.mark.parametrize("case", CASES)
def test_every_figure_writes_a_non_empty_image(case, tmp_path):
    function, datasets, options = CASES[case]
    path = plots.save_figure(function(datasets(), **options), tmp_path / f"{case}.png")
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.05  # something is drawn, not a blank canvas


@pytest.mark.parametrize("fmt", ["pdf", "svg"])
def test_vector_formats(fmt, tmp_path):
    path = plots.save_figure(plots.plot_overlap(make.overlap()), tmp_path / f"overlap.{fmt}")
    head = path.read_bytes()[:5]
    assert head == (b"%PDF-" if fmt == "pdf" else b"<?xml")


MISSING = [
    (plots.plot_connectivity, make.connectivity, "error"),  # the barriers are read off the curves
    (plots.plot_sharpness, make.sharpness, "eigenvalue"),
    (plots.plot_signs, make.signs, "flip_fraction_total"),
    (plots.plot_overlap, make.overlap, "jaccard_ratio_total"),
    (plots.plot_metrics, make.metrics, "value"),
    (plots.plot_sparsity, make.metrics, "value"),
]


@pytest.mark.parametrize("function,build,variable", MISSING, ids=[m[2] + "-" + m[0].__name__ for m in MISSING])
def test_missing_variable_is_a_one_line_error_naming_it(function, build, variable):
    with pytest.raises(plots.PlotInputError) as caught:
        function([build().drop_vars(variable)])
    message = str(caught.value)
    assert variable in message and "\n" not in message


def test_flops_axis_needs_training_flops():
    with pytest.raises(plots.PlotInputError, match="training_flops"):
        plots.plot_sparsity(make.metrics(flops=False), x="flops")


def _legend_colours(figure) -> dict[str, str]:
    """legend text -> hex colour of its handle (lines, error bars, patches alike)."""
    legend = next(ax.get_legend() for ax in figure.axes if ax.get_legend())
    colours = {}
    for handle, text in zip(legend.legend_handles, legend.get_texts()):
        if hasattr(handle, "get_colors"):
            colour = handle.get_colors()[0]
        elif hasattr(handle, "get_color"):
            colour = handle.get_color()
        else:
            colour = handle.get_facecolor()
        colours[text.get_text()] = matplotlib.colors.to_hex(colour)
    return colours


def test_method_colour_is_the_same_in_every_figure():
    sharpness = _legend_colours(plots.plot_sharpness(_one_sharpness_per_method()))
    sparsity = _legend_colours(plots.plot_sparsity(make.metrics()))
    assert sharpness["pai-cyclic, 90 % sparse"] == sparsity["pai-cyclic (2 seeds)"] == METHOD_STYLE["pai-cyclic"][0]
    assert sharpness["lrr, 90 % sparse"] == sparsity["lrr (1 seed)"] == METHOD_STYLE["lrr"][0]
    assert sharpness["dense"] == sparsity["dense: 89.7 % (2 seeds)"] == METHOD_STYLE["dense"][0]
    assert sparsity["sculpt (1 seed)"] == METHOD_STYLE["sculpt"][0]
    assert len(set(colour for colour, _ in METHOD_STYLE.values())) == len(METHOD_STYLE)


def test_sparsity_figure_aggregates_seeds_and_labels_the_dense_band():
    ds = make.metrics()
    fig = plots.plot_sparsity(ds)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    final_test = ds.value.sel(split="test", metric="accuracy").isel(epoch=-1)
    dense = [float(final_test.sel(run=r, cycle=0)) for r in ("dense-s0", "dense-s1")]
    assert any(label.startswith(f"dense: {100 * np.mean(dense):.1f} %") and "2 seeds" in label for label in labels)
    assert any("dense ± 1 s.d." in label for label in labels)  # the band is named, not left unexplained
    # pai-cyclic: two seeds at 0.9 -> one point at their mean, error bar = sample s.d.
    pai = [float(final_test.sel(run=r, cycle=3)) for r in ("pai-cyclic-s0", "pai-cyclic-s1")]
    colour = METHOD_STYLE["pai-cyclic"][0]
    line = next(l for l in ax.get_lines() if matplotlib.colors.to_hex(l.get_color()) == colour and len(l.get_xdata()))
    assert line.get_xdata()[0] == pytest.approx(90.0)
    assert line.get_ydata()[0] == pytest.approx(100 * np.mean(pai))
    # lrr: every level is a point (its sparsity after each cycle), in sparsity order
    colour = METHOD_STYLE["lrr"][0]
    line = next(l for l in ax.get_lines() if matplotlib.colors.to_hex(l.get_color()) == colour and len(l.get_xdata()) > 1)
    expected = 100 * np.sort(ds.sparsity.sel(run="lrr-s0").values)
    np.testing.assert_allclose(line.get_xdata(), expected)


def test_metrics_epochs_accumulate_across_cycles():
    ds = make.metrics(runs=[("a", "pai-cyclic", 0.9, 0)], cycles=3, epochs=4)
    fig = plots.plot_metrics(ds)
    loss_ax = fig.axes[0]
    x = next(l for l in loss_ax.get_lines() if len(l.get_xdata()) > 2).get_xdata()
    # cycle c, epoch e sits at 4c + e: epoch 0 of a cycle shares x with the previous cycle's end
    np.testing.assert_array_equal(x, [4 * c + e for c in range(3) for e in range(5)])
    boundaries = sorted({l.get_xdata()[0] for l in loss_ax.get_lines() if len(set(l.get_xdata())) == 1})
    assert boundaries == [4, 8]


def test_connectivity_legend_reports_each_pairs_barrier():
    ds = make.connectivity(cycles=3)
    fig = plots.plot_connectivity(ds)
    texts = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    for pair, text in zip(ds.pair.values, texts):
        train, test = (100 * float(ds.error_barrier.sel(pair=pair, split=s)) for s in ("train", "test"))
        assert text.endswith(f"{train:.1f} % / {test:.1f} %")
    assert texts[0].startswith("c0 → c1")


def test_axis_labels_come_from_the_dataset():
    ds = make.connectivity()
    ds["loss"].attrs.update(long_name="mean cross-entropy", units="nat")
    fig = plots.plot_connectivity(ds)
    assert fig.axes[2].get_ylabel() == "mean cross-entropy (nat)"
    assert fig.axes[0].get_ylabel() == "error (%)"


def test_title_says_what_was_run():
    ds = make.sharpness()
    ds.attrs.update(model="resnet1d", data="mnist1d", target_sparsity=0.9)
    title = plots.plot_sharpness(ds)._suptitle.get_text()
    for word in ("resnet1d", "mnist1d", "pai-cyclic", "90 % sparse"):
        assert word in title


def test_plots_import_neither_torch_nor_the_engine():
    code = ("import sys, landscape.plots; bad = [m for m in sys.modules if m.split('.')[0] == 'torch' "
            "or m.startswith('sparse_training.')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- the CLI

def _plot(*args):
    return CliRunner().invoke(cli, ["plot", *args], catch_exceptions=False)


def test_cli_plots_a_dataset_file_beside_it(tmp_path):
    source = write_dataset(make.connectivity(), tmp_path / "connectivity.nc")
    result = _plot("connectivity", str(source), "--json")
    assert result.exit_code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["figure"] == str(tmp_path / "connectivity.png")
    assert (tmp_path / "connectivity.png").stat().st_size > 10_000


def test_cli_out_and_format(tmp_path):
    source = write_dataset(make.overlap(), tmp_path / "masks.nc")
    assert _plot("overlap", str(source), "--format", "svg").exit_code == 0
    assert (tmp_path / "masks_overlap.svg").exists()
    assert _plot("overlap", str(source), "--out", str(tmp_path / "fig.pdf")).exit_code == 0
    assert (tmp_path / "fig.pdf").read_bytes()[:5] == b"%PDF-"
    clash = _plot("overlap", str(source), "--out", str(tmp_path / "fig.png"), "--format", "pdf")
    assert clash.exit_code == 2 and "disagree" in clash.stderr


def test_cli_input_that_is_not_a_dataset_exits_2(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a dataset")
    for path in (text, tmp_path / "missing.nc", tmp_path):
        result = _plot("sharpness", str(path))
        assert result.exit_code == 2, (path, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr


def test_cli_dataset_missing_variables_is_one_line(tmp_path):
    source = write_dataset(make.sharpness().drop_vars(["eigenvalue", "residual"]), tmp_path / "s.nc")
    result = _plot("sharpness", str(source))
    assert result.exit_code == 2
    assert "eigenvalue" in result.stderr and result.stderr.count("\n") == 1


def test_cli_on_runs(tiny_run, tiny_dense_run, tmp_path, monkeypatch):
    """metrics of one run go to its figures/; several runs to ./KIND.png."""
    result = _plot("metrics", str(tiny_run))
    assert result.exit_code == 0, result.stderr
    assert (tiny_run / "figures" / "metrics.png").exists()
    monkeypatch.chdir(tmp_path)
    result = _plot("sparsity", str(tiny_run), str(tiny_dense_run), "--x", "flops", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["figure"] == str(tmp_path / "sparsity.png")
    missing = _plot("connectivity", str(tiny_dense_run))
    assert missing.exit_code == 2 and "landscape connectivity" in missing.stderr


def test_titles_of_a_combined_dataset_come_from_its_runs(tiny_run, tiny_dense_run, tmp_path):
    """A metrics.nc outside any run names its runs in its provenance; their configs give the
    model and data the title shows."""
    from cli.plot import _load

    combined = tmp_path / "curves.nc"
    result = CliRunner().invoke(cli, ["metrics", str(tiny_run), str(tiny_dense_run), "--out", str(combined)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    ds, home, place = _load("metrics", combined, "curves")
    assert (ds.attrs["model"], ds.attrs["data"], home) == ("resnet1d", "synthetic", None)
    assert place == tmp_path / "curves_metrics"  # its figure: curves_metrics.png beside it
    title = plots.plot_metrics(ds)._suptitle.get_text()
    assert "resnet1d on synthetic" in title
