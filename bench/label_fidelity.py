"""How far each transcoded label set's targets move from its reference's, per loss.

A code's cost in student accuracy depends on the loss, since each loss fits another target:
GIFT the refined label (by cosine), KL the teacher's softmax at T = 20, softce the softmax at
T = 1. For every variant of one reference (sets transcoded from it, as the label-budget study
builds them), on the same stored epochs and rows:

- ``gift_cosine``: mean cosine between the variant's refined labels and the reference's;
- ``kl_t20`` and ``kl_t1``: mean KL(reference ‖ variant) of the softmax of the recovered
  logits at T = 20 (KL's target) and T = 1 (softce's);
- ``tail_mass_t1`` and ``entropy_t1``: the T = 1 target's mass outside the reference's top
  ``--top`` classes, and its entropy (nats): how much a code flattens softce's target;
- ``tail_correlation``: mean Pearson correlation of the recovered logits outside the
  reference's top ``--top`` with the reference's (0 for a constant tail: it keeps no order);
- ``argmax_agreement``: the rows whose teacher argmax the code keeps.

    python -m bench.label_fidelity --store DIR --reference NAME --variants NAME,NAME \\
        [--epochs 0,100,200] [--top 10] [--out bench/results --name label_fidelity]

No student is trained: this explains the label-budget tables, it does not replace them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.relabel_bench import read_labels
from softserve.storage import read_manifest


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean KL(p ‖ q) over rows; entries where p is 0 add nothing."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return float(terms.sum(axis=-1).mean())


def _tail_correlation(reference: np.ndarray, variant: np.ndarray, kept: np.ndarray) -> float:
    """Mean per-row Pearson correlation outside the kept classes; 0 where a tail is flat."""
    tail = np.ones(reference.shape, dtype=bool)
    np.put_along_axis(tail, kept, False, axis=-1)
    width = reference.shape[-1] - kept.shape[-1]
    a, b = (x[tail].reshape(-1, width) for x in (reference, variant))
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    flat = norms <= 1e-12 * np.abs(reference).max()
    return float(np.where(flat, 0.0, (a * b).sum(-1) / np.where(flat, 1.0, norms)).mean())


def fidelity(reference: dict[str, np.ndarray], variant: dict[str, np.ndarray], top: int) -> dict:
    """The variant's targets against the reference's, on the same rows (float64)."""
    ref_soft, soft = (x["soft"].reshape(-1, x["soft"].shape[-1]) for x in (reference, variant))
    ref_logits, logits = (x["logits"].reshape(ref_soft.shape) for x in (reference, variant))
    ref_soft, soft, ref_logits, logits = (
        a.astype(np.float64) for a in (ref_soft, soft, ref_logits, logits)
    )
    cosine = (ref_soft * soft).sum(-1) / (
        np.linalg.norm(ref_soft, axis=-1) * np.linalg.norm(soft, axis=-1)
    )
    kept = np.argsort(-ref_logits, axis=-1)[:, :top]
    p1, q1 = _softmax(ref_logits, 1.0), _softmax(logits, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(q1 > 0, q1 * np.log(q1), 0.0).sum(-1)
    return {
        "rows": len(ref_soft),
        "gift_cosine": float(cosine.mean()),
        "kl_t20": _kl(_softmax(ref_logits, 20.0), _softmax(logits, 20.0)),
        "kl_t1": _kl(p1, q1),
        "tail_mass_t1": float(1.0 - np.take_along_axis(q1, kept, axis=-1).sum(-1).mean()),
        "entropy_t1": float(entropy.mean()),
        "tail_correlation": _tail_correlation(ref_logits, logits, kept),
        "argmax_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
    }


COLUMNS = (
    ("gift_cosine", "GIFT: cosine", ".4f"),
    ("kl_t20", "KL: KL at T = 20", ".4f"),
    ("kl_t1", "softce: KL at T = 1", ".3f"),
    ("tail_mass_t1", "T = 1 mass outside top {top}", ".3f"),
    ("entropy_t1", "T = 1 entropy (nats)", ".2f"),
    ("tail_correlation", "tail correlation", ".3f"),
    ("argmax_agreement", "argmax kept", ".3f"),
)


def format_table(rows: list[dict], top: int) -> str:
    head = ["set", "codec", *(title.format(top=top) for _, title, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        cells = [row["set"], f"`{row['codec']}`", *(f"{row[k]:{spec}}" for k, _, spec in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="folder holding the sets")
    parser.add_argument("--reference", required=True, help="the set the variants came from")
    parser.add_argument("--variants", required=True, help="set names, comma-separated")
    parser.add_argument("--epochs", default="0", help="stored epochs to compare [default: 0]")
    parser.add_argument("--top", type=int, default=10, help="classes kept for the tail mass")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="label_fidelity", help="output file stem")
    args = parser.parse_args(argv)
    epochs = [int(e) for e in args.epochs.split(",")]
    names = [args.reference, *(v for v in args.variants.split(",") if v and v != args.reference)]
    configs = {name: read_manifest(args.store / name).config for name in names}
    for name, config in configs.items():
        if max(epochs) >= config.epochs:
            parser.error(
                f"{name} stores {config.epochs} epochs: --epochs {args.epochs} is outside it"
            )
    reference = read_labels(args.store / args.reference, epochs)
    rows = []
    for name, config in configs.items():
        labels = reference if name == args.reference else read_labels(args.store / name, epochs)
        rows.append({"set": name, "codec": config.codec, **fidelity(reference, labels, args.top)})
        print(json.dumps(rows[-1]), flush=True)
    table = format_table(rows, args.top)
    note = (
        f"Against `{args.reference}` on stored epochs {args.epochs} ({rows[0]['rows']:,} rows);"
        f" `python -m bench.label_fidelity --store STORE --reference {args.reference}"
        f" --variants {','.join(names[1:])} --epochs {args.epochs} --top {args.top}`."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(f"{note}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
