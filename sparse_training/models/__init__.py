"""Model registry: `build_model(ModelConfig)` and `model_config_for(...)`.

Names: the built-in models of `MODEL_NAMES`, `tv:NAME` (any torchvision classifier, built
untrained: weights are never downloaded) and `module.path:factory` (a user's own factory,
imported only when the user typed it: `allow_import=True`).

A ModelConfig's kwargs are complete (num_classes, input channels/size, width, ...), so the
`model` entry of a checkpoint alone rebuilds the network, without the data. Built-in models
get Kaiming-normal (fan_out, ReLU) conv weights with zero conv biases, BatchNorm at weight 1
and bias 0, and PyTorch's default Linear init, except the Vision Transformers (`vit`, `vit1d`),
which initialise themselves as DeiT does (`ModelSpec.initialise` False); tv: and user models
keep their own init. Image models that need the image size (`vit`) learn it from the data and
take square images only. Construction draws only from the global torch RNG, so
`torch.manual_seed` makes it exact."""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UserError
from .images import resnet18, resnet20, resnet32, resnet50, resnet56, vgg16
from .mnist1d import CNN1d, MLP, ResNet1d
from .mobilenet import mobilenetv2
from .transformers import vit, vit1d


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[..., nn.Module]
    inputs: str  # "flat": any shape, flattened | "sequence": (L,) or (C, L) | "image": (C, H, W)
    initialise: bool = True  # False: the builder initialises the model itself (no `init_weights`)


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(MLP, "flat"),
    "cnn1d": ModelSpec(CNN1d, "sequence"),
    "resnet1d": ModelSpec(ResNet1d, "sequence"),
    "resnet20": ModelSpec(resnet20, "image"),
    "resnet32": ModelSpec(resnet32, "image"),
    "resnet56": ModelSpec(resnet56, "image"),
    "resnet18": ModelSpec(resnet18, "image"),
    "resnet50": ModelSpec(resnet50, "image"),
    "vgg16": ModelSpec(vgg16, "image"),
    "mobilenetv2": ModelSpec(mobilenetv2, "image"),
    "vit": ModelSpec(vit, "image", initialise=False),
    "vit1d": ModelSpec(vit1d, "sequence", initialise=False),
}
MODEL_NAMES = tuple(MODELS)
# torchvision classifiers built for one image size (`image_size`, taken from the data).
TV_SIZED_PREFIXES = ("tv:vit_",)

# The largest model built without the user's say-so (`landscape train --max-parameters`): the
# kwargs of a checkpoint or config.json decide a model's size, so a file could otherwise make
# every command allocate what it likes.
MAX_PARAMETERS = 2_000_000_000

_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def build_model(config: ModelConfig, allow_import: bool = False) -> nn.Module:
    """A freshly initialised model (train mode) for `config`. `allow_import` permits importing
    a `module.path:factory`; pass it only for a name the user typed, never one read from a file."""
    name, kwargs = config.name, dict(config.kwargs)
    if name in MODELS:
        spec = MODELS[name]
        model = _call(name, spec.builder, kwargs)
        if spec.initialise:
            init_weights(model)
        return model
    if name.startswith("tv:"):
        return _build_torchvision(name, kwargs)
    if ":" in name:
        return _build_user_model(name, kwargs, allow_import)
    raise UserError(_unknown_model(name))


def imports_code(name: str) -> bool:
    """Whether building the model `name` imports a module (a user's module.path:factory)."""
    return ":" in name and not name.startswith("tv:")


def sized_model(config: ModelConfig, allow_import: bool = False, max_parameters: int | None = None) -> nn.Module:
    """The model built on the meta device: no memory for its weights and no draw from the
    global RNG; refused when it has more than `max_parameters` (MAX_PARAMETERS) parameters.
    Call it before building a model whose size a file decides."""
    limit = MAX_PARAMETERS if max_parameters is None else max_parameters
    with torch.device("meta"):
        model = build_model(config, allow_import=allow_import)
    count = parameter_count(model)
    if count > limit:
        raise UserError(f"model {config.name} with {json.dumps(config.kwargs, default=str)[:200]} has {count:,} "
                        f"parameters, more than the limit of {limit:,}; raise it with --max-parameters if you mean it")
    return model


def model_config_for(name: str, kwargs: Mapping[str, Any] | None, num_classes: int, input_shape: tuple[int, ...],
                     allow_import: bool = False) -> ModelConfig:
    """The complete ModelConfig for data with `num_classes` classes and samples of shape
    `input_shape`: the user's kwargs, every builder default, and what the data fixes (classes,
    input channels/length/size). A kwarg that contradicts the data is a UserError; a larger
    num_classes than the labels need is allowed."""
    kwargs, input_shape = dict(kwargs or {}), tuple(int(s) for s in input_shape)
    if name in MODELS:
        spec = MODELS[name]
        params = _parameters(spec.builder)
        _reject_unknown(name, kwargs, params)
        derived = {k: v for k, v in _derived_from_shape(name, spec.inputs, input_shape).items() if k in params}
        if "image_size" in derived:
            _check_square(name, input_shape)
        complete = {**{p: default for p, default in params.items() if default is not inspect.Parameter.empty}, **kwargs}
        return ModelConfig(name, _with_data(name, complete, kwargs, {"num_classes": num_classes, **derived}, input_shape))
    if name.startswith("tv:"):
        if len(input_shape) != 3 or input_shape[0] != 3:
            raise UserError(f"torchvision models take RGB images (3, H, W); the data has samples of shape {input_shape}")
        derived = {"num_classes": num_classes}
        if name.startswith(TV_SIZED_PREFIXES):  # position embeddings sized for the data's images
            _check_square(name, input_shape)
            derived["image_size"] = input_shape[1]
        return ModelConfig(name, _with_data(name, kwargs, kwargs, derived, input_shape))
    if ":" in name:
        derived = {"num_classes": num_classes}
        if len(input_shape) in (2, 3):
            derived["in_channels"] = input_shape[0]
        if allow_import:
            accepted = _parameters(_import_factory(name))
            derived = {k: v for k, v in derived.items() if k in accepted or "**" in accepted}
        else:
            derived = {}
        return ModelConfig(name, _with_data(name, kwargs, kwargs, derived, input_shape))
    raise UserError(_unknown_model(name))


def init_weights(model: nn.Module) -> None:
    if any(p.is_meta for p in model.parameters()):
        return  # `sized_model`: meta tensors hold no values, and initialising them imports torch._dynamo (~3 s)
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- helpers

def _unknown_model(name: str) -> str:
    return (f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}, "
            "tv:NAME (a torchvision classifier) or module.path:factory (your own model)")


def _parameters(func: Callable) -> dict[str, Any]:
    """Keyword parameters and their defaults; a `**kwargs` parameter shows up as '**'."""
    params = {}
    for p in inspect.signature(func).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            params["**"] = inspect.Parameter.empty
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            params[p.name] = p.default
    return params


def _reject_unknown(name: str, kwargs: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    unknown = sorted(set(kwargs) - set(params))
    if unknown and "**" not in params:
        raise UserError(f"model {name} takes no argument(s) {', '.join(unknown)}; it takes {', '.join(params)}")


def _derived_from_shape(name: str, inputs: str, shape: tuple[int, ...]) -> dict[str, int]:
    if inputs == "flat":
        return {"input_size": math.prod(shape)}
    if inputs == "sequence":
        if len(shape) not in (1, 2):
            raise UserError(f"model {name} takes sequences (N, L) or (N, C, L) but the data has samples of shape "
                            f"{shape}; use an image model (resnet20, vgg16, ...) or mlp")
        return {"in_channels": 1 if len(shape) == 1 else shape[0], "input_length": shape[-1]}
    if len(shape) != 3:
        raise UserError(f"model {name} takes images (N, C, H, W) but the data has samples of shape {shape}; "
                        "use mlp, cnn1d or resnet1d")
    return {"in_channels": shape[0], "image_size": shape[1]}  # image_size: only builders that take it (vit)


def _check_square(name: str, shape: tuple[int, ...]) -> None:
    if shape[1] != shape[2]:
        raise UserError(f"model {name} needs square images but the data has samples of shape {shape} "
                        f"(H {shape[1]} != W {shape[2]}); crop or resize them to a square")


def _with_data(name: str, complete: dict[str, Any], given: Mapping[str, Any], derived: Mapping[str, int],
               shape: tuple[int, ...]) -> dict[str, Any]:
    complete = dict(complete)
    for key, value in derived.items():
        if key in given and given[key] != value:
            if key == "num_classes" and isinstance(given[key], int) and given[key] > value:
                continue  # more outputs than labels seen is harmless (e.g. classes absent from the data)
            raise UserError(f"model argument {key}={given[key]!r} contradicts the data (samples of shape {shape}, "
                            f"labels needing {key}={value}); drop it from --model-kwargs")
        complete[key] = value
    return complete


def _call(name: str, builder: Callable[..., nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    _reject_unknown(name, kwargs, _parameters(builder))
    try:
        return builder(**kwargs)
    except (TypeError, ValueError, OverflowError, RuntimeError, MemoryError) as error:  # kwargs out of range
        raise UserError(f"cannot build model {name} with {str(kwargs)[:200]}: {str(error).splitlines()[0][:200]}") from None


def _build_torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    from torchvision import models as tv_models

    arch = name[3:]
    available = tv_models.list_models(module=tv_models)
    if arch not in available:
        raise UserError(f"unknown torchvision classifier {arch!r}; choose one of {', '.join(available)}")
    if {"weights", "weights_backbone"} & set(kwargs):
        raise UserError(f"model {name} is always built untrained (nothing is downloaded); drop 'weights' from --model-kwargs")
    try:
        return tv_models.get_model(arch, weights=None, **kwargs)
    except (TypeError, ValueError, OverflowError, RuntimeError, MemoryError) as error:
        raise UserError(f"cannot build model {name} with {kwargs}: {error}") from None


def _build_user_model(name: str, kwargs: dict[str, Any], allow_import: bool) -> nn.Module:
    if not allow_import:
        raise UserError(f"checkpoint names a user model factory {name}; pass --model {name} to allow importing it")
    factory = _import_factory(name)
    try:
        model = factory(**kwargs)
    except Exception as error:  # noqa: BLE001 - the user's code: any failure is theirs to fix
        raise UserError(f"model factory {name} failed with {kwargs}: {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_factory(name: str) -> Callable[..., Any]:
    """The callable named by `module.path:attr[.attr]`, imported as `python -m` would: the
    current directory is searched too (the console script does not put it on sys.path)."""
    if not _FACTORY.match(name):
        raise UserError(f"model {name!r} is not of the form module.path:factory")
    module_name, attr_path = name.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - ImportError, or an error inside the user's module
        raise UserError(f"cannot import {module_name} for model {name} ({type(error).__name__}: {error}); "
                        "install it or run from the directory that holds it") from error
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise UserError(f"module {module_name} has no {attr_path!r}; check the factory name in {name}")
        target = getattr(target, attr)
    if not callable(target):
        raise UserError(f"{name} is not callable; name a function or class that returns the model")
    return target
