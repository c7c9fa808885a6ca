"""Guarantees 3 and 4 of issue 8: nothing in a checkpoint is ever executed, and bad bytes or
bad option values end in one line and exit code 2 (3 for an incomplete run), never a
traceback, never a hang.

The hypothesis tests are derandomised (the same examples on every run) and small: they
run inside the suite's time budget."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import pickle
import shutil
import string
from pathlib import Path

import click
import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cli.main import cli
from landscape import store
from reliability_harness import landscape
from sparse_training.checkpoint import load_checkpoint
from sparse_training.records import read_config, read_metrics, truncate_metrics
from sparse_training.rundir import RunDir
from sparse_training.config import Config, load_toml, resolve
from sparse_training.data import load_data
from sparse_training.errors import IncompleteRunError, UserError

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=25,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def invoke(args: list[str]):
    """`landscape ARGS` in-process: the exit code is 0-3, stderr at most one error line,
    and nothing escaped as a traceback or as an unexpected exception."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{args}: {type(result.exception).__name__}: {result.exception}")
    assert result.exit_code in (0, 1, 2, 3), (args, result.output)
    assert "Traceback" not in result.output and "this is a bug" not in result.output, (args, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == (result.exit_code != 0), (args, result.stderr)
    return result


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory) -> Path:
    """A private copy of the session's finished pai-cyclic run (analyses write into it)."""
    copy = tmp_path_factory.mktemp("inputs") / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("analysis", "figures"))
    return copy


# ---------------------------------------------------------------- guarantee 3: no code from checkpoints

class RunsCode:
    """Unpickling this the unsafe way runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write_evil(path: Path, marker: Path, kind: str, good: dict) -> Path:
    payload = {**good, "metrics": {"test_accuracy": RunsCode(marker)}}
    if kind == "zip":
        torch.save(payload, path)
    elif kind == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(RunsCode(marker)))
    return path


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle"])
def test_a_checkpoint_that_runs_code_is_refused_by_every_command(run, tmp_path, kind):
    marker = tmp_path / "code-ran"
    good = run / "checkpoints" / "cycle_002.pt"
    evil = _write_evil(tmp_path / "evil.pt", marker, kind, torch.load(good, weights_only=True))
    with contextlib.suppress(Exception):  # the file is live: the unsafe way runs the code
        torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()
    evil_run = tmp_path / "evil_run"
    shutil.copytree(run, evil_run)
    shutil.copy(evil, evil_run / "checkpoints" / "cycle_001.pt")
    resume_run = tmp_path / "resume_run"
    shutil.copytree(run, resume_run)
    (resume_run / "DONE").unlink()
    shutil.copy(evil, resume_run / "state.pt")
    commands = [
        ["info", evil], ["info", evil_run],
        ["barrier", good, evil], ["barrier", evil, good, "--model", "resnet1d", "--data", "synthetic"],
        ["connectivity", evil_run],
        ["signs", good, evil, "--out", tmp_path / "s.nc"], ["signs", evil_run],
        ["overlap", good, evil, "--out", tmp_path / "o.nc"], ["overlap", evil_run, "--across-cycles"],
        ["sharpness", evil], ["sharpness", evil_run],
        ["train", "--method", "transfer", "--mask-from", evil, "--data", "synthetic", "--model", "resnet1d",
         "--model-kwargs", '{"width": 8}', "--device", "cpu", "--out", tmp_path / "t1"],
        ["train", "--method", "transfer", "--mask-from", good, "--weights-from", evil, "--data", "synthetic",
         "--model", "resnet1d", "--model-kwargs", '{"width": 8}', "--device", "cpu", "--out", tmp_path / "t2"],
        ["train", "--method", "transfer", "--mask-from", good, "--signs-from", evil, "--data", "synthetic",
         "--model", "resnet1d", "--model-kwargs", '{"width": 8}', "--device", "cpu", "--out", tmp_path / "t3"],
        ["train", "--resume", resume_run],
    ]
    for args in commands:
        result = invoke(args)
        if args[:2] == ["info", evil_run]:  # a run with one bad file: shown, the rest still listed
            assert result.exit_code == 0 and "refused for safety" in result.stdout, result.output
        else:
            assert result.exit_code == 2, (args, result.output)
            assert "refused for safety" in result.stderr, (args, result.stderr)
        assert not marker.exists(), f"code ran during {args}"
    assert not any((tmp_path / name).exists() for name in ("t1", "t2", "t3"))


def test_a_model_factory_named_in_a_checkpoint_is_imported_only_when_the_user_types_it(run, tmp_path):
    """A checkpoint may name `module.path:factory`; only `--model module.path:factory` typed
    by the user imports it. Runs in child processes so that no import is cached."""
    (tmp_path / "userfactory.py").write_text(
        "import pathlib\npathlib.Path('imported').touch()\nfrom torch import nn\n\n"
        "def build(num_classes=10):\n    return nn.Sequential(nn.Flatten(), nn.Linear(40, num_classes))\n")
    weights = {"1.weight": torch.randn(10, 40), "1.bias": torch.zeros(10)}
    payload = {**torch.load(run / "checkpoints" / "cycle_002.pt", weights_only=True),
               "model": {"name": "userfactory:build", "kwargs": {}}, "state_dict": weights,
               "masks": {"1.weight": torch.ones(10, 40, dtype=torch.bool)}}
    torch.save(payload, tmp_path / "a.pt")
    torch.save(payload, tmp_path / "b.pt")
    for args, code in [(["info", "a.pt"], 0), (["signs", "a.pt", "b.pt", "--out", "s.nc"], 0),
                       (["barrier", "a.pt", "b.pt"], 2), (["sharpness", "a.pt"], 2)]:
        outcome = landscape(args, cwd=tmp_path)
        assert outcome.exitcode == code, (args, outcome.stderr)
        assert not (tmp_path / "imported").exists(), f"{args} imported the factory named in the file"
    typed = landscape(["barrier", "a.pt", "b.pt", "--model", "userfactory:build", "--points", "2"], cwd=tmp_path)
    assert typed.exitcode == 0, typed.stderr
    assert (tmp_path / "imported").exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _enclosing_functions(tree: ast.AST) -> dict[ast.AST, str]:
    names = {}
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                names.setdefault(node, function.name)
    return names


# Where a module is imported by name, and why that name is not untrusted.
IMPORTS_ALLOWED = {
    ("sparse_training/models/__init__.py", "_import_factory"): "the --model module.path:factory the user typed",
    ("cli/main.py", "get_command"): "the subcommand modules of the COMMANDS table",
    ("sparse_training/data/readers.py", "_numpy_module"): "numpy's own multiarray/numeric modules",
}


FORBIDDEN_CALLS = ("eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "marshal.loads",
                   "torch.jit.load", "yaml.load", "os.system", "os.popen")


def test_no_module_loads_untrusted_code():
    """Static audit of the library: torch.load only with weights_only=True, numpy without
    pickle, no eval/exec/compile/__import__, pickle only through the numpy-only unpickler,
    no shell, and importlib only where IMPORTS_ALLOWED says why."""
    found = []
    for path in sorted(p for folder in ("sparse_training", "landscape", "cli") for p in (ROOT / folder).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text())
        functions = _enclosing_functions(tree)
        for node, name in _calls(tree):
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{relative}:{node.lineno} {name}"
            unsafe = (
                name == "torch.load" and keywords.get("weights_only") != "True"
                or name in ("np.load", "numpy.load") and keywords.get("allow_pickle") != "False"
                or name in FORBIDDEN_CALLS
                or keywords.get("shell") == "True"
                or name.endswith("import_module") and (relative, functions.get(node)) not in IMPORTS_ALLOWED
            )
            if unsafe:
                found.append(where)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any("Unpickler" in ast.unparse(b) for b in node.bases):
                methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                if "find_class" not in methods:
                    found.append(f"{relative}:{node.lineno} unpickler without find_class")
    assert found == [], "calls that could run code from a file:\n" + "\n".join(found)


def test_the_audit_catches_what_it_looks_for(tmp_path):
    """The audit above is not vacuous: the calls it forbids are seen by its walker."""
    tree = ast.parse("torch.load(p)\nnp.load(p)\neval(s)\nimportlib.import_module(m)\n")
    assert [name for _, name in _calls(tree)] == ["torch.load", "np.load", "eval", "importlib.import_module"]


# ---------------------------------------------------------------- guarantee 4: bad bytes

def _mutations(good: bytes):
    """Truncations, byte flips and random bytes of a valid file."""
    flips = st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), min_size=1, max_size=12)
    return st.one_of(
        st.integers(0, len(good) - 1).map(lambda n: good[:n]),
        flips.map(lambda changes: _flipped(good, changes)),
        st.binary(max_size=600),
    )


def _flipped(good: bytes, changes) -> bytes:
    data = bytearray(good)
    for position, value in changes:
        data[position] = value
    return bytes(data)


def _only_user_errors(load, *args):
    """`load(*args)` returns, or raises a one-line UserError; nothing else."""
    try:
        return load(*args)
    except UserError as error:
        assert "\n" not in str(error)
        return None


@pytest.fixture(scope="module")
def good_files(run, tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("good")
    ds = xr.Dataset({"v": store.describe(xr.DataArray(np.arange(6.0).reshape(2, 3), dims=("pair", "alpha")),
                                         "v", "1", "a variable")}, coords={"pair": ["a..b", "b..c"]})
    store.write_dataset(ds, folder / "good.nc")
    buffer = io.BytesIO()
    np.savez(buffer, x_train=np.zeros((8, 40), np.float32), y_train=np.arange(8) % 3,
             x_test=np.ones((4, 40), np.float32), y_test=np.arange(4) % 3)
    return {"checkpoint": (run / "checkpoints" / "cycle_001.pt").read_bytes(), "nc": (folder / "good.nc").read_bytes(),
            "npz": buffer.getvalue()}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scratch")


def test_damaged_checkpoint_files(good_files, scratch):
    @FUZZ
    @given(data=_mutations(good_files["checkpoint"]))
    def check(data):
        path = scratch / "damaged.pt"
        path.write_bytes(data)
        _only_user_errors(load_checkpoint, path)

    check()


def _plain_values():
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(), st.text(max_size=5),
                       st.sampled_from([torch.zeros(2), torch.tensor(float("nan")), torch.ones(3, 40, dtype=torch.bool),
                                        torch.zeros(2, dtype=torch.complex64), torch.zeros(0)]))
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                        max_leaves=8)


def test_checkpoints_with_wrong_types_inside(run, scratch):
    """A well-formed torch file whose fields hold the wrong things: every command that reads it
    either works or says the checkpoint is damaged."""
    good = torch.load(run / "checkpoints" / "cycle_001.pt", weights_only=True)
    keys = sorted(good) + ["state_dict.weight", "masks.weight"]

    @FUZZ
    @given(key=st.sampled_from(keys), value=_plain_values(), whole=st.booleans())
    @example(key="sparsity", value=":", whole=False)  # each crashed load_checkpoint before it checked types
    @example(key="schema_version", value=torch.zeros(2), whole=False)
    @example(key="model", value={"name": 5, "kwargs": {}}, whole=False)
    @example(key="masks.weight", value=torch.zeros(3, dtype=torch.bool), whole=False)
    @example(key="cycle", value="x", whole=False)
    def check(key, value, whole):
        payload = {k: dict(v) if isinstance(v, dict) else v for k, v in good.items()}
        if whole:
            payload = value
        elif "." in key:
            outer, _ = key.split(".")
            first = sorted(payload[outer])[-1]
            payload[outer][first] = value
        else:
            payload[key] = value
        path = scratch / "typed.pt"
        torch.save(payload, path)
        if _only_user_errors(load_checkpoint, path) is not None:
            invoke(["info", path, "--json"])
            invoke(["overlap", run / "checkpoints" / "cycle_002.pt", path, "--out", scratch / "o.nc", "--overwrite"])

    check()


def test_damaged_netcdf_datasets_never_hang(good_files, scratch, run):
    """HDF5 itself can loop forever on a flipped byte: the checksum footer stops it first."""
    @FUZZ
    @given(data=_mutations(good_files["nc"]))
    def check(data):
        path = scratch / "damaged.nc"
        path.write_bytes(data)
        _only_user_errors(store.read_dataset, path)

    check()
    # Found by this test: one flipped byte of this very file makes HDF5 2.0 loop forever on open.
    ds = xr.Dataset({"v": store.describe(xr.DataArray(np.arange(12.0).reshape(3, 4), dims=("a", "b")), "v", "1", "d")},
                    coords={"a": ["x", "y", "z"]})
    looping = store.write_dataset(ds, scratch / "looping.nc")
    looping.write_bytes(_flipped(looping.read_bytes(), [(2288, 161)]))
    refused = landscape(["plot", "connectivity", str(looping)], cwd=scratch)  # in a child: a hang fails, not blocks
    assert refused.exitcode == 2 and "is corrupt" in refused.stderr, refused.stderr
    damaged = run / "analysis" / "connectivity.nc"
    damaged.parent.mkdir(exist_ok=True)
    damaged.write_bytes(_flipped(good_files["nc"], [(4000, 0), (4001, 7)]))
    result = invoke(["connectivity", run, "--points", "2"])
    assert result.exit_code == 2 and "is corrupt" in result.stderr and "--overwrite" in result.stderr
    damaged.unlink()


def test_damaged_npz_data(good_files, scratch):
    @FUZZ
    @given(data=_mutations(good_files["npz"]))
    def check(data):
        path = scratch / "damaged.npz"
        path.write_bytes(data)
        from sparse_training.config import DataConfig

        _only_user_errors(load_data, DataConfig(name=f"npz:{path}"))

    check()


_SECTION_KEYS = {name: sorted(f.name for f in __import__("dataclasses").fields(type(getattr(Config(), name))))
                 for name in ("data", "model", "optim", "prune", "run")}
_TOML_VALUES = st.one_of(st.integers(-2, 5).map(str), st.sampled_from(["nan", "inf", "-inf", "1e400", "0.5", "true",
                                                                       "[1, 2]", "[0.5, 'a']", "{}", '"x"', '""',
                                                                       '"snip"', '"imp"', '"synthetic"', "2.5"]))


@st.composite
def _toml_documents(draw):
    lines = []
    for section in draw(st.lists(st.sampled_from([*_SECTION_KEYS, "bogus"]), max_size=3, unique=True)):
        lines.append(f"[{section}]")
        keys = _SECTION_KEYS.get(section, ["x"]) + ["unknown_key"]
        for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
            lines.append(f"{key} = {draw(_TOML_VALUES)}")
    text = "\n".join(lines) + "\n"
    return text if draw(st.booleans()) else text[: draw(st.integers(0, len(text)))]


def test_config_toml_files(scratch):
    @FUZZ
    @given(text=_toml_documents())
    @example(text='[optim]\nlr = "x"\n')  # each was a TypeError deep in resolve() before values were type-checked
    @example(text="[data]\nname = 5\n")
    @example(text="[run]\ncycles = [1, 2]\n")
    @example(text='[run]\nmethod = "imp"\n[prune]\nsparsity = 0.5\nprune_fraction = 1e-300\n')  # 1e300 cycles
    def check(text):
        path = scratch / "run.toml"
        path.write_text(text)
        _only_user_errors(lambda: resolve(Config.from_dict(load_toml(path))))

    check()
    (scratch / "binary.toml").write_bytes(b"\xff\xfe\x00[run")
    with pytest.raises(UserError):
        load_toml(scratch / "binary.toml")


def test_config_json_of_a_run(run, scratch):
    good = json.loads((run / "config.json").read_text())
    json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4)),
                               lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                               max_leaves=6)

    @FUZZ
    @given(section=st.sampled_from(sorted(good)), key=st.text(max_size=12), value=json_values,
           cut=st.one_of(st.none(), st.integers(0, 400)))
    def check(section, key, value, cut):
        raw = json.loads(json.dumps(good))
        if isinstance(raw[section], dict) and key:
            raw[section][sorted(raw[section])[len(key) % len(raw[section])] if raw[section] else key] = value
        else:
            raw[section] = value
        text = json.dumps(raw)
        folder = scratch / "config_run"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(text if cut is None else text[:cut])
        _only_user_errors(read_config, RunDir(folder))

    check()


def test_metrics_csv(run, scratch):
    good = (run / "metrics.csv").read_text()
    lines = good.splitlines(keepends=True)

    @FUZZ
    @given(cut=st.integers(0, len(good)), junk=st.text(alphabet=string.printable, max_size=30),
           line=st.integers(0, len(lines) - 1))
    def check(cut, junk, line):
        folder = scratch / "metrics_run"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(run, folder, ignore=shutil.ignore_patterns("checkpoints", "analysis", "state.pt"))
        text = "".join(lines[:line] + [junk] + lines[line + 1:])
        (folder / "metrics.csv").write_text(text[:cut] if cut < len(text) else text)
        _only_user_errors(read_metrics, RunDir(folder))
        _only_user_errors(truncate_metrics, RunDir(folder), (1, 1))
        invoke(["metrics", folder, "--json"])

    check()


def test_an_incomplete_run_is_exit_3_for_every_analysis(run, tmp_path):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(run, incomplete)
    (incomplete / "DONE").unlink()
    for args in (["connectivity", incomplete], ["signs", incomplete], ["overlap", incomplete, "--across-cycles"],
                 ["metrics", incomplete], ["sharpness", incomplete]):
        result = invoke(args)
        assert result.exit_code == 3 and "--allow-incomplete" in result.stderr, (args, result.output)
    with pytest.raises(IncompleteRunError):
        RunDir(incomplete).require_done()


# ---------------------------------------------------------------- guarantee 4: random option values

SIZE_OPTIONS = {"epochs", "cycles", "synflow_rounds", "score_batches", "points", "bn_batches", "top_k", "max_hvp",
                "samples", "update_every"}  # huge valid values are long jobs, not bad input: kept small


def _value(param: click.Option):
    text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=":\x00"), max_size=12)
    if isinstance(param.type, click.Choice):
        return st.one_of(st.sampled_from(list(param.type.choices)), text)
    if param.type is click.INT or isinstance(param.type, click.types.IntParamType):
        small = st.integers(-3, 12)
        big = st.sampled_from([2**63, -(2**63) - 1, 10**30])
        return (small if param.name in SIZE_OPTIONS else st.one_of(small, big)).map(str) | text
    if param.type is click.FLOAT or isinstance(param.type, click.types.FloatParamType):
        return st.one_of(st.floats(), st.sampled_from(["nan", "-inf", "1e400"])).map(str) | text
    return st.one_of(text, st.sampled_from(["", "-", ".", "..", "/", "{}", "[]", '{"width": -1}', "cycle_000",
                                            "train,test", "nosuchmodule:factory"]))


def _options(command: click.Command, skip=("as_json", "out", "resume_dir", "config_file", "data_dir", "download")):
    params = [p for p in command.params if isinstance(p, click.Option) and p.name not in skip]

    @st.composite
    def draw_options(draw):
        args = []
        for param in draw(st.lists(st.sampled_from(params), max_size=3, unique_by=lambda p: p.name)):
            args.append(param.opts[0])
            if not param.is_flag:
                args.append(draw(_value(param)))
        return args

    return draw_options()


def _command(name: str) -> click.Command:
    group = cli
    for part in name.split():
        group = group.get_command(click.Context(group), part)
    return group


ANALYSIS_ARGUMENTS = {
    "info": lambda r: [[r], [r / "checkpoints" / "cycle_001.pt"], [r / "metrics.csv"]],
    "barrier": lambda r: [[r / "checkpoints" / "cycle_000.pt", r / "checkpoints" / "cycle_001.pt"], [r, r]],
    "connectivity": lambda r: [[r], [r / "config.json"]],
    "signs": lambda r: [[r], [f"{r}@init", f"{r}@cycle_001"]],
    "overlap": lambda r: [[r, f"{r}@cycle_000"], [r, "--across-cycles"]],
    "metrics": lambda r: [[r]],
    "sharpness": lambda r: [[r, "--checkpoints", "cycle_001"], [r / "checkpoints" / "init.pt"]],
    **{f"plot {kind}": (lambda r: [[r], [r / "analysis" / "connectivity.nc"]])
       for kind in ("connectivity", "sharpness", "signs", "overlap", "metrics", "sparsity")},
}


@pytest.mark.parametrize("name", sorted(ANALYSIS_ARGUMENTS))
def test_random_option_values_to_every_analysis_command(run, scratch, name):
    command = _command(name)
    arguments = ANALYSIS_ARGUMENTS[name](run)

    @settings(FUZZ, max_examples=12)
    @given(which=st.integers(0, len(arguments) - 1), options=_options(command), out=st.booleans())
    def check(which, options, out):
        extra = ["--out", scratch / f"{name.replace(' ', '_')}.out"] if out and any(
            p.name == "out" for p in command.params) else []
        with contextlib.chdir(scratch):
            invoke([*name.split(), *arguments[which], *options, *extra])

    check()


def test_random_option_values_to_train(scratch):
    command = _command("train")
    base = ["--data", "synthetic", "--model", "mlp", "--model-kwargs", '{"hidden_size": 8}', "--epochs", "1",
            "--batch-size", "128", "--device", "cpu"]

    @settings(FUZZ, max_examples=30)
    @given(options=_options(command))
    def check(options):
        out = scratch / "train_out"
        shutil.rmtree(out, ignore_errors=True)
        with contextlib.chdir(scratch):
            invoke(["train", *base, *options, "--out", out])

    check()
