"""``python -m softserve`` runs the CLI (as torchrun's ``-m softserve`` does)."""

from softserve.entry import main

main()
