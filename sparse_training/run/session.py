"""One run being trained: the model and its optimizer, the method's cycle plan, and the parts
composed around the one loop (`trainer.train_cycle`), whose callbacks it implements.

Time is the global step. Resuming, rewinding and branching are all "load weights, start at
step k": the resume state is written at the start of every cycle, at the end of every epoch
and on a requested stop, and the data order and LR depend only on (config, seed, step), so a
resumed run equals an uninterrupted one bit for bit on CPU."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .. import methods
from ..acceleration import DivergenceWatch, StepRunner, channels_last_for, check_compile_supported
from ..config import DEFAULT_EVAL_TRAIN_SAMPLES, FULL_TRAIN_EVAL_LIMIT, Config
from ..data.base import batch_bounds
from ..distributed import Group
from ..errors import UserError
from ..masks import Mask
from ..methods import CyclePlan
from ..records import read_meta, update_meta
from ..rundir import RunDir, cycle_label
from ..schedules import learning_rate
from ..trainer import CycleSpan, Position, make_optimizer, train_cycle
from .checkpointing import Checkpointing
from .evaluation import Evaluation
from .mask_control import MaskControl


STOP_CHECK_EVERY = 16  # steps between the ranks' agreements on a stop request (torchrun)


class RunSession:
    """Drives the plan through the loop; owns the model and optimizer; `masks`, `evaluation`
    and `checkpoints` own the rest."""

    def __init__(self, run: RunDir, config: Config, data: Any, device: str, log: Callable[[str], None],
                 stop: Callable[[], bool], max_parameters: int | None = None, group: Group | None = None):
        from ..models import build_model, model_config_for, sized_model

        self.run, self.data, self.device, self.log, self.stop = run, data, device, log, stop
        self.group = group if group is not None else Group()
        self.step, self.last_of_epoch = 0, False  # where the last update was, for the ranks' stop agreement
        # procedures.prepare admits a module.path:factory only when the user typed it, on resume too.
        model_cfg = model_config_for(config.model.name, config.model.kwargs, data.num_classes, data.input_shape,
                                     allow_import=True)
        self.config = config.replace("model", kwargs=model_cfg.kwargs).replace(
            "run", eval_train_samples=_eval_train_samples(config.run.eval_train_samples, data))
        _check_keeps_weights(sized_model(self.config.model, allow_import=True, max_parameters=max_parameters),
                             self.config.prune.sparsity)
        self.method = methods.get(self.config.run.method)
        self.plans = self.method.plan(self.config)
        self.spans = _spans(self.plans, data.steps_per_epoch(self.config.optim.batch_size))
        if self.total_steps >= 2**63:  # the step counter is int64 in state.pt, metrics.csv and the analyses
            raise UserError(f"{self.total_steps} training steps do not fit a 64-bit step counter; train fewer epochs")
        self.plan: CyclePlan = self.plans[0]
        torch.manual_seed(self.config.run.seed)
        self.model = build_model(self.config.model, allow_import=True).to(device)
        _check_batch_split(data, self.config, self.model, self.group)
        if self.config.run.sync_bn and self.group.distributed:
            self.model = _sync_batchnorm(self.model, device)
        channels_last = channels_last_for(self.model, device, self.config.run.memory_format)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.runner = StepRunner(device, self.config.run.precision, channels_last)
        # Evaluation runs the model alone (each rank on its own samples); training runs it
        # under DistributedDataParallel when the job has several processes.
        self.evaluated = self._compiled() if self.config.run.compile else self.model
        self.forward = self._data_parallel(self.evaluated) if self.group.distributed else self.evaluated
        self.watch = DivergenceWatch(device)
        self.optimizer = make_optimizer(self.model, self.config.optim)
        moving = self.method.moving_mask(self.config, self.spans[0].steps)
        self.masks = MaskControl(self.model, self.config, data, device, moving, log, self._warn, self.group)
        self.masks.bind(self.optimizer)
        self.evaluation = Evaluation(run, data, self.config, self.runner, log, self.group)
        self.checkpoints = Checkpointing(run, self.config)

    def _compiled(self) -> torch.nn.Module:
        """The model compiled; it shares its parameters, so masks, checkpoints and the
        optimizer keep working on `self.model`."""
        check_compile_supported(self.device)
        return torch.compile(self.model)

    def _data_parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel over the job's processes: it averages the gradients of
        every step over the ranks during the backward pass (NCCL on GPUs, gloo on CPU)."""
        from torch.nn.parallel import DistributedDataParallel

        cuda = torch.device(self.device).type == "cuda"
        return DistributedDataParallel(module, device_ids=[torch.device(self.device)] if cuda else None)

    @property
    def mask(self) -> Mask:
        return self.masks.mask

    @property
    def total_steps(self) -> int:
        return sum(span.steps for span in self.spans)

    def initialise(self) -> None:
        """The weights of step 0, when the method takes them from elsewhere (transfer)."""
        self.method.initialise(self.model, self.config)

    def _warn(self, warning: str) -> None:
        """A warning in the log and, for whoever reads the run later, in meta.json, once: a
        resumed run replays the steps since its last state, warnings included."""
        self.log(f"warning: {warning}")
        if not self.group.is_main:
            return
        recorded = read_meta(self.run).get("warnings", [])
        if warning not in recorded:
            update_meta(self.run, warnings=recorded + [warning])

    # -------------------------------------------------------- state and checkpoints

    def save_checkpoint(self, label: str, position: Position, cycle: int | None, epoch: int | None) -> None:
        if not self.group.is_main:  # the ranks hold the same weights; one writes the run directory
            return
        self.checkpoints.save(label, self.model, self.mask, position, cycle, epoch, self.evaluation.metrics)

    def save_state(self, position: Position, cycle_started: bool) -> None:
        if not self.group.is_main:
            return
        self.checkpoints.save_state(model=self.model, optimizer=self.optimizer, mask=self.mask, position=position,
                                    cycle_started=cycle_started, metrics=self.evaluation.metrics,
                                    flops=self.masks.flops.total, grad_scaler=self.runner.state_dict())

    def load_state(self) -> tuple[Position, bool]:
        with self.checkpoints.reading_state() as state:
            position = _checked_position(state["position"])
            self.model.load_state_dict(state["model"])
            self.optimizer = make_optimizer(self.model, self.config.optim)
            _check_parameter_groups(state["optimizer"], self.optimizer, self.checkpoints.run.state)
            self.optimizer.load_state_dict(state["optimizer"])
            _check_optimizer_state(self.optimizer)
            _match_memory_format(self.optimizer)
            self.runner.load_state_dict(state.get("grad_scaler", {}))
            self.masks.restore({k: v.to(self.device) for k, v in state["masks"].items()}, self.optimizer,
                               int(state["flops"]))
            self.evaluation.metrics = dict(state["metrics"])
            torch.set_rng_state(state["torch_rng"])
            return position, bool(state["cycle_started"])

    def _evaluate(self, position: Position, lr: float, full: bool = True) -> None:
        """Evaluate; `full` = the whole training split even when per-epoch train metrics use a subset.
        Every rank evaluates with rank 0's BatchNorm statistics: DDP hands them to the other
        ranks before each forward pass, and each rank's own last pass has moved them since."""
        self.group.broadcast_(self.model.buffers())
        self.evaluation.record(self.evaluated, position, lr, self.masks.sparsity, self.masks.flops.total, full)

    # -------------------------------------------------------- cycle start and loop callbacks

    def start_cycle(self, plan: CyclePlan, span: CycleSpan, position: Position) -> None:
        """Mask change, weight source, fresh optimizer, the epoch-0 evaluation. The mask
        changes first: IMP prunes by the magnitudes its previous cycle trained, then rewinds."""
        if plan.mask_change is not None:
            self.masks.change(plan.mask_change, plan.index)
        if plan.weights in ("rewind", "init"):
            self.group.barrier()  # rank 0 has written the checkpoint the cycle starts from
            self.checkpoints.load_weights(plan.weights, self.model, self.device)
        self.masks.apply()
        self.optimizer = make_optimizer(self.model, self.config.optim)
        self.masks.bind(self.optimizer)
        if plan.save_rewind_at == 0:
            self.save_checkpoint("rewind", position, plan.index, 0)
        self._evaluate(position, learning_rate(0, span.steps, self.config.optim))
        self.save_state(position, cycle_started=True)

    def after_step(self, position: Position) -> None:
        self.step = position.step
        self.last_of_epoch = position.batch == self.spans[self.plan.index].steps_per_epoch
        t = position.step - self.spans[self.plan.index].start_step
        if self.masks.moves_at(t):
            self.watch.check()  # a mask is never chosen from weights past a non-finite loss
        self.masks.after_step(t, position.batch)

    def end_of_epoch(self, position: Position, lr: float) -> None:
        plan, every, run = self.plan, self.config.run.save_every, self.config.run
        self.group.check_identical("masks or weights", [*self.mask.values(), *self.model.parameters()])
        last = position.epoch == plan.epochs
        checkpointed = last or plan.save_rewind_at == position.epoch or bool(every and position.epoch % every == 0)
        evaluated = checkpointed or position.epoch % run.eval_every == 0
        if evaluated:
            self._evaluate(position, lr, full=checkpointed)
        if plan.save_rewind_at == position.epoch:
            self.save_checkpoint("rewind", position, plan.index, position.epoch)
        if every and position.epoch % every == 0 and not last:
            self.save_checkpoint(cycle_label(plan.index, position.epoch), position, plan.index, position.epoch)
        if last:
            self.save_checkpoint(cycle_label(plan.index), position, plan.index, position.epoch)
            self.save_state(Position(plan.index + 1, 0, 0, position.step), cycle_started=False)
        else:
            self.save_state(position, cycle_started=True)
        self.evaluation.log_epoch(position, plan.epochs, lr, self.masks.sparsity, evaluated)

    def should_stop(self) -> bool:
        """A stop requested of any rank (SIGTERM to one process) stops every rank at the same
        step. The ranks agree every STOP_CHECK_EVERY steps and at every epoch's last step (so a
        stop late in a run is honoured too): asking costs a host-device sync."""
        if self.group.distributed and self.step % STOP_CHECK_EVERY and not self.last_of_epoch:
            return False
        return self.group.any(self.stop())

    def stopped(self, position: Position) -> None:
        self.save_state(position, cycle_started=True)
        self.group.barrier()  # no rank leaves before the resume state is saved

    # -------------------------------------------------------- driving the plan

    def train(self, position: Position, cycle_started: bool, progress: Callable[[int], Any] | None = None) -> Position:
        self.log(f"training in {self.config.run.precision}" + (", channels-last" if self.runner.channels_last else "")
                 + (", compiled" if self.config.run.compile else "") + f" on {self.device}")
        for plan, span in zip(self.plans, self.spans):
            if plan.index < position.cycle:
                continue
            self.plan = plan
            if not cycle_started:
                self.start_cycle(plan, span, position)
            position = self.train_span(span, position, progress)
            position = Position(plan.index + 1, 0, 0, position.step)
            cycle_started = False
        return position


    def train_span(self, span: CycleSpan, position: Position, progress: Callable[[int], Any] | None = None,
                   callbacks: Any = None) -> Position:
        """The loop over `span` from `position`, reporting to `callbacks` (this session by
        default; benchmarks pass their own to time the steps alone)."""
        try:
            return train_cycle(
                model=self.forward, optimizer=self.optimizer, masked_step=self.masks.zero_pruned, data=self.data,
                optim=self.config.optim, span=span, start=position, seed=self.config.run.seed,
                augment=self.config.data.augment, runner=self.runner, watch=self.watch,
                callbacks=self if callbacks is None else callbacks, progress=progress, group=self.group,
            )
        except torch._dynamo.exc.TorchDynamoException as error:  # only raised with --compile
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise UserError(f"torch.compile failed on {self.config.model.name} ({reason}); train without --compile") from None


def _eval_train_samples(requested: int | None, data: Any) -> int | None:
    """The size of the per-epoch train subset (None: the whole split), checked against the data."""
    available = data.num_samples("train")
    if requested is None:
        return None if available <= FULL_TRAIN_EVAL_LIMIT else DEFAULT_EVAL_TRAIN_SAMPLES
    if requested > available:
        raise UserError(f"--eval-train-samples {requested} exceeds the {available} training samples of "
                        f"{data.name}; choose at most {available}")
    return requested


def _check_batch_split(data: Any, config: Config, model: torch.nn.Module, group: Group) -> None:
    """Every rank needs samples of every batch: two, where BatchNorm trains on them."""
    if not group.distributed:
        return
    smallest = min(stop - start for start, stop in batch_bounds(data.num_samples("train"), config.optim.batch_size))
    needed = 2 if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1
    if smallest // group.world < needed:
        raise UserError(f"the smallest training batch ({smallest} samples of {data.name} at --batch-size "
                        f"{config.optim.batch_size}) cannot give each of {group.world} processes {needed} sample(s)"
                        f"{' for BatchNorm' if needed == 2 else ''}; choose a batch size whose last batch is larger, "
                        "or fewer processes")


def _sync_batchnorm(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """BatchNorm layers as SyncBatchNorm, whose statistics span every rank's part of the batch."""
    if torch.device(device).type != "cuda":
        raise UserError("--sync-bn needs GPUs: torch's SyncBatchNorm runs on CUDA only; on CPU drop --sync-bn "
                        "(each process then normalises by the statistics of its own part of the batch)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _match_memory_format(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer buffers loaded from a (contiguous) file take their weight's memory format,
    so a channels-last run keeps one layout per weight after resuming."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _check_keeps_weights(model: torch.nn.Module, sparsity: float) -> None:
    """A sparsity so close to 1 that no weight is kept would train a network without weights."""
    from ..masks import prunable_parameters

    total = sum(p.numel() for p in prunable_parameters(model).values())
    if sparsity > 0 and round((1.0 - sparsity) * total) < 1:
        raise UserError(f"sparsity {sparsity} keeps none of the model's {total:,} prunable weights; "
                        f"the highest that keeps one is {1 - 1 / max(total, 1):.6g}")


def _checked_position(raw: Any) -> Position:
    """The position of a resume state; a tampered one (negative, not an integer) is refused."""
    if not isinstance(raw, dict) or set(raw) != {"cycle", "epoch", "batch", "step"}:
        raise ValueError("its position is not {cycle, epoch, batch, step}")
    if not all(type(v) is int and 0 <= v < 2**63 for v in raw.values()):
        raise ValueError("its position holds values that are not integers in [0, 2**63)")
    return Position(**raw)


def _check_parameter_groups(saved: Any, optimizer: torch.optim.Optimizer, path: Any) -> None:
    """Until adamw decayed only the weight matrices, its state had one parameter group: such a
    run cannot continue unchanged, and its resume state is not damaged."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if isinstance(groups, list) and len(groups) == 1 and len(optimizer.param_groups) == 2:
        raise UserError(f"{path} was saved when adamw decayed every parameter; adamw now decays only the weight "
                        "matrices, so this run cannot resume unchanged: finish it with the version that started it, "
                        "or delete the file to restart the run from scratch")


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """torch loads optimizer buffers of any shape; a wrong one would fail at the first step."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"its optimizer {name} has shape {tuple(value.shape)}, "
                                     f"its weight {tuple(param.shape)}")


def _spans(plans: list[CyclePlan], steps_per_epoch: int) -> list[CycleSpan]:
    spans, step, epoch = [], 0, 0
    for plan in plans:
        spans.append(CycleSpan(plan.index, plan.epochs, steps_per_epoch, step, epoch))
        step += plan.epochs * steps_per_epoch
        epoch += plan.epochs
    return spans
