"""Procedures: run a config's cycle plan through the training loop into a run directory.

Time is the global step. Resuming, rewinding and branching are all "load weights, start at
step k": the resume state (state.pt) is written at the start of every cycle, at the end of
every epoch and on a requested stop, and the data order and LR depend only on
(config, seed, step), so a resumed run equals an uninterrupted one bit for bit on CPU."""

from __future__ import annotations

import platform
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import __version__
from .checkpoint import checkpoint_payload, load_checkpoint, save_checkpoint
from .io import exclusive_lock, torch_load_safe, torch_save_atomic, write_bytes_atomic, write_json_atomic
from .records import append_metrics, read_config, read_meta, truncate_metrics, update_meta
from .rundir import RunDir
from .config import Config, resolve
from .data.base import batch_bounds
from .dynamic import mask_schedule
from .errors import SparseTrainingError, TrainingDiverged, UserError
from .flops import CONVENTION as FLOPS_CONVENTION, FlopCounter, layer_costs
from .masks import MaskedStep, apply_mask_, collapsed_layers, ones_mask, sparsity, validate_mask
from .plans import CyclePlan, MaskChange, plan_cycles
from .schedules import learning_rate
from .trainer import CycleSpan, Interrupted, Position, evaluate, make_optimizer, train_cycle

STATE_SCHEMA = 1


# ---------------------------------------------------------------- stopping on a signal

class StopFlag:
    """Set by SIGTERM/SIGINT (a scheduler's pre-emption, Ctrl-C): the loop finishes its
    current step, saves the resume state and stops."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __bool__(self) -> bool:
        return self.signal_name is not None


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    def handler(signum: int, _frame: Any) -> None:
        flag.signal_name = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- the run

class RunSession:
    """One run being trained: owns the model, mask, optimizer and the run directory writes.
    Implements the loop's callbacks."""

    def __init__(self, run: RunDir, config: Config, data: Any, device: str, log: Callable[[str], None],
                 stop: StopFlag | None = None):
        from .models import build_model, model_config_for

        self.run, self.data, self.device, self.log = run, data, device, log
        self.stop = stop if stop is not None else StopFlag()
        # The config was typed (or written) by the user: a module.path:factory may be imported.
        model_cfg = model_config_for(config.model.name, config.model.kwargs, data.num_classes, data.input_shape,
                                     allow_import=True)
        self.config = config.replace("model", kwargs=model_cfg.kwargs)
        self.plans = plan_cycles(self.config)
        self.spans = _spans(self.plans, data.steps_per_epoch(self.config.optim.batch_size))
        torch.manual_seed(self.config.run.seed)
        self.model = build_model(self.config.model, allow_import=True).to(device)
        self.mask = ones_mask(self.model)
        self.optimizer = make_optimizer(self.model, self.config.optim)
        self.masked_step = MaskedStep(self.model, self.mask, self.optimizer)
        self.metrics: dict[str, float] = {}
        self.plan: CyclePlan = self.plans[0]
        self.flops = FlopCounter(layer_costs(self.model, data.input_shape, device))
        self.batch_sizes = [stop - start for start, stop in
                            batch_bounds(data.num_samples("train"), self.config.optim.batch_size)]
        # gmp/rigl: one cycle whose mask moves in after_step.
        self.mask_schedule = mask_schedule(self.config.run.method, self.config.prune, self.spans[0].steps)
        self.transfer_mask: dict[str, torch.Tensor] | None = None

    def initialise(self) -> None:
        """Set the weights of step 0 (init.pt) when the method takes them from elsewhere
        (transfer); every source is loaded and checked here, before the run writes anything."""
        if self.config.run.method == "transfer":
            from .transfer import initialise

            self.transfer_mask = initialise(self.model, self.config.prune, self.config.model, self.config.run.seed)

    # -------------------------------------------------------- state

    def save_state(self, position: Position, cycle_started: bool) -> None:
        torch_save_atomic({
            "schema_version": STATE_SCHEMA,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "masks": self.mask,
            "position": asdict(position),
            "cycle_started": cycle_started,
            "metrics": self.metrics,
            "flops": self.flops.total,
            "torch_rng": torch.get_rng_state(),
        }, self.run.state)

    def load_state(self) -> tuple[Position, bool]:
        state = torch_load_safe(self.run.state, "resume state")
        try:
            self.model.load_state_dict(state["model"])
            self.mask = {k: v.to(self.device) for k, v in state["masks"].items()}
            validate_mask(self.mask, self.model)
            self._new_optimizer()
            self.optimizer.load_state_dict(state["optimizer"])
            self.masked_step = MaskedStep(self.model, self.mask, self.optimizer)
            self.metrics = dict(state["metrics"])
            self.flops.total = int(state["flops"])
            self.flops.set_mask(self.mask)
            torch.set_rng_state(state["torch_rng"])
            position = Position(**state["position"])
            return position, bool(state["cycle_started"])
        except (KeyError, TypeError, RuntimeError, ValueError) as error:
            raise UserError(f"{self.run.state} is damaged ({error}); delete it to restart the run from scratch") from None

    def _new_optimizer(self) -> None:
        self.optimizer = make_optimizer(self.model, self.config.optim)
        self.masked_step = MaskedStep(self.model, self.mask, self.optimizer)

    # -------------------------------------------------------- checkpoints and metrics

    def save_checkpoint(self, label: str, position: Position, cycle: int | None, epoch: int | None) -> None:
        save_checkpoint(self.run.checkpoint(label), checkpoint_payload(
            model=self.model, masks=self.mask, model_config=self.config.model, data_config=self.config.data,
            label=label, cycle=cycle, epoch=epoch, step=position.step, sparsity=sparsity(self.mask),
            method=self.config.run.method, metrics=self.metrics, config=self.config.to_dict(),
        ))

    def evaluate_into_metrics(self, position: Position, lr: float) -> None:
        batch = self.config.optim.eval_batch_size
        rows = []
        for split in ("train", "test"):
            result = evaluate(self.model, self.data, split, batch, self.device)
            for metric, value in result.items():
                self.metrics[f"{split}_{metric}"] = value
                rows.append((position.cycle, position.epoch, position.step, split, metric, repr(value)))
        rows.append((position.cycle, position.epoch, position.step, "train", "lr", repr(lr)))
        rows.append((position.cycle, position.epoch, position.step, "train", "sparsity", repr(sparsity(self.mask))))
        rows.append((position.cycle, position.epoch, position.step, "train", "flops", repr(self.flops.total)))
        append_metrics(self.run, rows)

    # -------------------------------------------------------- cycle start

    def start_cycle(self, plan: CyclePlan, span: CycleSpan, position: Position) -> None:
        """Mask change, weight source, fresh optimizer, the epoch-0 evaluation. The mask
        changes first: IMP prunes by the magnitudes its previous cycle trained, then rewinds."""
        if plan.mask_change is not None:
            self.mask = self.change_mask(plan.mask_change, plan.index)
        if plan.weights in ("rewind", "init"):
            source = load_checkpoint(self.run.checkpoint(plan.weights))
            self.model.load_state_dict({k: v.to(self.device) for k, v in source.state_dict.items()})
        apply_mask_(self.model, self.mask)
        self.flops.set_mask(self.mask)
        self._new_optimizer()
        if plan.save_rewind_at == 0:
            self.save_checkpoint("rewind", position, plan.index, 0)
        self.evaluate_into_metrics(position, lr=learning_rate(0, span.steps, self.config.optim))
        self.save_state(position, cycle_started=True)

    def change_mask(self, change: MaskChange, cycle: int) -> dict[str, torch.Tensor]:
        from .pruners import magnitude_prune, prune

        prune_cfg, optim = self.config.prune, self.config.optim
        started = time.perf_counter()
        if change.criterion == "transfer":
            from .transfer import transferred_mask

            mask = self.transfer_mask or transferred_mask(prune_cfg, self.model, self.config.model)
        elif change.criterion == "magnitude" and cycle > 0:
            mask = magnitude_prune(self.model, self.mask, change.sparsity, change.allocation)
        else:
            mask = prune(
                self.model, self.mask, criterion=change.criterion, allocation=change.allocation,
                sparsity=change.sparsity, data=self.data, batch_size=optim.batch_size, batches=prune_cfg.score_batches,
                seed=self.config.run.seed + 1000 * cycle, device=self.device, synflow_rounds=prune_cfg.synflow_rounds,
                grasp_temperature=prune_cfg.grasp_temperature,
            )
        how = f"mask of {prune_cfg.mask_from}" if change.criterion == "transfer" else \
            f"{change.criterion} pruning ({change.allocation})"
        self.log(f"cycle {cycle}: {how} to sparsity {sparsity(mask):.4f} in {time.perf_counter() - started:.1f}s")
        collapsed = collapsed_layers(mask)
        if collapsed:
            warning = f"layer collapse at cycle {cycle}: {', '.join(collapsed)} keep no weights"
            self.log(f"warning: {warning}")
            meta = read_meta(self.run)
            update_meta(self.run, warnings=meta.get("warnings", []) + [warning])
        return mask

    # -------------------------------------------------------- loop callbacks

    def after_step(self, position: Position, loss: float) -> None:
        """Count the step's FLOPs; gmp/rigl: change the mask at their update steps (RigL's
        update uses this step's dense gradient, so the step's weight gradient counts dense)."""
        t = position.step - self.spans[self.plan.index].start_step
        update = self.mask_schedule is not None and self.mask_schedule.is_update_step(t)
        self.flops.add_step(self.batch_sizes[position.batch - 1],
                            dense_gradient=update and self.mask_schedule.needs_dense_gradient)
        if update:
            self.mask = self.mask_schedule.update(self.model, self.mask, self.optimizer, t)
            self.masked_step = MaskedStep(self.model, self.mask, self.optimizer)
            self.flops.set_mask(self.mask)

    def end_of_epoch(self, position: Position, lr: float) -> None:
        plan = self.plan
        self.evaluate_into_metrics(position, lr)
        last = position.epoch == plan.epochs
        every = self.config.run.save_every
        if plan.save_rewind_at == position.epoch:
            self.save_checkpoint("rewind", position, plan.index, position.epoch)
        if every and position.epoch % every == 0 and not last:
            self.save_checkpoint(f"cycle_{plan.index:03d}_epoch_{position.epoch:03d}", position, plan.index, position.epoch)
        if last:
            self.save_checkpoint(f"cycle_{plan.index:03d}", position, plan.index, position.epoch)
            self.save_state(Position(plan.index + 1, 0, 0, position.step), cycle_started=False)
        else:
            self.save_state(position, cycle_started=True)
        m = self.metrics
        self.log(f"cycle {plan.index} epoch {position.epoch}/{plan.epochs} step {position.step}: "
                 f"train loss {m['train_loss']:.4f} acc {m['train_accuracy']:.4f} | "
                 f"test loss {m['test_loss']:.4f} acc {m['test_accuracy']:.4f} | lr {lr:.4g} sparsity {sparsity(self.mask):.4f}")

    def should_stop(self) -> bool:
        return bool(self.stop)

    def stopped(self, position: Position) -> None:
        self.save_state(position, cycle_started=True)

    # -------------------------------------------------------- driving the plan

    def train(self, position: Position, cycle_started: bool, progress: Callable[[int], Any] | None = None) -> Position:
        for plan, span in zip(self.plans, self.spans):
            if plan.index < position.cycle:
                continue
            self.plan = plan
            if not cycle_started:
                self.start_cycle(plan, span, position)
            position = train_cycle(
                # The loop calls the current masked step: gmp/rigl replace it when the mask moves.
                model=self.model, optimizer=self.optimizer, masked_step=lambda: self.masked_step(), data=self.data,
                optim=self.config.optim, span=span, start=position, seed=self.config.run.seed,
                augment=self.config.data.augment, device=self.device, callbacks=self, progress=progress,
            )
            position = Position(plan.index + 1, 0, 0, position.step)
            cycle_started = False
        return position

    @property
    def total_steps(self) -> int:
        return sum(span.steps for span in self.spans)


def _spans(plans: list[CyclePlan], steps_per_epoch: int) -> list[CycleSpan]:
    spans, step, epoch = [], 0, 0
    for plan in plans:
        spans.append(CycleSpan(plan.index, plan.epochs, steps_per_epoch, step, epoch))
        step += plan.epochs * steps_per_epoch
        epoch += plan.epochs
    return spans


# ---------------------------------------------------------------- entry point

def _same_run(stored: Config, new: Config) -> bool:
    """Same run: every setting but the device equal; the stored model kwargs were completed
    from the data, so the new ones need only be a subset of them."""
    a, b = stored.to_dict(), new.to_dict()
    for raw in (a, b):
        raw["run"].pop("device")
    kwargs_a, kwargs_b = a["model"].pop("kwargs"), b["model"].pop("kwargs")
    return a == b and all(kwargs_a.get(k) == v for k, v in kwargs_b.items())


def _provenance(config: Config, command: str) -> dict[str, Any]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "package_version": __version__, "torch_version": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "git_sha": sha, "command": command, "device": config.run.device,
        "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "warnings": [],
    }


def prepare(config: Config, out: str | Path, resume: bool) -> tuple[RunDir, Config, bool]:
    """Decide what to do with `out` before anything is written. Returns (run, config, fresh)."""
    run = RunDir(out)
    if resume:
        if not run.exists():
            raise UserError(f"{run.path} holds no run to resume (no config.json); start one with `landscape train --out {run.path}`")
        stored = read_config(run)
        return run, stored.replace("run", device=config.run.device), False
    config = resolve(config)
    if run.exists():
        stored = read_config(run)
        if not _same_run(stored, config):
            raise UserError(f"{run.path} already holds a different run; choose another --out, or --resume {run.path} to continue it")
        return run, stored.replace("run", device=config.run.device), False
    leftovers = set(run.stray_temporaries()) | {run.lock}  # of a run killed before its config.json was written
    if run.path.exists() and (not run.path.is_dir() or any(p not in leftovers for p in run.path.iterdir())):
        raise UserError(f"{run.path} exists and is not an empty directory or a run; choose another --out")
    return run, config, True


def train_run(config: Config, out: str | Path, *, resume: bool = False, command: str = "",
              log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
              progress_factory: Callable[[int, int], Any] | None = None, stop: StopFlag | None = None) -> dict[str, Any]:
    """Train `config` into the run directory `out` (or continue it). Returns a summary dict.
    Everything that can be checked is checked before the first file is written."""
    from .data import load_data

    run, config, fresh = prepare(config, out, resume)
    if run.is_done():
        return {"run": str(run.path), "status": "already complete", **_final_summary(run)}
    data = load_data(config.data, config.run.device)
    session = RunSession(run, config, data, config.run.device, log, stop)
    if fresh:
        session.initialise()
    run.path.mkdir(parents=True, exist_ok=True)
    busy = (f"{run.path} is being trained by another process right now; wait for it to finish, or stop it "
            f"(it saves its resume state on SIGTERM) and then `landscape train --resume {run.path}`")
    with exclusive_lock(run.lock, wait=False, busy=busy):
        return _train_locked(session, fresh, command, log, progress_factory)


def _train_locked(session: RunSession, fresh: bool, command: str, log: Callable[[str], None],
                  progress_factory: Callable[[int, int], Any] | None) -> dict[str, Any]:
    """The part of train_run that writes: only one process at a time holds the run's lock."""
    run, config = session.run, session.config
    for leftover in run.stray_temporaries():  # of writes a killed process never finished
        leftover.unlink(missing_ok=True)
    if fresh:
        write_json_atomic(run.config, config.to_dict())
        write_json_atomic(run.meta, _provenance(config, command))
        position, cycle_started = Position(0, 0, 0, 0), False
        session.save_checkpoint("init", position, None, None)
    elif run.state.exists():
        position, cycle_started = session.load_state()
        truncate_metrics(run, (position.cycle, position.epoch) if cycle_started else (position.cycle - 1, 10**9))
        log(f"resuming {run.path} at cycle {position.cycle}, epoch {position.epoch}, step {position.step}")
    else:  # killed between config.json and the first state: start over inside the same directory
        position, cycle_started = Position(0, 0, 0, 0), False
        truncate_metrics(run, (-1, -1))
        session.initialise()
        session.save_checkpoint("init", position, None, None)
    update_meta(run, status="running", device=config.run.device)
    progress = progress_factory(session.total_steps, position.step) if progress_factory else None
    try:
        session.train(position, cycle_started, progress=progress.update if progress else None)
    except Interrupted as stop:
        update_meta(run, status="interrupted")
        raise UserInterrupted(run, stop.position, session.stop.signal_name or "stop") from None
    except TrainingDiverged:
        update_meta(run, status="diverged")
        raise
    finally:
        if progress is not None:
            progress.close()
    update_meta(run, status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), training_flops=session.flops.total,
                training_flops_note=FLOPS_CONVENTION)
    write_bytes_atomic(run.done, b"done\n")
    return {"run": str(run.path), "status": "trained", **_final_summary(run)}


class UserInterrupted(SparseTrainingError):
    """Training stopped on a signal after saving its resume state. Exit code 1: the run is not done."""

    def __init__(self, run: RunDir, position: Position, signal_name: str):
        super().__init__(f"{signal_name}: stopped at cycle {position.cycle}, epoch {position.epoch}, step {position.step}; "
                         f"resume state saved; continue with `landscape train --resume {run.path}`")


def _final_summary(run: RunDir) -> dict[str, Any]:
    labels = run.cycle_labels()
    if not labels:
        return {}
    final = load_checkpoint(run.checkpoint(labels[-1]))
    return {"cycles": len(labels), "final_checkpoint": str(run.checkpoint(labels[-1])), "sparsity": final.sparsity,
            "step": final.step, "training_flops": read_meta(run).get("training_flops"),
            **{k: final.metrics[k] for k in sorted(final.metrics)}}
