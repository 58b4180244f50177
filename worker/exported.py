"""torch.export ``.pt2`` teachers, loaded as data unless the user trusts the file.

torch.export.load unpickles some payloads with ``weights_only=False``, evaluates shape
expressions with sympy, generates and runs Python from the graph and its guards: each can
run code from the file. Without ``allow_pickle`` the archive is checked before torch opens
it (only the graph, raw tensors, sample inputs and text extras), and during the load every
unpickle is weights-only, every shape expression plain arithmetic and every graph node a
call of torch's operators with plain names; the guards code is never compiled.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import math
import operator
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import torch
from torch import nn

from softserve.errors import InputError, brief


def load_exported(path: Path, allow_pickle: bool) -> nn.Module:
    """A ``.pt2`` teacher as a module. Unless ``allow_pickle``, the archive holds nothing
    torch would unpickle or run (checked before torch opens it), and during the load every
    unpickle is weights-only, every shape expression plain arithmetic and every graph node a
    call of torch's operators (``_data_only``)."""
    if not path.is_file():
        raise InputError(f"teacher file {path} does not exist")
    if allow_pickle:
        try:
            return torch.export.load(str(path)).module()
        except Exception as exc:  # torch raises many types for an unusable archive
            raise InputError(f"cannot load exported teacher {path} ({brief(exc)})") from None
    _check_archive(path)
    refused: list[str] = []
    error: Exception | None = None
    try:
        with _data_only(refused):  # no guards function: its code is text from the file
            module = torch.export.load(str(path)).module(check_guards=False)
    except Exception as exc:  # torch raises many types for an unusable archive
        error = exc
    if refused:  # even where torch caught the refusal and went on
        raise _runs_code(path, refused[0])
    if error is not None:
        raise InputError(f"cannot load exported teacher {path} ({brief(error)})") from None
    return module


def _runs_code(path: Path, what: str) -> InputError:
    return InputError(
        f"exported teacher {path} holds {what}, which can run code from the file; "
        "pass --allow-pickle only if you trust the file"
    )


#: The records of a .pt2 archive that torch.export.load reads as data: the archive's
#: markers, the graph (JSON), raw tensors and their configs, sample inputs (a torch.save
#: file, loaded weights-only) and extra files (text). Anything else, such as AOTInductor's
#: compiled libraries or a payload format torch adds later, is refused unread.
_DATA_RECORD = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[^/]+\.json|data/(weights|constants)/[^/]+|data/sample_inputs/[^/]+\.pt|extra/.+"
)
_PAYLOAD_CONFIG = re.compile(r"data/(weights|constants)/[^/]+_config\.json")
#: Payload names torch reads as raw tensors; it unpickles custom_obj_* and opaque_obj_*
#: constants whatever their use_pickle says.
_RAW_TENSOR = re.compile(r"(weight|tensor)_\d+")


def _check_archive(path: Path) -> None:
    """Refuse a .pt2 whose records or payloads torch would unpickle or run, before torch
    loads it; read with torch's own zip reader, so both see the same records."""
    try:
        archive = torch._C.PyTorchFileReader(str(path))
        records = archive.get_all_records()
        pickled = [
            f"{'weight' if '/weights/' in name else 'constant'} {fqn!r:.60}"
            for name in records
            if _PAYLOAD_CONFIG.fullmatch(name)
            for fqn, meta in json.loads(archive.get_record(name))["config"].items()
            if meta["use_pickle"] is not False
            or meta["tensor_meta"] is None
            or not _RAW_TENSOR.fullmatch(meta["path_name"])
        ]
    except Exception as exc:  # not a zip archive, or configs of another shape
        raise InputError(f"cannot load exported teacher {path} ({brief(exc)})") from None
    other = [name for name in records if not _DATA_RECORD.fullmatch(name)]
    if other:
        raise _runs_code(path, f"{other[0]!r:.80} (not a graph, tensor or sample input)")
    if pickled:
        raise _runs_code(path, f"pickled objects ({', '.join(pickled[:3])})")


@contextlib.contextmanager
def _data_only(refused: list[str]) -> Iterator[None]:
    """For a load: every torch.load is weights-only, pickle's and TorchScript's unpicklers
    are refused (pickle.Unpickler: any global), every string sympy parses only builds
    sympy expressions, and every graph node built calls one of torch's operators and names
    things with plain names; each refusal is noted in ``refused`` (torch catches some
    errors and goes on). Process-wide while it lasts, as torch looks these up when it
    calls them."""

    def refuse(what: str) -> NoReturn:
        refused.append(what)
        raise _Refused(what)

    def weights_only(load: Callable[..., object]) -> Callable[..., object]:
        def restricted(*args: object, **kwargs: object) -> object:
            kwargs["weights_only"] = True
            try:
                return load(*args, **kwargs)
            except pickle.UnpicklingError as exc:
                refuse(f"pickled objects ({brief(exc, 120)})")

        return restricted

    def refusing(what: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
        return lambda _: lambda *args, **kwargs: refuse(what)

    def no_globals(unpickler: type[pickle.Unpickler]) -> type[pickle.Unpickler]:
        class Unpickler(unpickler):  # what a torch.load that is not weights-only subclasses
            def find_class(self, module: str, name: str) -> NoReturn:
                refuse(f"pickled objects ({module}.{name})"[:120])

        return Unpickler

    def plain(parse: Callable[..., object]) -> Callable[..., object]:
        def parse_plain(text: str, *args: object, **kwargs: object) -> object:
            if not _plain_expression(text):
                refuse(f"the shape expression {text!r:.80}")
            return parse(text, *args, **kwargs)

        return parse_plain

    def operators_only(create: Callable[..., torch.fx.Node]) -> Callable[..., torch.fx.Node]:
        def create_checked(
            graph: torch.fx.Graph, op: str, target: object, args: object = None,
            kwargs: dict[str, object] | None = None, *rest: object, **more: object,
        ) -> torch.fx.Node:  # fmt: skip
            what = _unsafe_node(op, target, args, kwargs or {})
            if what is not None:
                refuse(what)
            return create(graph, op, target, args, kwargs, *rest, **more)

        return create_checked

    import sympy.parsing.sympy_parser

    patches = [
        (torch, "load", weights_only),
        (torch.serialization, "load", weights_only),
        (pickle, "load", refusing("pickled objects")),
        (pickle, "loads", refusing("pickled objects")),
        (pickle, "Unpickler", no_globals),
        (torch._C, "_pickle_load_obj", refusing("a TorchScript object")),
        (sympy.parsing.sympy_parser, "parse_expr", plain),
        (torch.fx.Graph, "create_node", operators_only),
    ]
    with contextlib.ExitStack() as stack:
        for owner, name, wrap in patches:
            original = getattr(owner, name)
            setattr(owner, name, wrap(original))
            stack.callback(setattr, owner, name, original)
        yield


class _Refused(Exception):
    """What _data_only raises in torch's load; not a RuntimeError, which torch.export.load
    catches to retry the archive in an older format."""


_SYMBOL = re.compile(r"[a-z]+\d+")
_PLAIN_SYNTAX = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call, ast.keyword,
    ast.Tuple, ast.Load, ast.operator, ast.unaryop, ast.cmpop, ast.boolop,
)  # fmt: skip


def _plain_expression(text: object) -> bool:
    """Whether ``text`` only builds sympy expressions: calls of sympy's and torch's
    expression classes (torch writes sympy's srepr, ``Symbol('s0', integer=True)``) on
    numbers, strings and symbols, with no attribute, subscript or other name. sympy
    evaluates the strings it parses as Python."""
    if not isinstance(text, str):
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    names = _expression_names()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if node.id not in names and not _SYMBOL.fullmatch(node.id):
                return False
        elif isinstance(node, ast.Constant):
            if type(node.value) not in (int, float, bool, str):
                return False
        elif not isinstance(node, _PLAIN_SYNTAX):
            return False
    return True


@functools.cache
def _expression_names() -> frozenset[str]:
    """sympy's expression classes and constants (Add, Symbol, oo, true) and torch's size
    functions (FloorDiv, ModularIndexing): pure math, strings they get are parsed again."""
    import sympy
    from torch.utils._sympy import functions

    return frozenset(
        name
        for name, value in vars(sympy).items()
        if isinstance(value, sympy.Basic)
        or (isinstance(value, type) and issubclass(value, sympy.Basic))
    ).union(functions.__all__)


#: Graph node names and attribute paths FX may write into the code it generates.
_GRAPH_NAME = re.compile(r"\w+(\.\w+)*", re.ASCII)
#: Higher-order operators that only run subgraphs (themselves checked node by node).
_SUBGRAPH_OPERATORS = frozenset(
    {"cond", "map_impl", "while_loop", "wrap_with_autocast", "wrap_with_set_grad_enabled"}
)
#: The Python functions an exported graph calls: arithmetic on sizes.
_SIZE_FUNCTIONS = frozenset({
    operator.getitem, operator.add, operator.sub, operator.mul, operator.truediv,
    operator.floordiv, operator.mod, operator.pow, operator.neg, operator.pos, operator.abs,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.and_, operator.or_, operator.not_, operator.lshift, operator.rshift, math.ceil,
    math.floor, math.trunc, round, torch.sym_float, torch.sym_int, torch.sym_ite,
    torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_sqrt, torch.sym_sum,
})  # fmt: skip
#: Argument names of operators that read or write files (aten::from_file, aten::save).
_FILE_ARGUMENT = re.compile("file|path")


def _unsafe_node(op: str, target: object, args: object, kwargs: dict[str, object]) -> str | None:
    """What in a graph node would run code other than torch's operators, if anything: a
    call of another function (or an operator that touches files), or a name that is no
    name, which FX would write into the code it generates."""
    if op in ("placeholder", "get_attr", "output"):
        if not (isinstance(target, str) and _GRAPH_NAME.fullmatch(target)):
            return f"a graph {op} named {target!r:.80}"
    elif op != "call_function":
        return f"a {op} node"
    elif not _is_operator(target):
        return f"a call of {_qualified(target)}"
    for key in kwargs:
        if not (isinstance(key, str) and _GRAPH_NAME.fullmatch(key)):
            return f"an argument named {key!r:.80}"
    stack = [args, *kwargs.values()]
    while stack:
        value = stack.pop()
        if isinstance(value, (tuple, list)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend([*value.keys(), *value.values()])
        elif callable(value) and not _is_operator(value):  # an operator a node calls
            return f"a call of {_qualified(value)}"
    return None


def _is_operator(fn: object) -> bool:
    if isinstance(fn, torch._ops.OpOverload):
        return fn.namespace in ("aten", "prims") and not any(
            _FILE_ARGUMENT.search(argument.name) for argument in fn._schema.arguments
        )
    if isinstance(fn, torch._ops.HigherOrderOperator):
        return fn.name() in _SUBGRAPH_OPERATORS
    try:
        return fn in _SIZE_FUNCTIONS
    except TypeError:  # unhashable
        return False


def _qualified(fn: object) -> str:
    if isinstance(fn, torch._ops.OpOverload | torch._ops.HigherOrderOperator):
        return str(fn)
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}.{name}" if module and name else repr(fn)[:80]
