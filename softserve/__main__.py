"""``python -m softserve`` runs the CLI (as torchrun's ``-m softserve`` does)."""

from softserve.cli import main

main()
