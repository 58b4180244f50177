"""Teachers by spec: ``torchvision:ARCH``, ``module.path:callable`` or a torch.export ``.pt2``."""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import inspect
import json
import math
import operator
import pickle
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from torch import nn

from softserve.errors import InputError, brief
from softserve.storage.layout import sha256_file
from softserve.worker.sources import TeacherInputs

#: Seed of a teacher's initial weights, for those no weights file replaces.
TEACHER_INIT_SEED = 0


@dataclass
class Teacher:
    """A loaded teacher model, with what the manifest records about it."""

    model: nn.Module
    spec: str
    weights: str | None
    weights_sha256: str | None


def load_teacher(
    spec: str, weights: Path | None = None, num_classes: int | None = None,
    allow_pickle: bool = False, random_teacher: bool = False,
) -> Teacher:  # fmt: skip
    """Build the teacher named by ``spec`` and load ``weights`` into it (on the CPU).

    A torchvision architecture without ``weights`` is refused unless ``random_teacher``:
    softserve never downloads weights, so it would label with random ones, which is never
    what a user means outside tests and benchmarks.

    A ``.pt2`` file is data unless ``allow_pickle``: torch.export.load unpickles some
    payloads with ``weights_only=False``, evaluates shape expressions and generates Python
    from the graph, each of which can run code from the file; here the file is refused
    before any of that unless it is only tensors and torch's operators (_load_exported).
    """
    digest: str | None = None
    if spec.endswith(".pt2"):
        model = _load_exported(Path(spec), allow_pickle)
        if weights is None:
            digest = sha256_file(Path(spec))
    elif spec.startswith("torchvision:"):
        with _seeded_init():
            model = _load_torchvision(spec.removeprefix("torchvision:"), num_classes)
        if weights is None and not random_teacher:
            raise InputError(
                f"{spec} without --weights would label with random weights (softserve never "
                "downloads weights); pass --weights FILE, or --random-teacher if a random "
                "teacher is really what you want (tests, benchmarks)"
            )
    elif ":" in spec:
        with _seeded_init():
            model = _load_factory(spec, num_classes)
    else:
        raise InputError(
            f"teacher spec {spec!r} not understood; use torchvision:ARCH, "
            "module.path:callable, or a .pt2 file from torch.export"
        )
    if weights is not None:
        _load_weights(model, spec, weights)
        digest = sha256_file(weights)
    with contextlib.suppress(NotImplementedError, RuntimeError):  # exported modules refuse eval()
        model.eval()
    return Teacher(
        model=model,
        spec=spec,
        weights=str(weights) if weights is not None else None,
        weights_sha256=digest,
    )


@contextlib.contextmanager
def _seeded_init() -> Iterator[None]:
    """Build a model from a fixed seed, leaving the caller's RNG as it was: weights a file
    does not replace (a random teacher) are then the same on every rank and every resume."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TEACHER_INIT_SEED)
        yield


def load_teacher_of(inputs: TeacherInputs) -> Teacher:
    """The teacher of a relabel or an online training run. --num-classes reaches it only
    when given, so a factory without a num_classes argument works for both."""
    return load_teacher(
        inputs.teacher, inputs.weights, inputs.num_classes, inputs.allow_pickle,
        inputs.random_teacher,
    )  # fmt: skip


def check_teacher_output(
    spec: str, run: Callable[[], torch.Tensor], shape: tuple[int, ...], num_classes: int
) -> None:
    """Run the teacher once on a batch of ``shape`` (``run``) and refuse a failure, or an
    output that is not one logit per class: one line before any work, not a traceback later."""
    try:
        out = run()
    except InputError:
        raise
    except Exception as exc:  # any failure of user code on our input
        raise InputError(
            f"teacher {spec!r} failed on a batch of shape {shape} ({brief(exc)}); "
            "check --teacher, --size and the image channels"
        ) from None
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise InputError(
            f"teacher {spec!r} outputs shape {tuple(out.shape)} but the images have "
            f"{num_classes} classes; use a teacher (or --num-classes) with one logit per class"
        )
    if out.shape[0] != shape[0]:
        raise InputError(
            f"teacher {spec!r} outputs {out.shape[0]} rows for a batch of {shape[0]} images; "
            "it must give one row of logits per image (does it reduce over the batch?)"
        )


def _load_exported(path: Path, allow_pickle: bool) -> nn.Module:
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


def _load_torchvision(arch: str, num_classes: int | None) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise InputError(
            f"torchvision has no classification model {arch!r}; "
            f"e.g. {', '.join(sorted(available)[:8])}, ..."
        )
    if num_classes is None:
        raise InputError(f"torchvision:{arch} needs --num-classes")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def _load_factory(spec: str, num_classes: int | None) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or module_name.startswith(".") or not attr:
        raise InputError(
            f"teacher spec {spec!r} needs an absolute module.path:callable, e.g. mypkg.nets:make"
        )
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:  # for the import only: later imports must not pick up the user's files
        sys.path.insert(0, cwd)
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(
            f"cannot import {module_name!r} for teacher {spec!r} ({brief(exc)}); "
            "run from its folder or add it to PYTHONPATH"
        ) from None
    except Exception as exc:  # the module's own code failed while importing
        raise InputError(
            f"importing {module_name!r} for teacher {spec!r} failed ({brief(exc)})"
        ) from None
    finally:
        if added:
            sys.path.remove(cwd)
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InputError(f"{module_name!r} has no attribute {attr!r} (teacher {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"teacher {spec!r} is not callable")
    kwargs = {}
    if num_classes is not None:
        if "num_classes" not in inspect.signature(target).parameters:
            raise InputError(f"teacher factory {spec!r} takes no num_classes argument")
        kwargs["num_classes"] = num_classes
    try:
        model = target(**kwargs)
    except Exception as exc:  # the user's factory can raise anything
        raise InputError(f"teacher factory {spec!r} failed ({brief(exc)})") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"teacher factory {spec!r} returned {type(model).__name__}, not nn.Module")
    return model


def _load_weights(model: nn.Module, spec: str, path: Path) -> None:
    if not path.is_file():
        raise InputError(f"--weights {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise InputError(f"cannot load weights {path} ({brief(exc)})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise InputError(f"{path} holds {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(
            f"weights {path} do not fit teacher {spec!r} ({brief(exc, 300)}); "
            "check --teacher and --num-classes"
        ) from None
