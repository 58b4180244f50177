"""Python as if only some of softserve's extras were installed, for subprocess tests.

The installed requirements of softserve (its metadata, as pip reads it) are followed from
the chosen extras to every distribution they need; a module of any other installed
distribution fails to import, as it would in a venv that holds only those. Used as
``python -c`` code: :func:`lean_python` gives the command.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import sys

from packaging.requirements import Requirement

#: Packages a venv holds whatever was installed into it.
_ALWAYS = {"pip", "setuptools", "wheel", "softserve"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(extras: frozenset[str] | set[str]) -> set[str]:
    """Distributions ``pip install 'softserve[EXTRAS]'`` would install (normalized names)."""
    wanted: list[tuple[str, frozenset[str]]] = [("softserve", frozenset(extras))]
    seen: set[str] = set()
    while wanted:
        name, asked = wanted.pop()
        key = f"{_normal(name)}[{','.join(sorted(asked))}]"
        if key in seen:
            continue
        seen.add(key)
        for line in metadata.requires(name) or ():
            req = Requirement(line)
            envs = [{"extra": e} for e in asked] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                wanted.append((req.name, frozenset(req.extras)))
    return {key.partition("[")[0] for key in seen} | _ALWAYS


def blocked_modules(extras: frozenset[str] | set[str]) -> list[str]:
    """Top-level modules of the installed distributions outside the extras' closure."""
    keep = closure(extras)
    return sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if module not in sys.stdlib_module_names and not {_normal(d) for d in dists} & keep
    )


_PRELUDE = """
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    blocked = set({blocked})
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""


def lean_python(
    code: str, extras: set[str] | frozenset[str] = frozenset(), also_block: tuple[str, ...] = ()
) -> list[str]:
    """A command running ``code`` with only softserve's base and ``extras`` importable (and
    not even the modules ``also_block`` names); arguments after it are ``sys.argv[1:]``."""
    blocked = [*blocked_modules(extras), *also_block]
    return [sys.executable, "-c", _PRELUDE.format(blocked=json.dumps(blocked)) + code]


#: Code that runs the ``softserve`` command, as its entry point does.
CLI = "from softserve.entry import main; main()"
