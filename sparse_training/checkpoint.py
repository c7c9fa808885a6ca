"""The checkpoint schema: what a checkpoint file holds, how it is written and how it is read.

A checkpoint is self-describing: `state_dict`, `masks`, `model` (name and kwargs to rebuild
it), `data` (the data config it was trained on), `cycle`, `epoch`, `step`, `sparsity`, the
metrics at that point and a schema version; only tensors and plain Python types, so
`torch.load(path, weights_only=True)` reads it. Pruned weights are stored as exact zeros.
A user's plain `state_dict` file is read too, given --model (and --data to evaluate)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import DataConfig, ModelConfig
from .errors import UserError
from .io import torch_load_safe, torch_save_atomic
from .rundir import RunDir, run_of_checkpoint

CHECKPOINT_SCHEMA = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint. `masks` always covers every prunable weight (all True when dense);
    `model`/`data` are None only for a plain state_dict loaded without --model/--data."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    model: ModelConfig | None
    data: DataConfig | None
    label: str
    cycle: int | None = None
    epoch: int | None = None
    step: int | None = None
    sparsity: float = 0.0
    method: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    plain: bool = False  # a user's plain state_dict rather than one of ours
    model_from_user: bool = False  # the user typed --model: a module.path:factory may be imported
    max_parameters: int | None = None  # the user's limit on the model's size (None: models.MAX_PARAMETERS)

    @property
    def run(self) -> RunDir | None:
        return run_of_checkpoint(self.path)

    def build_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """A fresh model with this checkpoint's weights, on `device`, in eval mode."""
        from .models import build_model, sized_model

        if self.model is None:
            raise UserError(f"{self.path} is a plain state_dict; say which model it is with --model NAME")
        # The kwargs come from the file: count first.
        sized_model(self.model, allow_import=self.model_from_user, max_parameters=self.max_parameters)
        model = build_model(self.model, allow_import=self.model_from_user)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as error:
            first = str(error).strip().splitlines()
            raise UserError(
                f"{self.path} does not fit model {self.model.name!r} "
                f"({first[1].strip() if len(first) > 1 else first[0][:160]}); check --model/--model-kwargs"
            ) from None
        return model.to(device).eval()


def checkpoint_payload(
    *, model: nn.Module, masks: Mapping[str, torch.Tensor], model_config: ModelConfig, data_config: DataConfig,
    label: str, cycle: int | None, epoch: int | None, step: int, sparsity: float, method: str,
    metrics: Mapping[str, float], config: Mapping[str, Any],
) -> dict[str, Any]:
    """The self-describing dict written to disk: tensors and plain Python values only."""
    from dataclasses import asdict

    return {
        "schema_version": CHECKPOINT_SCHEMA,
        "label": label,
        # contiguous: a file never depends on the memory format its run trained in
        "state_dict": {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                       for k, v in model.state_dict().items()},
        "masks": {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in masks.items()},
        "model": asdict(model_config),
        "data": asdict(data_config),
        "cycle": cycle,
        "epoch": epoch,
        "step": step,
        "sparsity": float(sparsity),
        "method": method,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "config": json.loads(json.dumps(dict(config))),
    }


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> None:
    torch_save_atomic(dict(payload), path)


def load_checkpoint(
    path: str | Path, *, model: str | None = None, model_kwargs: Mapping[str, Any] | None = None,
    data: str | None = None, check_finite: bool = True, max_parameters: int | None = None,
) -> Checkpoint:
    """Load one of our checkpoints, or a user's plain state_dict when `model` (and `data`,
    for analyses that evaluate) is given. Raises UserError with a one-line message."""
    path = Path(path)
    raw = torch_load_safe(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds a {type(raw).__name__}, not a checkpoint or state_dict")
    if "schema_version" in raw and "state_dict" in raw:
        ckpt = _from_payload(path, raw, max_parameters)
        if model is not None:  # a user may override the recorded architecture kwargs, never silently
            ckpt.model = ModelConfig(model, dict(model_kwargs or ckpt.model.kwargs))
            ckpt.model_from_user = True
        if data is not None:
            ckpt.data = DataConfig(name=data)
    else:
        ckpt = _from_state_dict(path, raw, model, model_kwargs, data, max_parameters)
    ckpt.max_parameters = max_parameters
    complex_ = [k for k, v in ckpt.state_dict.items() if v.is_complex()]
    if complex_:  # no model of ours has complex weights, and sign and magnitude are undefined for them
        raise UserError(f"{path} has complex values in {complex_[0]}; weights must be real numbers")
    if check_finite:
        bad = [k for k, v in ckpt.state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise UserError(f"{path} has non-finite (NaN/Inf) values in {bad[0]}" + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""))
    return ckpt


def _from_payload(path: Path, raw: dict[str, Any], max_parameters: int | None) -> Checkpoint:
    from .config import section

    schema = raw["schema_version"]
    if type(schema) is not int or schema != CHECKPOINT_SCHEMA:
        raise UserError(f"{path} has checkpoint schema {schema!r:.40}; this version reads {CHECKPOINT_SCHEMA}")
    try:
        state_dict, masks = raw["state_dict"], raw.get("masks") or {}
        if not (_is_tensor_dict(state_dict) and _is_tensor_dict(masks)):
            raise TypeError("state_dict and masks must map names to dense tensors")
        model_cfg = section(ModelConfig, raw["model"], "model")
        data_cfg = _data_config(raw["data"]) if raw.get("data") is not None else None
        fields = {key: _typed(raw, key, kinds) for key, kinds in _PAYLOAD_FIELDS.items()}
        if not all(0 <= (fields[key] or 0) < 2**63 for key in ("cycle", "epoch", "step")):
            raise ValueError("cycle, epoch and step must lie in [0, 2**63)")
        if not 0.0 <= (fields["sparsity"] or 0.0) <= 1.0:
            raise ValueError("sparsity must lie in [0, 1]")
        if not all(isinstance(k, str) and _is_number(v) for k, v in fields["metrics"].items()):
            raise TypeError("metrics must map names to numbers")
    except (KeyError, TypeError, ValueError, UserError) as error:
        raise UserError(f"{path} is a damaged checkpoint ({str(error)[:200]})") from None
    masks = _complete_masks(path, state_dict, masks, model_cfg, allow_import=False, max_parameters=max_parameters)
    for name, mask in masks.items():
        if name not in state_dict or mask.shape != state_dict[name].shape:
            raise UserError(f"{path} is a damaged checkpoint (its mask of {name!r} fits no weight of that shape)")
    return Checkpoint(
        path=path, state_dict=state_dict, masks=masks, model=model_cfg, data=data_cfg,
        label=fields["label"] or path.stem, cycle=fields["cycle"], epoch=fields["epoch"], step=fields["step"],
        sparsity=float(fields["sparsity"] or 0.0), method=fields["method"], metrics=dict(fields["metrics"] or {}),
        config=dict(fields["config"] or {}),
    )


def _data_config(raw: Any) -> DataConfig:
    """The data a checkpoint was trained on, checked like a flag. Where data lives and whether
    it may be downloaded are never taken from a file: analyses set them from their own flags."""
    from .config import check_data, section

    data = dataclasses.replace(section(DataConfig, raw, "data"), data_dir=None, download=False)
    check_data(data)
    return data


# The plain fields of a checkpoint and the types they may have (None: absent).
_PAYLOAD_FIELDS = {"label": (str,), "cycle": (int,), "epoch": (int,), "step": (int,), "sparsity": (int, float),
                   "method": (str,), "metrics": (dict,), "config": (dict,)}


def _typed(raw: dict[str, Any], key: str, kinds: tuple[type, ...]) -> Any:
    value = raw.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
        raise TypeError(f"{key} is a {type(value).__name__}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_tensor_dict(value: Any) -> bool:
    """{name: dense CPU tensor}, the only thing the code may use as weights or masks (torch.load
    also gives back sparse and meta tensors)."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided and v.device.type == "cpu"
        for k, v in value.items())


def _complete_masks(path: Path, state_dict, masks, model_cfg: ModelConfig | None, allow_import: bool,
                    max_parameters: int | None = None) -> dict[str, torch.Tensor]:
    """Dense layers have no stored mask entry: fill in all-True for every prunable weight.
    A user model named in the file is not imported: its stored masks are taken as they are."""
    if model_cfg is None:
        return masks
    from .models import imports_code

    if imports_code(model_cfg.name) and not allow_import:
        return {name: m.bool() for name, m in masks.items()}
    from .masks import prunable_parameters
    from .models import sized_model

    names = prunable_parameters(sized_model(model_cfg, allow_import=allow_import, max_parameters=max_parameters)).keys()
    full = {}
    for name in names:
        if name in masks:
            full[name] = masks[name].bool()
        elif name in state_dict:
            full[name] = torch.ones_like(state_dict[name], dtype=torch.bool)
        else:
            raise UserError(f"{path} has no weight {name!r} that model {model_cfg.name!r} needs; check --model")
    return full


def _from_state_dict(path: Path, raw: dict[str, Any], model: str | None, model_kwargs, data: str | None,
                     max_parameters: int | None) -> Checkpoint:
    if "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]  # a common wrapper: {"state_dict": ..., "epoch": ...}
    if not raw or not _is_tensor_dict(raw):
        raise UserError(f"{path} is neither a checkpoint of ours nor a state_dict of tensors")
    if model is None:
        raise UserError(f"{path} is a plain state_dict; say which model it is with --model NAME [--model-kwargs JSON] --data NAME")
    model_cfg = ModelConfig(model, dict(model_kwargs or {}))
    from .masks import mask_from_weights, prunable_parameters
    from .models import sized_model

    names = list(prunable_parameters(sized_model(model_cfg, allow_import=True, max_parameters=max_parameters)))
    missing = [n for n in names if n not in raw]
    if missing:
        raise UserError(f"{path} does not fit model {model!r}: no {missing[0]!r}; check --model/--model-kwargs")
    masks = mask_from_weights(raw, names)
    from .masks import sparsity as mask_sparsity

    return Checkpoint(
        path=path, state_dict=dict(raw), masks=masks, model=model_cfg,
        data=DataConfig(name=data) if data else None, label=path.stem, sparsity=mask_sparsity(masks), plain=True,
        model_from_user=True,
    )


def resolve_checkpoints(path: str | Path, labels: list[str] | None = None, allow_incomplete: bool = False) -> tuple[RunDir | None, list[Path]]:
    """A run directory (its checkpoints, or the `labels` asked for) or a single checkpoint file."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        run.require_done(allow_incomplete)
        available = run.checkpoint_labels()
        wanted = labels or available
        unknown = [label for label in wanted if label not in available and not run.checkpoint(label).exists()]
        if unknown:
            raise UserError(f"run {path} has no checkpoint {unknown[0]!r}; it has {', '.join(available) or 'none'}")
        return run, [run.checkpoint(label) for label in wanted]
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run directory or a checkpoint file")
    return run_of_checkpoint(path), [path]
