"""The ``softserve`` entry point: the CLI, or one line naming the extra to install.

softserve installs by role (README, "Install"): the base package is the client, and each
command needs its extra. A command whose packages are missing says which extra brings them
instead of ending in a traceback. Nothing here imports more than the standard library, so
it works in every install.
"""

from __future__ import annotations

import sys

#: The extra that brings each command's packages (inspect and verify need only h5py, which
#: the server's extra has, as the worker's does).
COMMAND_EXTRAS = {
    "serve": "server",
    "inspect": "server",
    "verify": "server",
    "relabel": "worker",
    "transcode": "worker",
    "train": "worker",
    "report": "report",
    "demo": "all",
    "pull": "server",
    "import": "worker",
    "cache": "server",
}


def missing_message(module: str, argv: list[str]) -> str:
    """What to tell a user of ``softserve ARGV`` whose install lacks ``module``."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in COMMAND_EXTRAS:
        extra = COMMAND_EXTRAS[command]
        return (
            f"error: 'softserve {command}' needs {module}, which this install lacks: "
            f"pip install 'softserve[{extra}]'"
        )
    return (
        f"error: the softserve command needs {module}, which this install lacks (the base "
        "install is the client library): pip install 'softserve[server]' to serve, "
        "'softserve[worker]' to relabel and train"
    )


def main() -> None:
    """Run the CLI; a package missing for it or for a command is one line and exit 1."""
    try:
        from softserve.cli import main as cli_main

        cli_main()
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        if not top or top == "softserve":
            raise
        print(missing_message(top, sys.argv[1:]), file=sys.stderr)
        sys.exit(1)
