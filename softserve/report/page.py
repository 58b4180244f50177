"""The report on disk: ``report.html`` (figures inline, opens with no network),
``report.json`` (the numbers) and ``figures/*.png``. Nothing in them depends on the date
or the machine, so two runs on one label set write the same bytes."""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path

from softserve.errors import InputError, brief
from softserve.report.figures import build_figures, png_bytes
from softserve.report.numbers import ReportData

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; } .note { color: #555; font-size: 0.9em; }
"""

_SECTIONS = {
    "views": ("Views the teacher saw",
              "For sampled classes and stored epochs: the view built with mixed_views from the "
              "stored crop and flip, or DSA row (and a mixed set's stored mix with its "
              "partner's view), "
              "and the teacher's top-3 probabilities (hard label in red)."),
    "agreement": ("Agreement with the hard label",
                  "Share of views whose teacher class (argmax of the logits) is the hard label."),
    "entropy": ("Teacher entropy",
                "Entropy of softmax(logits) per view, as a histogram per class."),
    "refinement_cosine": ("How far GIFT's refinement moves each label",
                          "cos(teacher logits, refined label) per view."),
    "hardest": ("Hardest samples",
                "Lowest probability of the hard label, averaged over the stored epochs."),
    "storage": ("Storage", "Bytes per stored view for each codec at this set's size."),
    "topk_mass": ("Mass kept by the top k",
                  "Probability mass of the teacher's distribution on the stored classes. The "
                  "others are served at the mean of the rest, so this bounds the original's "
                  "mass there from above."),
}  # fmt: skip


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _tables(numbers: dict) -> dict[str, str]:
    """Tables printed under some figures, by figure stem."""
    names = numbers["label_set"]["class_names"]
    hardest = [
        [h["sample"], names[h["hard"]], f"{h['mean_hard_prob']:.4f}", names[h["teacher_class"]],
         f"{h['teacher_class_share']:.2f}"]
        for h in numbers["hardest"]
    ]  # fmt: skip
    storage = [
        [c["codec"], c["bytes_per_label"], c["bytes_per_view"], f"{c['total_bytes'] / 2**20:.2f}"]
        for c in numbers["storage"]["codecs"]
    ]
    agreement = numbers["agreement"]
    entropy = numbers["entropy"]["mean_per_class"]
    per_class = [
        [names[i], f"{agreement['per_class'][i]:.3f}", f"{entropy[i]:.3f}"]
        for i in range(len(names))
    ]
    return {
        "agreement": _table(["class", "agreement", "mean entropy"], per_class),
        "hardest": _table(
            ["sample", "hard label", "mean p(hard)", "teacher's usual class", "its share"],
            hardest,
        ),
        "storage": _table(["codec", "bytes per label", "bytes per view", "MiB in all"], storage)
        + f"<p class=note>This set ({escape(numbers['storage']['codec'])}) holds "
        f"{numbers['storage']['label_bytes']} bytes of label shards: "
        f"{numbers['storage']['bytes_per_view']:.1f} bytes per view, HDF5 and checksums "
        "included.</p>",
    }


def render_html(numbers: dict, pngs: dict[str, bytes]) -> str:
    """The self-contained page: figures as data URIs, tables of the key numbers."""
    info = numbers["label_set"]
    tables = _tables(numbers)
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>softserve report: {escape(info['name'])}</title><style>{_STYLE}</style>",
        "</head><body>",
        f"<h1>Label set <code>{escape(info['name'])}</code></h1>",
        f"<p>{info['num_samples']} samples, {info['num_classes']} classes, {info['epochs']} "
        f"stored epochs, {numbers['views']} views (<code>{escape(info['views'])}</code>); "
        f"teacher <code>{escape(info['teacher'])}"
        f"</code>, codec <code>{escape(info['codec'])}</code>, GIFT α={info['alpha']} "
        f"β={info['beta']}; digest <code>{escape(info['digest'][:16])}</code>.</p>",
    ]
    for stem, png in pngs.items():
        title, note = _SECTIONS[stem]
        data = base64.b64encode(png).decode()
        parts += [
            f"<section id={stem}><h2>{escape(title)}</h2><p class=note>{escape(note)}</p>",
            f'<img alt="{escape(title)}" src="data:image/png;base64,{data}">',
            tables.get(stem, ""),
            "</section>",
        ]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(data: ReportData, out: Path) -> Path:
    """Write the report's HTML, JSON and PNG figures into ``out``; returns the HTML path."""
    figures_dir = out / "figures"
    try:
        figures_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # --out is a file, under one, or not writable
        raise InputError(f"cannot write the report into {out} ({brief(exc)})") from None
    pngs = {stem: png_bytes(fig) for stem, fig in build_figures(data).items()}
    for stem, png in pngs.items():
        (figures_dir / f"{stem}.png").write_bytes(png)
    (out / "report.json").write_text(json.dumps(data.numbers, indent=1, allow_nan=False) + "\n")
    page = out / "report.html"
    page.write_text(render_html(data.numbers, pngs))
    return page
