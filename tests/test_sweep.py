"""`landscape sweep`: the spec, run names, sweep.json, the local executor (parallel jobs,
idempotent reruns, a killed run continued), --status, the SLURM parameters and analyses."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli

BASE = """
[base]
method = "pai"
pruner = "random"
data = "synthetic"
model = "mlp"
epochs = 2
batch_size = 16
lr = 0.05
"""
GRID = """
[grid]
sparsity = [0.5, 0.80]
seed = [0, 1]
"""
SPEC = BASE + GRID
NAMES = ["sparsity=0.5,seed=0", "sparsity=0.5,seed=1", "sparsity=0.8,seed=0", "sparsity=0.8,seed=1"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def keys():
    from cli.sweep import train_keys

    return train_keys()


def spec_of(text: str):
    from cli.sweep import analysis_args
    from sparse_training.sweep import parse_spec

    return parse_spec(text, keys(), analysis_args)


# ---------------------------------------------------------------- the spec

def test_flag_names_map_to_config_fields():
    spec = spec_of("""
[base]
model = "mlp"
model_kwargs = '{"width": 8}'
data-seed = 3
batch_size = 32
rewind-epoch = 1
[grid]
seed = [0]
method = ["lrr", "imp"]
""")
    assert [run.name for run in spec.runs] == ["seed=0,method=lrr", "seed=0,method=imp"]
    assert spec.runs[1].config == {"model": {"name": "mlp", "kwargs": {"width": 8}}, "data": {"seed": 3},
                                   "optim": {"batch_size": 32}, "prune": {"rewind_epoch": 1},
                                   "run": {"seed": 0, "method": "imp"}}
    assert spec.base["model-kwargs"] == {"width": 8} and "data-seed" in spec.base


@pytest.mark.parametrize("text, words", [
    (BASE + "spasity = 0.5\n" + GRID, ["spasity", "landscape train --help"]),
    (BASE + "[grid]\nseed = 0\n", ["[grid] seed", "non-empty list"]),
    (BASE + "[grid]\nseed = []\n", ["[grid] seed", "empty list"]),
    (BASE + "seed = 3\n" + GRID, ["seed", "both [base] and [grid]"]),
    (BASE + "out = 'x'\n" + GRID, ["out", "drop it"]),
    (BASE + "resume = 'x'\n" + GRID, ["resume", "drop it"]),
    (BASE + "device = 'cpu'\n" + GRID, ["device", "landscape sweep --device"]),
    (BASE + GRID + "[analyses]\nhessian = true\n", ["hessian", "connectivity, sharpness, signs, overlap"]),
    (BASE + GRID + "[analyses]\nsharpness = {topk = 3}\n", ["topk", "landscape sharpness", "top-k"]),
    (BASE + GRID + "[analyses]\nsharpness = {top_k = 'many'}\n", ["top_k", "many"]),
    (BASE + GRID + "[analyses]\nsharpness = {out = 'x.nc'}\n", ["out", "RUN/analysis"]),
    (BASE + GRID + "[analyses]\nsharpness = {checkpoints = 'final'}\n", ["'final' is not a checkpoint label"]),
    (BASE + "[grid]\nsparsity = [0.5, 1.5]\n", ["sparsity=1.5", "sparsity must be in [0, 1)"]),
    (BASE + "[grid]\nsparsity = [0.5, 0.50]\n", ["same run name"]),
    (BASE + GRID + "[figures]\nx = 1\n", ["figures", "[base], [grid] and [analyses]"]),
])
def test_spec_errors_are_one_line_and_write_nothing(tmp_path, text, words):
    spec = write(tmp_path / "spec.toml", text)
    result = run_cli("sweep", str(spec), "--out", str(tmp_path / "sweep"), "--device", "cpu", expect=2)
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    assert all(word in message for word in words), message
    assert not (tmp_path / "sweep").exists()


def test_run_names_are_deterministic_and_safe():
    from sparse_training.sweep import run_name

    assert run_name({"sparsity": 0.50, "seed": 0}) == "sparsity=0.5,seed=0"
    name = run_name({"lr": 1e-05, "nesterov": True, "method": "pai-cyclic"})
    assert name == "lr=1e-05,nesterov=true,method=pai-cyclic"
    odd = run_name({"data": "npz:/data/x y.npz"})
    assert "/" not in odd and " " not in odd and odd.startswith("data=npz__data_x_y.npz~")
    assert odd == run_name({"data": "npz:/data/x y.npz"}) != run_name({"data": "npz:/data/x_y.npz"})
    assert run_name({"model-kwargs": {"width": 8}}).startswith("model-kwargs=width-8~")


def test_rerun_may_grow_the_grid_but_not_change_base(tmp_path):
    from sparse_training.errors import UserError
    from sparse_training.sweep import check_compatible
    from sparse_training.sweep.layout import record

    stored = record(spec_of(BASE + GRID))
    check_compatible(stored, spec_of(BASE + GRID.replace("[0, 1]", "[0, 1, 2]")), keys(), tmp_path)
    check_compatible(stored, spec_of(BASE + GRID + "[analyses]\nsigns = true\n"), keys(), tmp_path)
    for text, words in [(BASE.replace("epochs = 2", "epochs = 3") + GRID, "another [base] (epochs differ)"),
                        (BASE + GRID.replace("[0, 1]", "[0]"), "seed = [1]"),
                        (BASE + "[grid]\nseed = [0, 1]\nsparsity = [0.5, 0.8]\n", "in that order")]:
        with pytest.raises(UserError, match=".*") as error:
            check_compatible(stored, spec_of(text), keys(), tmp_path)
        assert words in str(error.value)


# ---------------------------------------------------------------- running

def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))
            if p.is_file() and ".submitit" not in p.parts and ".locks" not in p.parts}


def _train_until_stopped(config: Path, run: Path) -> None:
    """Train a run and stop it once its resume state exists, as SIGTERM does (the signal
    handler of `landscape train` sets this same flag): it saves its resume state and stops,
    which is what a pre-empted job leaves behind. In-process, to spare a torch start-up."""
    import threading

    from sparse_training.config import Config, load_toml, merge
    from sparse_training.procedures import StopFlag, UserInterrupted, train_run

    config_ = Config.from_dict(merge(load_toml(config), {"run": {"device": "cpu"}}))
    stop, outcome = StopFlag(), {}

    def train() -> None:
        try:
            outcome["result"] = train_run(config_, run, stop=stop, log=lambda message: None)
        except UserInterrupted as error:
            outcome["stopped"] = str(error)

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 120
    while not (run / "state.pt").exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    stop.signal_name = "SIGTERM"
    thread.join(timeout=120)
    assert outcome.get("stopped", "").startswith("SIGTERM: stopped"), outcome
    assert not (run / "DONE").exists() and (run / "state.pt").exists()


@pytest.fixture(scope="module")
def sweep_dirs(tmp_path_factory):
    """A 2x2 sweep: one run trained beforehand, one stopped midway, then the sweep (--parallel 2)."""
    from sparse_training.sweep import SweepDir, prepare

    root = tmp_path_factory.mktemp("sweep")
    spec_file, out = write(root / "spec.toml", SPEC), root / "sweep"
    sweep = SweepDir(out)
    prepare(spec_of(SPEC), sweep)  # sweep.json and the configs, as the sweep writes them before any job
    done_before, killed = NAMES[0], NAMES[3]
    run_cli("train", "--config", str(sweep.config(done_before)), "--out", str(sweep.run(done_before)), "--device",
            "cpu", "-q")
    _train_until_stopped(sweep.config(killed), sweep.run(killed))
    before = {"status": json.loads(run_cli("sweep", "--out", str(out), "--status", "--json").stdout),
              "killed_metrics": (sweep.run(killed) / "metrics.csv").read_text(),
              "killed_init": (sweep.run(killed) / "checkpoints" / "init.pt").stat().st_mtime_ns,
              "done_before": _mtimes(sweep.run(done_before))}
    first = run_cli("sweep", str(spec_file), "--out", str(out), "--parallel", "2", "--device", "cpu", "--json")
    return {"root": root, "spec": spec_file, "out": out, "sweep": sweep, "before": before,
            "first": json.loads(first.stdout), "done_before": done_before, "killed": killed}


def test_status_before_the_sweep(sweep_dirs):
    states = {r["name"]: r for r in sweep_dirs["before"]["status"]["runs"]}
    assert [states[n]["state"] for n in NAMES] == ["done", "not started", "not started", "interrupted"]
    assert states[NAMES[0]]["test_accuracy"] is not None and states[NAMES[0]]["epoch"] == 2
    assert states[NAMES[3]]["test_accuracy"] is None and states[NAMES[3]]["step"] is not None


def test_sweep_runs_every_point_in_parallel(sweep_dirs):
    first, sweep = sweep_dirs["first"], sweep_dirs["sweep"]
    assert (first["done"], first["skipped"], first["failed"], first["jobs"]) == (3, 1, 0, 3)
    assert {r["name"]: r["training"] for r in first["results"]} == {n: "trained" for n in NAMES[1:]}
    assert all((sweep.run(name) / "DONE").exists() for name in NAMES)
    record = json.loads(sweep.record.read_text())
    assert list(record) == ["spec", "spec_text", "grid", "runs"]
    assert list(record["grid"].items()) == [("sparsity", [0.5, 0.8]), ("seed", [0, 1])]
    assert all(list(run["point"]) == ["sparsity", "seed"] for run in record["runs"])
    assert record["runs"] == [{"name": n, "point": {"sparsity": s, "seed": k}}
                              for n, (s, k) in zip(NAMES, [(0.5, 0), (0.5, 1), (0.8, 0), (0.8, 1)])]
    assert record["spec_text"] == SPEC and record["spec"]["base"]["model"] == "mlp"
    assert "sparsity = 0.8" in sweep.config(NAMES[2]).read_text()
    config = json.loads((sweep.run(NAMES[2]) / "config.json").read_text())
    assert config["prune"]["sparsity"] == 0.8 and config["run"]["seed"] == 0 and config["model"]["name"] == "mlp"


def test_killed_run_is_continued_and_finished_runs_untouched(sweep_dirs):
    sweep, before = sweep_dirs["sweep"], sweep_dirs["before"]
    killed = sweep.run(sweep_dirs["killed"])
    assert (killed / "checkpoints" / "init.pt").stat().st_mtime_ns == before["killed_init"]
    assert (killed / "metrics.csv").read_text().startswith(before["killed_metrics"])
    log = next(r["log"] for r in sweep_dirs["first"]["results"] if r["name"] == sweep_dirs["killed"])
    assert f"resuming {killed}" in Path(log).read_text()
    assert _mtimes(sweep.run(sweep_dirs["done_before"])) == before["done_before"]


def test_rerun_skips_everything(sweep_dirs):
    sweep = sweep_dirs["sweep"]
    files, jobs = _mtimes(sweep.path), sorted(sweep.submitit.iterdir())
    result = run_cli("sweep", str(sweep_dirs["spec"]), "--out", str(sweep.path), "--parallel", "2", "--device", "cpu")
    assert result.stdout.strip().endswith(f"{sweep.path}: 4 run(s): 0 done, 4 skipped (finished before), 0 failed")
    assert sorted(sweep.submitit.iterdir()) == jobs  # no job started
    assert _mtimes(sweep.path) == {**files, "sweep.json": _mtimes(sweep.path)["sweep.json"]}
    status = run_cli("sweep", "--out", str(sweep.path), "--status").stdout
    assert status.count(" done ") == 4 and "4 done" in status.splitlines()[-1]


def test_analysis_once_then_skipped_and_a_failed_run_stops_nothing(sweep_dirs, tmp_path):
    """A finished run (copied from the sweep above) in a sweep that lists an analysis: its job
    skips training and writes RUN/analysis/signs.nc, while the other run fails (exit 1, its
    log named); a rerun starts no job for the finished run and retries the failed one."""
    import shutil

    from sparse_training.sweep import SweepDir, prepare

    text = (BASE.replace('data = "synthetic"\n', "") + "[grid]\nsparsity = [0.5]\nseed = [0]\n"
            "data = ['synthetic', 'npz:/nonexistent/x.npz']\n[analyses]\nsigns = {reference = 'init'}\n")
    spec_file, sweep = write(tmp_path / "spec.toml", text), SweepDir(tmp_path / "sweep")
    good, bad = "sparsity=0.5,seed=0,data=synthetic", "sparsity=0.5,seed=0,data=npz__nonexistent_x.npz~"
    prepare(spec_of(text), sweep)
    shutil.copytree(sweep_dirs["sweep"].run(NAMES[0]), sweep.run(good))
    checkpoints = _mtimes(sweep.run(good) / "checkpoints")
    args = ("sweep", str(spec_file), "--out", str(sweep.path), "--device", "cpu", "--parallel", "2")
    result = run_cli(*args, expect=1)
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"{sweep.path}: 2 run(s): 1 done, 0 skipped (finished before), 1 failed"
    assert lines[2].startswith(f"  {bad}") and "npz file /nonexistent/x.npz does not exist" in lines[2]
    log = lines[2].rsplit("(log: ", 1)[1].rstrip(")")
    assert Path(log).parent == sweep.submitit and "does not exist" in Path(log).read_text()
    assert result.stderr.strip().splitlines()[-1].startswith("error: 1 run(s) failed: " + bad)
    output = sweep.analysis(good, "signs")
    assert output == sweep.path / "runs" / good / "analysis" / "signs.nc" and output.exists()
    stamp = output.stat().st_mtime_ns
    again = json.loads(run_cli(*args, "--json", expect=1).stdout)
    assert (again["done"], again["skipped"], again["failed"], again["jobs"]) == (0, 1, 1, 1)
    assert again["failed_runs"][0]["name"].startswith(bad)
    assert output.stat().st_mtime_ns == stamp and _mtimes(sweep.run(good) / "checkpoints") == checkpoints


def test_status_states(tmp_path):
    from filelock import FileLock

    from sparse_training.sweep import SweepDir, prepare, run_state

    sweep = SweepDir(tmp_path / "sweep")
    prepare(spec_of(BASE + GRID), sweep)
    run = sweep.run(NAMES[1])
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "meta.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    assert run_state(sweep, NAMES[1])["state"] == "failed" and run_state(sweep, NAMES[1])["error"] == "boom"
    sweep.lock(NAMES[2]).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(sweep.lock(NAMES[2])):
        assert run_state(sweep, NAMES[2])["state"] == "running"
    assert run_state(sweep, NAMES[2])["state"] == "not started"
    result = json.loads(run_cli("sweep", "--out", str(sweep.path), "--status", "--json").stdout)
    assert result["counts"] == {"not started": 3, "running": 0, "interrupted": 0, "failed": 1, "done": 0}


def test_failed_run_does_not_stop_the_others(tmp_path):
    """A job whose training fails reports it (exit 1, the log named); the job checks DONE and
    analyses itself, so a finished run with its analyses runs no subprocess."""
    from sparse_training.sweep.jobs import RunJob

    run = tmp_path / "run"
    job = RunJob("x", str(run), [sys.executable, "-c", "import sys; sys.exit('error: no data here')"], [], {},
                 str(tmp_path / "x.lock"))
    assert job() == {"name": "x", "run": str(run), "status": "failed",
                     "error": "training exited with 1: error: no data here"}
    run.mkdir()
    (run / "DONE").write_text("done\n")
    (run / "signs.nc").write_text("")
    (tmp_path / "signs.done").write_text("")
    never = [sys.executable, "-c", "raise SystemExit(9)"]
    job = RunJob("x", str(run), never, [("signs", never, str(run / "signs.nc"), str(tmp_path / "signs.done"))], {},
                 str(tmp_path / "x.lock"))
    assert job()["analyses_skipped"] == ["signs"]


def test_an_analysis_file_a_stopped_job_left_is_completed_not_skipped(tmp_path):
    """Analyses write as they go: a file without the job's marker is partial, and the next job
    runs the analysis again (which reuses what the file holds), then marks it finished."""
    from sparse_training.sweep.jobs import RunJob

    run = tmp_path / "run"
    run.mkdir()
    (run / "DONE").write_text("done\n")
    (run / "connectivity.nc").write_text("partial")
    ran = tmp_path / "ran"
    finish = [sys.executable, "-c", f"open({str(ran)!r}, 'a').write('x')"]
    marker = tmp_path / ".analysed" / "x" / "connectivity"
    job = RunJob("x", str(run), [], [("connectivity", finish, str(run / "connectivity.nc"), str(marker))], {},
                 str(tmp_path / "x.lock"))
    assert job()["analyses_computed"] == ["connectivity"] and ran.read_text() == "x" and marker.exists()
    assert job()["analyses_skipped"] == ["connectivity"] and ran.read_text() == "x"


# ---------------------------------------------------------------- SLURM, pre-emption

def test_slurm_parameters_rendered_without_submitting(tmp_path, monkeypatch):
    from sparse_training.sweep import Resources, sbatch_preview, sbatch_text, slurm_executor

    res = Resources(executor="slurm", device="cuda", gpus_per_run=2, cpus_per_run=8, partition="gpu", time=30,
                    array_parallelism=4)
    preview = sbatch_preview(tmp_path / ".submitit", res)  # no srun here: submitit's renderer
    fake = tmp_path / "bin"
    fake.mkdir()
    write(fake / "srun", "#!/bin/sh\nexit 1\n").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    executor = slurm_executor(tmp_path / ".submitit", res)
    text = sbatch_text(executor)
    assert text == preview
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue",
                 "#SBATCH --signal=USR2@"):
        assert line in text, text
    assert executor.parameters["array_parallelism"] == 4 and executor.max_num_timeout == 3
    assert not (tmp_path / ".submitit").exists()
    spec = write(tmp_path / "spec.toml", BASE + GRID)
    result = json.loads(run_cli("sweep", str(spec), "--out", str(tmp_path / "s"), "--executor", "slurm",
                                "--partition", "gpu", "--gpus-per-run", "2", "--time", "30", "--dry-run",
                                "--json").stdout)
    assert "#SBATCH --partition=gpu" in result["sbatch"] and not (tmp_path / "s").exists()
    train = result["to_run"][0]["train"]  # torchrun runs the installed cli (-P: not one in the working directory)
    assert train[1:8] == ["-P", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python"]
    assert train[9:13] == ["-P", "-m", "cli", "train"]


def test_checkpoint_stops_training_and_requeues_the_same_job(tmp_path):
    """As submitit does on pre-emption or time-out: its signal handler calls the job's
    `checkpoint` while the job waits for training, then exits to be requeued. Training gets
    SIGTERM (it saves its resume state) and the resubmitted job is the same job."""
    import threading

    import cloudpickle
    from submitit.helpers import DelayedSubmission

    from sparse_training.sweep.jobs import RunJob

    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    child = ("import pathlib, signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(stopped)!r}).touch(), sys.exit(1)))\n"
             f"pathlib.Path({str(ready)!r}).touch()\ntime.sleep(60)")
    job = RunJob("x", str(tmp_path / "run"), [sys.executable, "-c", child], [], {"OMP_NUM_THREADS": "1"},
                 str(tmp_path / "x.lock"))
    requeued = []

    def handler(_signum, _frame):
        requeued.append(job.checkpoint())
        raise SystemExit(144)  # submitit's local requeue

    def preempt():
        while not ready.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        threading.Thread(target=preempt, daemon=True).start()
        start = time.monotonic()
        with pytest.raises(SystemExit):
            job()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert stopped.exists() and time.monotonic() - start < 30
    assert isinstance(requeued[0], DelayedSubmission)
    again = pickle.loads(cloudpickle.dumps(requeued[0])).function
    assert isinstance(again, RunJob) and again.train == job.train and again.env == {"OMP_NUM_THREADS": "1"}
    assert again._child is None
