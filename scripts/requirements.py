"""Print the requirements of softserve's extras, one per line, from pyproject.toml.

The images install these, then softserve itself with ``pip install --no-deps``: so the
server image can leave torch out (the server imports none) while pyproject.toml stays the
one list of dependencies. Usage: ``python scripts/requirements.py server --without torch``
(Python 3.11+, for tomllib: what the images and the dev setup run).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirement_name(requirement: str) -> str:
    """The distribution a requirement line names, normalized."""
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extras: list[str], without: set[str], pyproject: Path = PYPROJECT) -> list[str]:
    """The base requirements and those of ``extras`` (following ``softserve[...]``), less
    the distributions in ``without``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project["optional-dependencies"]
    found = list(project["dependencies"])
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; choose from {', '.join(optional)}")
        seen.add(extra)
        for line in optional[extra]:
            nested = re.fullmatch(r"softserve\[(.+)\]", line)
            if nested:
                todo += nested.group(1).split(",")
            else:
                found.append(line)
    skip = {requirement_name(name) for name in without}
    return sorted({r for r in found if requirement_name(r) not in skip}, key=requirement_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="extras of softserve (server, worker, ...)")
    parser.add_argument("--without", action="append", default=[], help="leave this one out")
    args = parser.parse_args()
    print("\n".join(requirements(args.extras, set(args.without))))


if __name__ == "__main__":
    main()
