"""Which tensor axes of a network can be permuted together without changing its function,
read off the model's graph (torch.fx), never from per-model tables.

Every Conv/Linear output starts a group of units, which follows the channel axis through
BatchNorm, elementwise activations, dropout, pooling, means over positions and flattening
(after which the next Linear's input is permuted in blocks of the flattened positions); a
residual sum makes its two operands one group. A group that reaches the network's output is
never permuted (the classes have a fixed order), nor is the input. Anything not known to keep
each channel separate (attention, LayerNorm/GroupNorm, grouped convolutions, concatenation,
indexing, an unknown layer) is refused with a UserError rather than answered wrongly.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches

from sparse_training.errors import UserError

Axis = tuple[str, int, int]  # (state_dict key, axis, block)
SUGGESTION = "compare these networks without --align"


@dataclass(frozen=True)
class PermutationGroup:
    """One permutation of `size` units and every tensor axis it acts on: (key, axis, block),
    where block > 1 permutes contiguous runs of `block` entries (a Linear after a flatten)."""

    name: str
    size: int
    axes: tuple[Axis, ...]


@dataclass(frozen=True)
class PermutationSpec:
    """Every permutation that leaves the network's function unchanged, in the graph's order."""

    groups: tuple[PermutationGroup, ...]


# ---------------------------------------------------------------- tracing

_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})
_SHAPE_METHODS = frozenset({"dim", "ndimension", "size"})


class _ShapeProxy(fx.Proxy):
    """A proxy that answers shape questions with the example's concrete values, so models that
    branch on `x.dim()` (the MNIST-1D models) trace; questions about values stay symbolic."""

    def __getattr__(self, name: str) -> Any:
        if name in _SHAPE_ATTRIBUTES:
            return getattr(self.tracer.values[self.node], name)
        return super().__getattr__(name)

    def __len__(self) -> int:
        return len(self.tracer.values[self.node])


class _ShapeTracer(fx.Tracer):
    """symbolic_trace that runs the example input alongside: every node's value is kept in
    `values` (the shapes ShapeProp would give), and the innermost module where tracing
    failed in `failed_in`, for the error message."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        super().__init__()
        self.example = example
        self.tensors = {**dict(model.named_parameters(remove_duplicate=False)),
                        **dict(model.named_buffers(remove_duplicate=False))}
        self.values: dict[fx.Node, Any] = {}
        self.failed_in: tuple[str, str] | None = None
        self._inputs = 0

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        value = self._evaluate(kind, target, args, kwargs)
        if kind == "call_method" and target in _SHAPE_METHODS:
            return value
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.values[proxy.node] = value
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        def concrete(a: Any) -> Any:
            return self.values[a.node] if isinstance(a, fx.Proxy) else a

        args, kwargs = fx.node.map_aggregate(args, concrete), fx.node.map_aggregate(kwargs, concrete)
        if kind == "placeholder":
            self._inputs += 1
            if self._inputs == 1:
                return self.example
            if not args:
                raise UserError(f"cannot align {type(self.root).__name__}: its forward takes more than one input; "
                                f"{SUGGESTION}")
            return args[0]
        if kind == "get_attr":
            return self.tensors[target]
        with _maybe_revert_all_patches():  # run the real layers, not the tracer's patched calls
            if kind == "call_module":
                return self.root.get_submodule(target)(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            return target(*args, **kwargs)


def _trace(model: nn.Module, example_input: torch.Tensor) -> _ShapeTracer:
    """Trace in eval mode without gradients, so the example leaves the running statistics and
    the model's modes as they were."""
    tracer = _ShapeTracer(model, example_input)
    modes = {module: module.training for module in model.modules()}
    attributes = set(vars(model))
    model.eval()
    try:
        with torch.no_grad():
            tracer.trace(model)
    except UserError:
        raise
    except Exception as error:
        where, kind = tracer.failed_in or ("the model", type(model).__name__)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserError(f"cannot align through {where} ({kind}): torch.fx cannot trace it ({reason}), and weight "
                        f"matching needs the graph; {SUGGESTION}") from error
    finally:
        for module, training in modes.items():
            module.train(training)
    for node in tracer.graph.nodes:  # tensor constants of forward, which the tracer stores on the model
        if node.op == "get_attr" and node not in tracer.values:
            tracer.values[node] = operator.attrgetter(node.target)(model)
    for name in set(vars(model)) - attributes:
        delattr(model, name)
    return tracer


# ---------------------------------------------------------------- groups

@dataclass(frozen=True)
class _Channels:
    """A tensor whose `axis` holds the units of `group`, each repeated over `block` entries."""

    group: int
    axis: int
    block: int


@dataclass(frozen=True)
class _Param:
    """A parameter or buffer read directly in forward (get_attr), not yet tied to a group."""

    key: str


_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
                        nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity,
                        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ELEMENTWISE_FUNCTIONS = frozenset({torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu,
                                    F.elu, F.selu, F.celu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
                                    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus, F.dropout,
                                    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout})
_ELEMENTWISE_METHODS = frozenset({"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"})
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POOL_FUNCTIONS = frozenset({F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                             F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                             F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d})
_BINARY_FUNCTIONS = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                               operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul,
                               torch.div})
_BINARY_METHODS = frozenset({"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"})
_REDUCTIONS = frozenset({torch.mean, torch.sum, "mean", "sum"})
_RESHAPES = frozenset({torch.reshape, "view", "reshape"})
_FLATTENS = frozenset({torch.flatten, "flatten"})
_REASONS = {
    nn.MultiheadAttention: "attention, which mixes channels across heads",
    nn.LayerNorm: "a normalisation across channels",
    nn.GroupNorm: "a normalisation across channels",
    torch.cat: "a concatenation of channels",
    torch.concat: "a concatenation of channels",
}
_UNKNOWN = "an operation not known to keep each channel separate"


class _Groups:
    """Union-find over candidate groups; the root of a set is its earliest group, whose layer
    names the set."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.names: list[str] = []
        self.sizes: list[int] = []
        self.axes: list[list[Axis]] = []
        self.at_output: set[int] = set()

    def new(self, name: str, size: int) -> int:
        self.parent.append(len(self.parent))
        self.names.append(name)
        self.sizes.append(size)
        self.axes.append([])
        return len(self.parent) - 1

    def find(self, group: int) -> int:
        while self.parent[group] != group:
            self.parent[group] = group = self.parent[self.parent[group]]
        return group

    def union(self, a: int, b: int, where: str) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.sizes[a] != self.sizes[b]:
            raise UserError(f"cannot align through {where}: it joins {self.sizes[a]} channels with "
                            f"{self.sizes[b]}; {SUGGESTION}")
        a, b = min(a, b), max(a, b)
        self.parent[b] = a
        self.axes[a] += self.axes[b]

    def add(self, group: int, key: str, axis: int, block: int) -> None:
        self.axes[self.find(group)].append((key, axis, block))


class _SpecBuilder:
    """Walks the traced graph once, giving every node the group of its channel axis (or None:
    the input's order, never permuted)."""

    def __init__(self, tracer: _ShapeTracer):
        self.tracer = tracer
        self.root: nn.Module = tracer.root
        self.groups = _Groups()
        self.states: dict[fx.Node, _Channels | _Param | None] = {}
        self.free_params: dict[str, str] = {}  # key -> where it is used outside a group

    def build(self) -> PermutationSpec:
        for node in self.tracer.graph.nodes:
            if node.op == "output":
                fx.node.map_arg(node.args, self._mark_output)
            elif node.op == "placeholder":
                self.states[node] = None
            elif node.op == "get_attr":
                self.states[node] = _Param(node.target) if isinstance(self.value(node), torch.Tensor) else None
            else:
                self.states[node] = self._visit_or_pin(node)
        return self._spec()

    def _visit_or_pin(self, node: fx.Node) -> _Channels | None:
        """A node alignment cannot see through is refused, unless only the network's head
        follows it (a log_softmax after the classifier): then its input groups are pinned like
        the output, and it computes the same as before."""
        try:
            return self._visit(node)
        except UserError:
            if not self._head_only(node):
                raise
            fx.node.map_arg(node.args, self._mark_output)
            fx.node.map_arg(node.kwargs, self._mark_output)
            return None

    def _head_only(self, node: fx.Node) -> bool:
        """Whether neither `node` nor anything computed from it has parameters or buffers."""
        seen, todo = set(), [node]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            if current.op == "call_module" and any(True for _ in self.root.get_submodule(current.target).state_dict()):
                return False
            if any(a.op == "get_attr" for a in current.all_input_nodes):
                return False
            todo += current.users
        return True

    def value(self, node: fx.Node) -> Any:
        return self.tracer.values[node]

    def _mark_output(self, node: fx.Node) -> fx.Node:
        state = self.states.get(node)
        if isinstance(state, _Channels):
            self.groups.at_output.add(state.group)
        return node

    # -------------------------------------------------------- nodes

    def _visit(self, node: fx.Node) -> _Channels | None:
        inputs = [self.states[a] for a in node.all_input_nodes]
        if not any(isinstance(s, _Channels) for s in inputs):
            for a in node.all_input_nodes:
                if isinstance(self.states[a], _Param):
                    self.free_params.setdefault(self.states[a].key, self._where(node))
            if node.op == "call_module":
                return self._layer(node, None)
            return None
        if node.op == "call_module":
            return self._layer(node, self._single_input(node))
        target = node.target
        if target in _ELEMENTWISE_FUNCTIONS or target in _ELEMENTWISE_METHODS:
            return self._same_shape(node, self._single_input(node))
        if target in _POOL_FUNCTIONS:
            return self._pool(node, self._single_input(node))
        if target in _BINARY_FUNCTIONS or target in _BINARY_METHODS:
            return self._binary(node)
        if target in _REDUCTIONS:
            return self._reduce(node, self._single_input(node))
        if target in _RESHAPES:
            return self._reshape(node, self._single_input(node))
        if target in _FLATTENS:
            start, end = self._argument(node, 1, "start_dim", 0), self._argument(node, 2, "end_dim", -1)
            return self._flatten(node, self._single_input(node), start, end)
        raise self._refusal(node, _REASONS.get(target, _UNKNOWN))

    def _layer(self, node: fx.Node, state: _Channels | None) -> _Channels | None:
        module = self.root.get_submodule(node.target)
        if isinstance(module, nn.Linear):
            return self._linear(node, module, state)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self._conv(node, module, state)
        if state is None:
            return None  # a layer that sees only the input's order keeps it
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return self._batchnorm(node, module, state)
        if isinstance(module, _ELEMENTWISE_MODULES):
            return self._same_shape(node, state)
        if isinstance(module, _POOL_MODULES):
            return self._pool(node, state)
        if isinstance(module, nn.Flatten):
            return self._flatten(node, state, module.start_dim, module.end_dim)
        raise self._refusal(node, _REASONS.get(type(module), _UNKNOWN))

    def _linear(self, node: fx.Node, module: nn.Linear, state: _Channels | None) -> _Channels:
        if state is not None:
            if state.axis != self.value(node.args[0]).dim() - 1:
                raise self._refusal(node, "a Linear whose input's channels are not on its last axis")
            self.groups.add(state.group, f"{node.target}.weight", 1, state.block)
        return self._output_group(node, module, self.value(node).dim() - 1)

    def _conv(self, node: fx.Node, module: nn.modules.conv._ConvNd, state: _Channels | None) -> _Channels | None:
        depthwise = module.groups == module.in_channels == module.out_channels
        if module.groups > 1 and not depthwise:
            raise self._refusal(node, f"a grouped convolution (groups={module.groups})")
        if state is not None and (state.axis != 1 or state.block != 1):
            raise self._refusal(node, "a convolution whose input's channels are not on axis 1")
        if not depthwise:
            if state is not None:
                self.groups.add(state.group, f"{node.target}.weight", 1, 1)
            return self._output_group(node, module, 1)
        if state is not None:  # one filter per channel: the filters move with their channels
            for name in ("weight", "bias"):
                if getattr(module, name) is not None:
                    self.groups.add(state.group, f"{node.target}.{name}", 0, 1)
        return state

    def _output_group(self, node: fx.Node, module: nn.Module, axis: int) -> _Channels:
        group = self.groups.new(node.target, module.weight.shape[0])
        for name in ("weight", "bias"):
            if getattr(module, name) is not None:
                self.groups.add(group, f"{node.target}.{name}", 0, 1)
        return _Channels(group, axis, 1)

    def _batchnorm(self, node: fx.Node, module: nn.Module, state: _Channels) -> _Channels:
        if state.axis != 1:
            raise self._refusal(node, "a BatchNorm whose input's channels are not on axis 1")
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, name) is not None:
                self.groups.add(state.group, f"{node.target}.{name}", 0, state.block)
        return state

    def _same_shape(self, node: fx.Node, state: _Channels) -> _Channels:
        value, before = self.value(node), self.value(node.args[0])
        if not isinstance(value, torch.Tensor) or value.shape != before.shape:
            raise self._refusal(node, _UNKNOWN)
        return state

    def _pool(self, node: fx.Node, state: _Channels) -> _Channels:
        value, before = self.value(node), self.value(node.args[0])
        if (not isinstance(value, torch.Tensor) or state.axis != 1 or state.block != 1
                or value.dim() != before.dim() or value.shape[:2] != before.shape[:2]):
            raise self._refusal(node, "a pooling that is not over positions only")
        return state

    def _reduce(self, node: fx.Node, state: _Channels) -> _Channels:
        before = self.value(node.args[0])
        dims = self._argument(node, 1, "dim", None)
        if dims is None:
            raise self._refusal(node, "a reduction over the channels")
        dims = {d % before.dim() for d in ((dims,) if isinstance(dims, int) else dims)}
        if state.axis in dims:
            raise self._refusal(node, "a reduction over the channels")
        if self._argument(node, 2, "keepdim", False):
            return state
        return _Channels(state.group, state.axis - sum(d < state.axis for d in dims), state.block)

    def _flatten(self, node: fx.Node, state: _Channels, start: int, end: int) -> _Channels:
        shape = self.value(node.args[0]).shape
        start, end = start % len(shape), end % len(shape)
        if end < state.axis:
            return _Channels(state.group, state.axis - (end - start), state.block)
        if start > state.axis:
            return state
        if start < state.axis:
            raise self._refusal(node, "a flatten that repeats the channels")
        return _Channels(state.group, state.axis, state.block * math.prod(shape[state.axis + 1:end + 1]))

    def _reshape(self, node: fx.Node, state: _Channels) -> _Channels:
        before, after, axis = tuple(self.value(node.args[0]).shape), tuple(self.value(node).shape), state.axis
        if after[:axis + 1] == before[:axis + 1]:
            return state  # only the positions after the channels are rearranged
        if len(after) == axis + 1 and after[:axis] == before[:axis]:
            return _Channels(state.group, axis, state.block * math.prod(before[axis + 1:]))
        raise self._refusal(node, "a reshape that mixes channels with other axes")

    def _binary(self, node: fx.Node) -> _Channels:
        """An elementwise sum or product: every operand carrying channels must carry the same
        permutation (a residual sum merges two groups); a parameter operand joins the group
        along the axis that broadcasts against the channels; an unpermuted tensor may only
        broadcast over them."""
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != len(node.all_input_nodes):
            raise self._refusal(node, _UNKNOWN)
        out = self.value(node)
        first_node = next(a for a in operands if isinstance(self.states[a], _Channels))
        first = self.states[first_node]
        axis = first.axis + out.dim() - self.value(first_node).dim()
        for a in operands:
            state, shape = self.states[a], self.value(a).shape
            dim = axis - (out.dim() - len(shape))
            if isinstance(state, _Channels):
                if (state.axis, state.block, shape[state.axis]) != (dim, first.block, out.shape[axis]):
                    raise self._refusal(node, "operands whose channels do not line up")
                self.groups.union(first.group, state.group, self._where(node))
            elif dim >= 0 and shape[dim] != 1 and isinstance(state, _Param) and shape[dim] == out.shape[axis]:
                self.groups.add(first.group, state.key, dim, first.block)
            elif dim >= 0 and shape[dim] != 1:
                raise self._refusal(node, "an unpermuted tensor combined with channels")
            elif isinstance(state, _Param):
                self.free_params.setdefault(state.key, self._where(node))
        return _Channels(first.group, axis, first.block)

    # -------------------------------------------------------- helpers

    def _single_input(self, node: fx.Node) -> _Channels:
        if not node.args or node.all_input_nodes != [node.args[0]]:
            raise self._refusal(node, _UNKNOWN)
        return self.states[node.args[0]]

    @staticmethod
    def _argument(node: fx.Node, index: int, name: str, default: Any) -> Any:
        return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)

    def _where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{node.target} ({type(self.root.get_submodule(node.target)).__name__})"
        scope = self.tracer.node_name_to_scope.get(node.name, ("", None))[0]
        kind = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        return f"{scope + '.' if scope else ''}{node.name} ({kind})"

    def _refusal(self, node: fx.Node, what: str) -> UserError:
        origins = [self.groups.names[self.groups.find(s.group)] for s in map(self.states.get, node.all_input_nodes)
                   if isinstance(s, _Channels)]
        on = f" on the channels of {origins[0]}" if origins and node.op != "call_module" else ""
        return UserError(f"cannot align through {self._where(node)}{on}: weight matching is not defined for {what}; "
                         f"{SUGGESTION}")

    # -------------------------------------------------------- result

    def _spec(self) -> PermutationSpec:
        """Groups that permute one tensor axis become one (a layer called twice); groups pinned
        at the output, of one unit or of no tensor are left out; every tensor a group permutes
        must be saved, not shared, and used only along its permuted channels."""
        groups = self.groups
        owners: dict[tuple[str, int], tuple[int, int]] = {}
        for group in range(len(groups.parent)):
            if groups.find(group) != group:
                continue  # its axes are in its root's list, seen already
            for key, axis, block in list(groups.axes[group]):
                owner, owner_block = owners.setdefault((key, axis), (group, block))
                if owner_block != block:
                    raise UserError(f"cannot align {key}: its axis {axis} is permuted in blocks of both {block} and "
                                    f"{owner_block}; {SUGGESTION}")
                groups.union(owner, group, key)
        dropped = {groups.find(g) for g in groups.at_output}
        state = self.root.state_dict(keep_vars=True)
        aliases = _aliased_parameters(self.root)
        result = []
        for group in range(len(groups.parent)):
            axes = tuple(dict.fromkeys(groups.axes[group]))
            if groups.find(group) != group or group in dropped or groups.sizes[group] < 2 or not axes:
                continue
            for key, _, _ in axes:
                if key not in state or key in aliases:
                    why = "it is shared with another layer" if key in aliases else "it is not saved in the state_dict"
                    raise UserError(f"cannot align through {key}: {why}; {SUGGESTION}")
                if key in self.free_params:
                    raise UserError(f"cannot align through {self.free_params[key]}: it uses {key} outside the "
                                    f"channels it permutes; {SUGGESTION}")
            result.append(PermutationGroup(groups.names[group], groups.sizes[group], axes))
        return PermutationSpec(tuple(result))


def _aliased_parameters(model: nn.Module) -> set[str]:
    """Names of tensors reachable under more than one name (tied weights): permuting one name
    would leave the other out of step."""
    names: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), []).append(name)
    return {name for group in names.values() if len(group) > 1 for name in group}


def permutation_spec(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """The permutation groups of `model`, read off its graph traced on `example_input` (one
    batch of the shape the model is used with). Raises UserError, one line naming the layer,
    for anything alignment is not defined for."""
    for name, module in model.named_modules():
        # Refused before tracing, so that a transformer hears about its attention, not about
        # whichever token reshaping comes first in its graph.
        if isinstance(module, nn.MultiheadAttention):
            raise UserError(f"cannot align through {name} (MultiheadAttention): weight matching of attention "
                            f"(units within and across heads) is not implemented; {SUGGESTION}")
    return _SpecBuilder(_trace(model, example_input)).build()


