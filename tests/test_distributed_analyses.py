"""Barrier, connectivity and sharpness split across processes give the single-process numbers.

Two levels:
- in one process, two "ranks" as threads joined by `ThreadGroup` (an in-memory stand-in for
  the job's process group): the sharded BatchNorm statistics, the sharded evaluation and the
  sharded Hessian operator against the unsharded ones, and the whole library call with only
  rank 0 reading and writing the file;
- `torchrun --nproc_per_node 2` (gloo on CPU) running the commands as a user does, against
  `landscape ...` in one process: every number equal to float rounding, one output file,
  stdout printed once."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, run_torchrun, train_tiny
from landscape import store
from landscape.hessian import HessianOperator, hutchinson_trace
from landscape.interpolate import PointEvaluator, recompute_bn_statistics, running_stat_layers
from landscape.lanczos import lanczos_top
from landscape.settings import PathSettings
from sparse_training import distributed
from sparse_training.checkpoint import load_checkpoint
from sparse_training.data import load_data
from sparse_training.distributed import Group

RTOL, ATOL = 1e-5, 1e-6
PATH_ARGS = ("--points", "3", "--bn-batches", "3", "--batch-size", "50", "--device", "cpu", "--json")
SHARPNESS_ARGS = ("--samples", "96", "--batch-size", "40", "--max-hvp", "30", "--top-k", "2", "--trace",
                  "--trace-tol", "0.2", "--device", "cpu", "--json")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished pai-cyclic resnet1d run (BatchNorm), 2 cycles of 1 epoch."""
    return train_tiny(tmp_path_factory.mktemp("dist") / "run", "--method", "pai-cyclic", "--pruner", "random",
                      "--sparsity", "0.5", "--cycles", "2", "--epochs", "1")


# ---------------------------------------------------------------- two ranks as threads


class ThreadGroup(Group):
    """Rank `rank` of `world` threads: the collectives the analyses use, in memory. Sums are
    taken in rank order once and handed to every rank, so all ranks get the same bits, as
    with gloo."""

    def __init__(self, rank: int, world: int, shared: dict):
        super().__init__(rank, world)
        self.shared = shared

    def _exchange(self, value):
        slots, gate = self.shared["slots"], self.shared["gate"]
        slots[self.rank] = value
        gate.wait()
        everything = list(slots)
        gate.wait()  # nobody overwrites a slot before every rank has read them
        return everything

    def all_reduce_sum(self, tensor):
        parts = self._exchange(tensor.detach().clone())
        total = parts[0].double()
        for part in parts[1:]:
            total = total + part.double()
        tensor.copy_(total.to(tensor.dtype))
        return tensor

    def any(self, flag):
        return any(self._exchange(bool(flag)))

    def share(self, value):
        return self._exchange(value)[0]

    def broadcast_(self, tensors):
        for tensor, theirs in zip(tensors, self._exchange([t.clone() for t in tensors])[0]):
            tensor.copy_(theirs)

    def barrier(self):
        self._exchange(None)

    def check_identical(self, what, tensors):
        mine = [t.detach().clone() for t in tensors]
        for theirs in self._exchange(mine):
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs)), what


def on_ranks(world: int, work):
    """work(group) on `world` threads at once; the results in rank order (re-raising the first error)."""
    shared = {"slots": [None] * world, "gate": threading.Barrier(world, timeout=120)}
    results, errors = [None] * world, []

    def one(rank: int) -> None:
        try:
            results[rank] = work(ThreadGroup(rank, world, shared))
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
            shared["gate"].abort()

    threads = [threading.Thread(target=one, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def bn_state(model) -> list[torch.Tensor]:
    return [t.clone() for layer in running_stat_layers(model)
            for t in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]


def test_sharded_bn_statistics_and_evaluation_equal_one_process(run):
    """3 ranks, 5 BatchNorm batches (2/2/1 per rank), and the full evaluation of both splits."""
    ckpt = load_checkpoint(run / "checkpoints" / "cycle_001.pt")
    data = load_data(ckpt.data)
    settings = PathSettings(points=3, bn_batches=5, batch_size=50)

    def evaluate(group):
        model = ckpt.build_model("cpu")
        evaluator = PointEvaluator(model, data, settings, "cpu", group)
        error, loss = evaluator(ckpt.state_dict, "cycle_001")
        return bn_state(model), evaluator.bn_batches_used, error, loss

    single_state, single_used, single_error, single_loss = evaluate(Group())
    assert single_used == 5
    for state, used, error, loss in on_ranks(3, evaluate):
        assert used == single_used
        for ours, theirs in zip(state, single_state):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(loss, single_loss, rtol=RTOL, atol=ATOL)
        np.testing.assert_array_equal(error, single_error)  # correct counts are exact
    # The plain function, one more rank than batches: a rank with none still ends right.
    model = ckpt.build_model("cpu")
    recompute_bn_statistics(model, data.train_batches(64, 0, 0, augment=False), 2, "cpu", group=Group())
    reference = bn_state(model)

    def recompute(group):
        model = ckpt.build_model("cpu")
        used = recompute_bn_statistics(model, data.train_batches(64, 0, 0, augment=False), 2, "cpu", group=group)
        return used, bn_state(model)

    for used, state in on_ranks(3, recompute):
        assert used == 2
        for ours, theirs in zip(state, reference):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_sharded_hessian_operator_lanczos_and_trace_equal_one_process(run):
    ckpt = load_checkpoint(run / "checkpoints" / "cycle_001.pt")
    data = load_data(ckpt.data)
    subset = data.subset_indices("train", 60, 0)

    def solve(group):
        model = ckpt.build_model("cpu")
        mine = group.shard(subset) if group.distributed else subset
        op = HessianOperator(model, list(data.eval_batches("train", 25, indices=mine)), ckpt.masks, group=group)
        pairs = lanczos_top(op, 1, 1e-5, 30, 0)
        trace = hutchinson_trace(op, 0.05, 5, 0, deflate=pairs)
        return op.num_samples, op.loss(), pairs, trace

    n, loss, pairs, trace = solve(Group())
    ranks = on_ranks(2, solve)
    for rank_n, rank_loss, rank_pairs, rank_trace in ranks:
        assert rank_n == n == 60
        assert rank_loss == pytest.approx(loss, rel=1e-6)
        np.testing.assert_allclose(rank_pairs.values, pairs.values, rtol=RTOL)
        assert rank_trace.samples == trace.samples
        assert rank_trace.mean == pytest.approx(trace.mean, rel=RTOL)
    # Every rank took the same decisions from the same bits.
    np.testing.assert_array_equal(ranks[0][2].values, ranks[1][2].values)
    assert ranks[0][3].mean == ranks[1][3].mean


def test_only_rank_zero_reads_and_writes_and_every_rank_returns_its_dataset(run, tmp_path, monkeypatch):
    """The library call on two threaded ranks: one file, the single-process numbers on every
    rank, and a second call reuses what rank 0 wrote."""
    from landscape.connectivity import connectivity

    local = threading.local()
    monkeypatch.setattr(distributed, "current", lambda: getattr(local, "group", Group()))
    written = []
    real_write = store.write_dataset

    def spy(ds, path):
        written.append(getattr(local, "group", Group()).rank)
        return real_write(ds, path)

    monkeypatch.setattr(store, "write_dataset", spy)
    settings = PathSettings(points=3, bn_batches=3, batch_size=50)
    single = connectivity([run], settings, out=tmp_path / "single.nc", device="cpu")
    written.clear()

    def analyse(group):
        local.group = group
        return connectivity([run], settings, out=tmp_path / "ranks.nc", device="cpu")

    first = on_ranks(2, analyse)
    assert written == [0] and sorted(p.name for p in tmp_path.iterdir()) == [
        "ranks.nc", "ranks.nc.lock", "single.nc", "single.nc.lock"]
    for result in first:
        assert result.computed == ["cycle_000..cycle_001"] and result.reused == []
        for name in ("error", "loss", "loss_barrier_linear", "bn_batches_used"):
            np.testing.assert_allclose(result.dataset[name].values, single.dataset[name].values, rtol=RTOL, atol=ATOL)
    again = on_ranks(2, analyse)
    assert written == [0] and all(r.computed == [] and r.reused == ["cycle_000..cycle_001"] for r in again)


# ---------------------------------------------------------------- torchrun, as a user runs it


def _json_once(stdout: str) -> dict:
    """The one JSON object on stdout (two ranks printing would be two lines)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def _assert_same_paths(single: dict, ranks: dict) -> None:
    assert single["pairs"].keys() == ranks["pairs"].keys()
    for label, pair in single["pairs"].items():
        for split, s in pair["splits"].items():
            r = ranks["pairs"][label]["splits"][split]
            for key in ("error", "loss"):
                np.testing.assert_allclose(r[key], s[key], rtol=RTOL, atol=ATOL, err_msg=f"{label} {split} {key}")
            for key in ("error_barrier", "error_barrier_linear", "loss_barrier", "loss_barrier_linear"):
                assert r[key] == pytest.approx(s[key], rel=RTOL, abs=ATOL), (label, split, key)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_torchrun_barrier_with_recomputed_batchnorm_equals_one_process(run, tmp_path):
    a, b = run / "checkpoints" / "init.pt", run / "checkpoints" / "cycle_001.pt"
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = _json_once(run_cli("barrier", str(a), str(b), *PATH_ARGS, "--out", str(tmp_path / "one" / "x.nc")).stdout)
    ranks = _json_once(run_torchrun("barrier", str(a), str(b), *PATH_ARGS, "--out", str(tmp_path / "two" / "x.nc")).stdout)
    assert ranks["bn_mode"] == "recompute" and ranks["computed"] == single["computed"]
    _assert_same_paths(single, ranks)
    one, two = store.read_dataset(tmp_path / "one" / "x.nc"), store.read_dataset(tmp_path / "two" / "x.nc")
    assert int(two.bn_batches_used.item()) == int(one.bn_batches_used.item()) == 3
    np.testing.assert_array_equal(two.samples.values, one.samples.values)
    assert _files(tmp_path / "two") == _files(tmp_path / "one") == ["x.nc", "x.nc.lock"]


def test_torchrun_connectivity_of_a_run_equals_one_process(run, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = _json_once(run_cli("connectivity", str(run), *PATH_ARGS, "--out", str(tmp_path / "one" / "c.nc")).stdout)
    ranks = _json_once(run_torchrun("connectivity", str(run), *PATH_ARGS, "--out", str(tmp_path / "two" / "c.nc")).stdout)
    assert ranks["computed"] == single["computed"] == ["cycle_000..cycle_001"]
    _assert_same_paths(single, ranks)
    one, two = store.read_dataset(tmp_path / "one" / "c.nc"), store.read_dataset(tmp_path / "two" / "c.nc")
    np.testing.assert_array_equal(two.bn_batches_used.values, one.bn_batches_used.values)
    assert _files(tmp_path / "two") == _files(tmp_path / "one") == ["c.nc", "c.nc.lock"]
    assert not (run / "analysis").exists()  # nothing written beside the run


def test_torchrun_sharpness_equals_one_process(run, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    args = (str(run), "--checkpoints", "cycle_001", *SHARPNESS_ARGS)
    single = _json_once(run_cli("sharpness", *args, "--out", str(tmp_path / "one" / "s.nc")).stdout)
    ranks = _json_once(run_torchrun("sharpness", *args, "--out", str(tmp_path / "two" / "s.nc")).stdout)
    assert ranks["computed"] == single["computed"] == ["cycle_001"]
    assert ranks["samples"] == single["samples"] == 96
    for label, s in single["checkpoints"].items():
        r = ranks["checkpoints"][label]
        np.testing.assert_allclose(r["eigenvalues"], s["eigenvalues"], rtol=RTOL, err_msg=label)
        assert r["hvp_counts"] == s["hvp_counts"] and r["trace_samples"] == s["trace_samples"]
        assert r["trace"] == pytest.approx(s["trace"], rel=RTOL)
        assert r["loss"] == pytest.approx(s["loss"], rel=RTOL)
    assert _files(tmp_path / "two") == _files(tmp_path / "one") == ["s.nc", "s.nc.lock"]
