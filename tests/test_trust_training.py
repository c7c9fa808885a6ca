"""Trust, training side: nothing read from a file imports a module, downloads, chooses where
to write or decides how much memory to allocate; one trainer per run, decided under its lock;
only regular files are read; meta.json keeps its provenance and says why a run failed; bad
engine inputs are one line and exit 2, never "this is a bug"."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from sparse_training.checkpoint import load_checkpoint
from sparse_training.errors import UserError
from sparse_training.io import read_json, torch_load_safe
from sparse_training.records import read_metrics, truncate_metrics
from sparse_training.rundir import RunDir

TINY = ("--data", "synthetic", "--model", "resnet1d", "--model-kwargs", '{"width": 4}', "--epochs", "1",
        "--batch-size", "64", "--device", "cpu")
FACTORY = """
from sparse_training.models.mnist1d import ResNet1d

def build(num_classes=10, in_channels=1, width=4):
    return ResNet1d(num_classes=num_classes, in_channels=in_channels, width=width)
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished pai run (random mask at sparsity 0.5), 1 cycle of 1 epoch."""
    out = tmp_path_factory.mktemp("trust") / "run"
    run_cli("train", *TINY, "--method", "pai", "--sparsity", "0.5", "--out", str(out))
    return out


@pytest.fixture
def unfinished(finished, tmp_path) -> Path:
    """A copy of the run that --resume continues from its state.pt (the final one: resuming
    only writes DONE again)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "DONE").unlink()
    return run


@pytest.fixture
def no_hang():
    """A read that blocks (a FIFO) fails the test after 20 s instead of hanging the suite."""
    def expire(_signum, _frame):
        raise TimeoutError("the read blocked")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def error_line(result) -> str:
    """The one line on stderr of a refused command, with no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len([line for line in lines if line.startswith("error:")]) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "this is a bug" not in result.stderr
    return next(line for line in lines if line.startswith("error:"))


def edit_json(path: Path, edit) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def edit_checkpoint(source: Path, target: Path, edit) -> Path:
    raw = torch.load(source, weights_only=True)
    edit(raw)
    torch.save(raw, target)
    return target


# ---------------------------------------------------------------- 1. no import from config.json

@pytest.mark.parametrize("name, kwargs", [("evilmod:build", {}), ("os:system", {"command": "touch proof"})])
def test_resume_never_imports_a_model_named_in_config_json(unfinished, tmp_path, monkeypatch, name, kwargs):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evilmod.py").write_text("open('proof', 'w').close()\ndef build(**kwargs):\n    pass\n")
    edit_json(unfinished / "config.json", lambda raw: raw["model"].update(name=name, kwargs=kwargs))
    refused = run_cli("train", "--resume", str(unfinished), expect=2)
    assert f"add --model {name}" in error_line(refused)
    assert not (tmp_path / "proof").exists() and "evilmod" not in sys.modules


def test_a_stored_model_factory_is_built_when_the_user_types_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trusted_factory.py").write_text(FACTORY)
    tiny = [a for a in TINY if a not in ("resnet1d",)]
    tiny[tiny.index("--model") + 1:tiny.index("--model") + 1] = ["trusted_factory:build"]
    run_cli("train", *tiny, "--out", "run")
    (tmp_path / "run" / "DONE").unlink()
    assert "--model trusted_factory:build" in error_line(run_cli("train", "--resume", "run", expect=2))
    assert "is not the model" in error_line(run_cli("train", "--resume", "run", "--model", "resnet1d", expect=2))
    run_cli("train", "--resume", "run", "--model", "trusted_factory:build")
    assert (tmp_path / "run" / "DONE").exists()


@pytest.mark.parametrize("section, key, value, message", [
    ("run", "cycles", 0, "cycles must be at least 1"),
    ("run", "method", "no-such-method", "no-such-method"),
    ("data", "seed", -1, "seeds must be integers"),
    ("model", "kwargs", {"width": 10**7}, "more than the limit"),
])
def test_a_stored_config_is_validated_on_resume(unfinished, section, key, value, message):
    edit_json(unfinished / "config.json", lambda raw: raw[section].update({key: value}))
    assert message in error_line(run_cli("train", "--resume", str(unfinished), expect=2))


def test_resume_takes_no_other_training_option(unfinished):
    assert "accepts only --model" in error_line(run_cli("train", "--resume", str(unfinished), "--epochs", "3", expect=2))


# ---------------------------------------------------------------- 3. the lock comes first

def test_a_second_trainer_is_refused_before_it_decides_anything_and_names_the_holder(unfinished):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from sparse_training.io import exclusive_lock
            with exclusive_lock({str(unfinished / '.train.lock')!r}, record_holder=True):
                print('held', flush=True)
                time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (unfinished / "DONE").write_text("done\n")  # a finished run: "already complete" is a decision too
        before = {p: p.read_bytes() for p in unfinished.rglob("*") if p.is_file()}
        line = error_line(run_cli("train", "--resume", str(unfinished), expect=2))
        assert "being trained by another process" in line and f"process {holder.pid}" in line
        assert before == {p: p.read_bytes() for p in unfinished.rglob("*") if p.is_file()}
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- 4. data locations and downloads

def test_a_checkpoint_never_says_where_data_lives_or_to_download(finished, tmp_path):
    def point_elsewhere(raw):
        raw["data"].update(data_dir=str(tmp_path / "elsewhere"), download=True)

    path = edit_checkpoint(finished / "checkpoints" / "cycle_000.pt", tmp_path / "ck.pt", point_elsewhere)
    data = load_checkpoint(path).data
    assert data.data_dir is None and data.download is False and data.name == "synthetic"


def test_resume_never_writes_data_where_config_json_says(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_LANDSCAPE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    run_cli("train", *TINY[:TINY.index("--model")], "--data", "mnist1d", *TINY[TINY.index("--model"):], "--out", str(run))
    (run / "DONE").unlink()
    (run / "state.pt").unlink()  # resume starts over, and loads the data again
    edit_json(run / "config.json", lambda raw: raw["data"].update(data_dir=str(tmp_path / "elsewhere"), download=True))
    run_cli("train", "--resume", str(run))
    assert not (tmp_path / "elsewhere").exists()
    assert load_checkpoint(run / "checkpoints" / "cycle_000.pt").data.data_dir is None
    run_cli("train", "--resume", str(run), "--data-dir", str(tmp_path / "typed"))  # flags may say so


# ---------------------------------------------------------------- 5. sizes decided by a file

def test_a_checkpoint_whose_model_is_too_large_is_refused_before_allocation(finished, tmp_path):
    path = edit_checkpoint(finished / "checkpoints" / "cycle_000.pt", tmp_path / "huge.pt",
                           lambda raw: raw["model"]["kwargs"].update(width=10**7))
    with pytest.raises(UserError, match="more than the limit"):
        load_checkpoint(path)


def test_max_parameters_limits_and_raises_the_size(tmp_path):
    refused = run_cli("train", *TINY, "--max-parameters", "1000", "--out", str(tmp_path / "small"), expect=2)
    assert "more than the limit of 1,000" in error_line(refused) and not (tmp_path / "small").exists()
    run_cli("train", *TINY, "--max-parameters", "3000", "--out", str(tmp_path / "small"))


@pytest.mark.parametrize("key, value, message", [
    ("cycle", 10**30, "cycle, epoch and step"), ("step", -1, "cycle, epoch and step"),
    ("data", {"name": "synthetic", "seed": -1}, "seeds must be integers"),
])
def test_checkpoint_fields_out_of_range_are_refused(finished, tmp_path, key, value, message):
    path = edit_checkpoint(finished / "checkpoints" / "cycle_000.pt", tmp_path / "bad.pt", lambda raw: raw.update({key: value}))
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


def test_complex_weights_are_refused(finished, tmp_path):
    def to_complex(raw):
        raw["state_dict"] = {k: v.to(torch.complex64) if v.is_floating_point() else v for k, v in raw["state_dict"].items()}

    signs = edit_checkpoint(finished / "checkpoints" / "cycle_000.pt", tmp_path / "complex.pt", to_complex)
    refused = run_cli("train", *TINY, "--method", "transfer", "--mask-from", str(finished / "checkpoints" / "cycle_000.pt"),
                      "--signs-from", str(signs), "--out", str(tmp_path / "run"), expect=2)
    assert "complex values" in error_line(refused)


@pytest.mark.parametrize("tamper, message", [
    (lambda state: state["position"].update(step=-1), "position"),
    (lambda state: state["position"].update(cycle="0"), "position"),
    (lambda state: next(iter(state["optimizer"]["state"].values())).update(momentum_buffer=torch.zeros(3)), "optimizer"),
    (lambda state: state["model"].update({"fc.weight": torch.zeros(2, 2)}), "does not fit"),
])
def test_a_tampered_resume_state_is_one_line_and_marks_the_run_failed(unfinished, tamper, message):
    edit_checkpoint(unfinished / "state.pt", unfinished / "state.pt", tamper)
    line = error_line(run_cli("train", "--resume", str(unfinished), expect=2))
    assert message in line and "\n" not in line
    meta = json.loads((unfinished / "meta.json").read_text())
    assert meta["status"] == "failed" and meta["error"] == line.removeprefix("error: ")


def test_a_26_digit_cycle_in_metrics_csv_is_refused(unfinished):
    with open(unfinished / "metrics.csv", "a") as handle:
        handle.write("1" * 26 + ",1,1,test,loss,0.5\n")
    with pytest.raises(UserError, match=r"2\*\*63"):
        read_metrics(RunDir(unfinished))
    truncate_metrics(RunDir(unfinished), (10**9, 10**9))  # resume drops the row like a torn one
    assert read_metrics(RunDir(unfinished))


@pytest.mark.parametrize("flag", ["--resume", "--out"])
def test_an_empty_run_path_is_refused(flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = TINY if flag == "--out" else ()
    assert "needs a directory" in error_line(run_cli("train", *options, flag, "", expect=2))


def test_a_sparsity_that_keeps_no_weight_is_refused(tmp_path):
    refused = run_cli("train", *TINY, "--method", "pai", "--sparsity", "0.999999999", "--out", str(tmp_path / "r"), expect=2)
    assert "keeps none" in error_line(refused) and not (tmp_path / "r").exists()


# ---------------------------------------------------------------- 7. only regular files

@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.parametrize("name", ["config.json", "meta.json", "metrics.csv", "state.pt"])
def test_only_regular_files_are_read(unfinished, no_hang, name, kind):
    path = unfinished / name
    path.unlink()
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    assert "not a regular file" in error_line(run_cli("train", "--resume", str(unfinished), expect=2))


@pytest.mark.parametrize("read", [lambda p: read_json(p, "meta.json"), torch_load_safe,
                                  lambda p: read_metrics(RunDir(p.parent)), lambda p: truncate_metrics(RunDir(p.parent), (0, 0))])
def test_every_reader_refuses_a_fifo(tmp_path, no_hang, read):
    path = tmp_path / "metrics.csv"
    os.mkfifo(path)
    with pytest.raises(UserError, match="not a regular file"):
        read(path)


# ---------------------------------------------------------------- 9. meta.json

def test_resume_records_lost_provenance_and_never_duplicates_a_warning(tmp_path):
    run = tmp_path / "run"
    run_cli("train", *TINY, "--method", "pai", "--pruner", "magnitude", "--allocation", "global", "--sparsity", "0.99",
            "--out", str(run))
    warnings = json.loads((run / "meta.json").read_text())["warnings"]
    assert any("layer collapse" in w for w in warnings)
    (run / "DONE").unlink()
    (run / "state.pt").unlink()  # killed before its first state: the mask change, and its warning, come again
    run_cli("train", "--resume", str(run))
    assert json.loads((run / "meta.json").read_text())["warnings"] == warnings
    (run / "DONE").unlink()
    (run / "meta.json").write_text("{}")  # its first write failed
    run_cli("train", "--resume", str(run))
    meta = json.loads((run / "meta.json").read_text())
    assert meta["package_version"] and meta["started"] and meta["status"] == "done"


def test_a_toml_file_never_says_to_download(tmp_path):
    (tmp_path / "run.toml").write_text('[data]\nname = "synthetic"\ndownload = true\n')
    refused = run_cli("train", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "r"), expect=2)
    assert "only the command line" in error_line(refused) and not (tmp_path / "r").exists()
