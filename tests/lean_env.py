"""Real venvs holding only some of softserve's extras, for subprocess tests.

softserve's requirements (its installed metadata, as pip reads them) are followed from the
chosen extras to every distribution they need, and a fresh venv gets exactly those
distributions: each one's top-level files are linked from this environment's
site-packages. What ``pip install 'softserve[EXTRAS]'`` would leave out cannot be imported
there, as in a training job's or a server image's environment.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sysconfig
import venv
from pathlib import Path

from packaging.requirements import Requirement

SITE = Path(sysconfig.get_paths()["purelib"])
#: Packages a venv holds whatever was installed into it.
_ALWAYS = {"pip", "setuptools", "wheel", "softserve"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed() -> dict[str, metadata.Distribution]:
    """This environment's distributions, by normalized name."""
    return {_normal(d.metadata["Name"]): d for d in metadata.distributions(path=[str(SITE)])}


def closure(extras: frozenset[str] | set[str]) -> set[str]:
    """Distributions ``pip install 'softserve[EXTRAS]'`` would install (normalized names)."""
    installed = _installed()
    wanted: list[tuple[str, frozenset[str]]] = [("softserve", frozenset(extras))]
    seen: set[str] = set()
    while wanted:
        name, asked = wanted.pop()
        key = f"{_normal(name)}[{','.join(sorted(asked))}]"
        if key in seen:
            continue
        seen.add(key)
        for line in installed[_normal(name)].requires or ():
            req = Requirement(line)
            envs = [{"extra": e} for e in asked] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                wanted.append((req.name, frozenset(req.extras)))
    return {key.partition("[")[0] for key in seen} | _ALWAYS


def lean_venv(root: Path, extras: set[str], without: tuple[str, ...] = ()) -> Path:
    """A venv at ``root`` with softserve and ``extras``' requirements only (less the
    distributions named in ``without``); returns its python."""
    venv.create(root, with_pip=False, symlinks=True)
    site = root / SITE.relative_to(Path(sysconfig.get_paths()["data"]))
    keep = closure(extras) - {_normal(name) for name in without}
    for name, dist in _installed().items():
        if name not in keep:
            continue
        for top in {f.parts[0] for f in dist.files or () if f.parts[0] != ".."}:
            if not (site / top).exists():
                (site / top).symlink_to(SITE / top)
    return root / "bin" / "python"
