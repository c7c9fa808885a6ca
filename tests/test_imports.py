"""Lean imports: analysis commands import neither matplotlib, seaborn, the plotting package
nor mnist1d (whose own import pulls in matplotlib); mnist1d is imported only to generate
the data set on a cache miss. Checked in fresh subprocesses, since the test process itself
may have imported any of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

HEAVY = ("matplotlib", "seaborn", "landscape.plots", "mnist1d")


def run_python(code: str, env: dict[str, str] | None = None) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON object as its last stdout line."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=Path(__file__).parent.parent, timeout=120)
    assert done.returncode == 0, f"stdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_analysis_commands_import_no_plotting(tiny_run, tmp_path):
    ckpts = tiny_run / "checkpoints"
    commands = {
        "sharpness": ["sharpness", str(ckpts / "cycle_002.pt"), "--samples", "64", "--top-k", "1",
                      "--out", str(tmp_path / "sharpness.nc")],
        "barrier": ["barrier", str(ckpts / "cycle_001.pt"), str(ckpts / "cycle_002.pt"), "--points", "3",
                    "--samples", "64", "--bn-batches", "1", "--out", str(tmp_path / "barrier.nc")],
        "signs": ["signs", str(tiny_run), "--out", str(tmp_path / "signs.nc")],
        "overlap": ["overlap", str(tiny_run), "--across-cycles", "--out", str(tmp_path / "overlap.nc")],
        "metrics": ["metrics", str(tiny_run), "--out", str(tmp_path / "metrics.nc")],
        "info": ["info", str(tiny_run)],
    }
    found = run_python(f"""
        import json, sys
        import torch
        torch.set_num_threads(1)
        from cli.main import cli
        heavy, found = {HEAVY!r}, {{}}
        for name, args in {commands!r}.items():
            try:
                code = cli(["-q", *args], standalone_mode=False)
            except SystemExit as stop:
                code = stop.code
            assert code in (None, 0), f"landscape {{' '.join(args)}} exited {{code}}"
            found[name] = [m for m in heavy if m in sys.modules]
        print(json.dumps(found))
    """)
    assert found == {name: [] for name in commands}, f"imported after each command (cumulative): {found}"
    assert (tmp_path / "sharpness.nc").is_file() and (tmp_path / "barrier.nc").is_file()


def test_mnist1d_is_imported_only_on_a_cache_miss(tmp_path):
    """A cache hit reads the npz and imports nothing of mnist1d. The cache file is written here
    (small arrays under the real key) so that nothing is generated."""
    loaded = run_python(f"""
        import json, sys
        import numpy as np
        from sparse_training.config import DataConfig
        from sparse_training.data import load_data
        from sparse_training.data.sources import mnist1d_args, mnist1d_cache_path, write_mnist1d_cache

        config = DataConfig("mnist1d", seed=3, data_dir={str(tmp_path)!r})
        rng = np.random.default_rng(0)
        write_mnist1d_cache(mnist1d_cache_path(config, mnist1d_args(3)), {{
            "x_train": rng.normal(size=(20, 40)).astype(np.float32), "y_train": np.arange(20) % 10,
            "x_test": rng.normal(size=(10, 40)).astype(np.float32), "y_test": np.arange(10)}})
        data = load_data(config)
        print(json.dumps({{"train": data.num_samples("train"), "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    assert loaded == {"train": 20, "heavy": []}


def test_pinned_mnist1d_arguments_are_the_packages():
    """sources.py keeps a copy of mnist1d's standard arguments (to name the cache file without
    importing mnist1d); it must equal what the installed package generates with."""
    from mnist1d.data import get_dataset_args

    from sparse_training.data.sources import mnist1d_args

    expected = get_dataset_args(as_dict=True)
    expected.pop("url", None)
    assert mnist1d_args(expected["seed"]) == expected
