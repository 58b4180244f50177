"""Tables, claims and plots of the loss study, from its JSON-lines results file alone.

    python -m bench.studies.loss_report [--results bench/results/loss_study.jsonl]
                                        [--readme README.md] [--views dsa]

Writes ``loss_study.md`` and PNG plots into the output folder, and, with ``--readme``,
replaces the README's section between ``<!-- loss-study:begin -->`` and
``<!-- loss-study:end -->``. The same results give the same bytes.

``--views dsa`` reports the IPC-10 cell under DSA views instead (``loss_study_dsa.jsonl``)
beside the crop study's numbers for the same cells, and the paper's three questions for each
protocol (``loss_study_dsa.md``, README markers ``<!-- loss-study-dsa:begin -->`` ... end).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench.studies.study import RESULTS, Cell, cells_by, load, pyplot, save_figure, write_pages
from softserve.format.codecs import default_codec, get_codec
from softserve.storage.manifest import FORMAT_VERSION
from softserve.storage.shards import bytes_per_row

#: What relabel stores for the study's Fashion-MNIST (K = 10) by default.
DEFAULT_CODEC = default_codec(10)
PAPER_ORDER = ("gift", "cosine", "kl", "softce", "softce_ce", "mse", "mse_ce", "ce")
OPTIMIZER_ORDER = ("adamw", "adam", "sgd")
BEGIN, END = "<!-- loss-study:begin -->", "<!-- loss-study:end -->"
DSA_BEGIN, DSA_END = "<!-- loss-study-dsa:begin -->", "<!-- loss-study-dsa:end -->"
#: KL "collapses" under SGD when its top-1 falls at least this far below its AdamW top-1
#: (absolute top-1; the paper does not define the word, so the threshold is stated).
COLLAPSE_DROP = 0.2
#: Fashion-MNIST's class count: a set at IPC i holds 10·i images.
CLASSES = 10
#: The losses whose accuracy by IPC the summary states.
CORE = ("gift", "kl", "ce")
#: What each ``softserve train --model`` student is, for the report's first line.
STUDENTS = {
    "convnet": "ConvNet-3, instance norm",
    "convnet_bn": "ConvNet-3, batch norm",
    "resnet18": "ResNet-18 for small inputs",
}


def _ordered(values: set[str], order: tuple[str, ...]) -> list[str]:
    return [v for v in order if v in values] + sorted(values - set(order))


def cells(records: list[dict]) -> dict[tuple, Cell]:
    """Top-1 by (ipc, feed, loss, optimizer)."""
    return cells_by(records, lambda job: (job["ipc"], job["feed"], job["loss"], job["optimizer"]))


def grid_table(table: dict[tuple, Cell], ipc: int) -> str:
    """Losses × optimizers at one IPC (served), mean ± std (seeds), and the spread."""
    keys = [k for k in table if k[0] == ipc and k[1] == "served"]
    losses = _ordered({k[2] for k in keys}, PAPER_ORDER)
    optimizers = _ordered({k[3] for k in keys}, OPTIMIZER_ORDER)
    lines = [
        "| loss | " + " | ".join(optimizers) + " | spread (max − min) |",
        "| --- |" + " --- |" * (len(optimizers) + 1),
    ]
    for loss in losses:
        row = [table.get((ipc, "served", loss, opt)) for opt in optimizers]
        means = [c.mean for c in row if c is not None]
        spread = f"{max(means) - min(means):.3f}" if len(means) == len(optimizers) > 1 else "–"
        texts = [c.text() if c else "–" for c in row]
        lines.append(f"| `{loss}` | " + " | ".join(texts) + f" | {spread} |")
    return "\n".join(lines)


def online_table(table: dict[tuple, Cell], ipc: int) -> str:
    """Served vs online teacher, and their difference paired by seed."""
    pairs = sorted(
        {(k[2], k[3]) for k in table if k[0] == ipc and k[1] == "online"},
        key=lambda p: (PAPER_ORDER.index(p[0]) if p[0] in PAPER_ORDER else 99, p[1]),
    )
    lines = [
        "| loss | optimizer | served (precomputed) | online teacher | served − online (paired) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for loss, opt in pairs:
        online = table[(ipc, "online", loss, opt)]
        served = table.get((ipc, "served", loss, opt))
        diff = "–"
        if served is not None:
            common = sorted(set(served.seeds) & set(online.seeds))
            s = dict(zip(served.seeds, served.values, strict=True))
            o = dict(zip(online.seeds, online.values, strict=True))
            deltas = [s[k] - o[k] for k in common]
            if deltas:
                spread = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
                diff = f"{statistics.fmean(deltas):+.3f} ± {spread:.3f} ({len(deltas)})"
        served_text = served.text() if served else "–"
        lines.append(f"| `{loss}` | {opt} | {served_text} | {online.text()} | {diff} |")
    return "\n".join(lines)


def by_ipc_table(table: dict[tuple, Cell], optimizer: str) -> str:
    """One optimizer's top-1 by IPC for every loss measured at more than one IPC."""
    ipcs = sorted({k[0] for k in table if k[1] == "served"})
    losses = _ordered(
        {k[2] for k in table if k[1] == "served" and k[3] == optimizer
         and sum((i, "served", k[2], optimizer) in table for i in ipcs) > 1},
        PAPER_ORDER,
    )  # fmt: skip
    lines = [
        "| loss | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
        "| --- |" + " --- |" * len(ipcs),
    ]
    for loss in losses:
        row = [table.get((i, "served", loss, optimizer)) for i in ipcs]
        lines.append(f"| `{loss}` | " + " | ".join(c.text() if c else "–" for c in row) + " |")
    return "\n".join(lines)


def claims(table: dict[tuple, Cell], ipc: int) -> list[str]:
    """The paper's three claims, checked against this study's numbers, as found."""
    served = {(k[2], k[3]): c for k, c in table.items() if k[0] == ipc and k[1] == "served"}
    losses = {k[0] for k in served}
    optimizers = _ordered({k[1] for k in served}, OPTIMIZER_ORDER)
    found = []
    if "gift" in losses:
        verdicts = []
        for opt in optimizers:
            row = {loss: c.mean for (loss, o), c in served.items() if o == opt}
            best = max(sorted(row), key=lambda name: row[name])
            gift = row.get("gift")
            if gift is None or len(row) < 2:
                continue
            rank = 1 + sum(v > gift for v in row.values())
            verdicts.append(
                f"{opt}: {'yes' if best == 'gift' else 'no'}, GIFT {gift:.3f} ranks {rank} of "
                f"{len(row)}" + ("" if best == "gift" else f" (best: `{best}` {row[best]:.3f})")
            )
        if verdicts:
            found.append("**GIFT best?** " + "; ".join(verdicts) + ".")
    complete = sorted(loss for loss in losses if all((loss, opt) in served for opt in optimizers))
    if "gift" in complete and len(optimizers) > 1:
        spread = {
            loss: max(served[(loss, o)].mean for o in optimizers)
            - min(served[(loss, o)].mean for o in optimizers)
            for loss in complete
        }
        smallest = min(sorted(spread), key=lambda name: spread[name])
        verdict = "yes" if smallest == "gift" else f"no, `{smallest}` has {spread[smallest]:.3f}"
        found.append(
            f"**Smallest cross-optimizer spread?** {verdict}: GIFT's is {spread['gift']:.3f} "
            f"over {', '.join(optimizers)} (largest: "
            f"`{max(sorted(spread), key=lambda n: spread[n])}` {max(spread.values()):.3f})."
        )
    if ("kl", "sgd") in served and ("kl", "adamw") in served:
        sgd, adamw = served[("kl", "sgd")].mean, served[("kl", "adamw")].mean
        collapsed = adamw - sgd >= COLLAPSE_DROP
        found.append(
            f"**KL collapses under SGD?** {'yes' if collapsed else 'no'}: KL reaches {sgd:.3f} "
            f"with SGD against {adamw:.3f} with AdamW, {sgd - adamw:+.3f} (collapse: a drop "
            f"of at least {COLLAPSE_DROP:.2f})."
        )
    return found


def stored_bytes(codec: str, epochs: int) -> tuple[float, str]:
    """Bytes per view of the IPC-10 set in ``codec``: as the label-budget study measured its
    files (the same set, relabelled at E = 300), else the label data alone."""
    for record in load(RESULTS / "label_budget.jsonl"):
        job = record["job"]
        if (job["codec"], job["stored_epochs"]) == (codec, epochs):
            return record["labels"]["bytes_per_view"], "on disk, as `label_budget.jsonl` measures"
    return float(bytes_per_row(FORMAT_VERSION, CLASSES, get_codec(codec))), "of label data"


def bytes_text(codec: str, views: int, epochs: int) -> str:
    per_view, how = stored_bytes(codec, epochs)
    return f"{per_view:g} bytes per view {how} ({codec}), {per_view * views / 1e6:.2f} MB"


def default_codec_note(views: int, codec: str, epochs: int) -> str:
    """The same set's size in today's default codec, when the study served another."""
    if codec == DEFAULT_CODEC:
        return ""
    return (
        f"; in today's default codec, which trains as fp32 does (label budget below), "
        f"{bytes_text(DEFAULT_CODEC, views, epochs)}"
    )


def expectations(records: list[dict], table: dict[tuple, Cell], ipc: int) -> list[str]:
    """What a user can expect, as found: which loss, accuracy by IPC, what precomputing costs."""
    served = {(k[2], k[3]): c for k, c in table.items() if k[0] == ipc and k[1] == "served"}
    optimizers = _ordered({o for _, o in served}, OPTIMIZER_ORDER)
    losses = _ordered({loss for loss, _ in served}, PAPER_ORDER)
    complete = [loss for loss in losses if all((loss, o) in served for o in optimizers)]
    found = []
    if complete:
        mean = {loss: statistics.fmean(served[(loss, o)].mean for o in optimizers)
                for loss in complete}  # fmt: skip
        weakest = {loss: min((served[(loss, o)] for o in optimizers), key=lambda c: c.mean)
                   for loss in complete}  # fmt: skip
        worst = {loss: cell.mean for loss, cell in weakest.items()}
        robust = max(complete, key=lambda loss: worst[loss])
        tied = [loss for loss in complete if loss != robust and worst[robust] - worst[loss]
                <= max(weakest[robust].std, weakest[loss].std)]  # fmt: skip
        ties = (f"; within a seed std of it: {', '.join(f'`{t}` {worst[t]:.3f}' for t in tied)}"
                if tied else "")  # fmt: skip
        best = {o: max(complete, key=lambda loss: served[(loss, o)].mean) for o in optimizers}
        per_optimizer = ", ".join(
            f"{o} → `{best[o]}` {served[(best[o], o)].mean:.3f}" for o in optimizers
        )
        gift = (f"; GIFT: worst {worst['gift']:.3f}, mean {mean['gift']:.3f}"
                if "gift" in complete and robust != "gift" else "")  # fmt: skip
        found.append(
            f"**Which loss.** At IPC {ipc}, when the student's optimizer may change, `{robust}`: "
            f"the best worst case over {', '.join(optimizers)} ({worst[robust]:.3f}, mean "
            f"{mean[robust]:.3f}){ties}{gift}. For one optimizer, its best: {per_optimizer}."
        )
    ipcs = sorted({k[0] for k in table if k[1] == "served"})
    if len(ipcs) > 1:
        rows = []
        for loss in CORE:
            points = [(i, table.get((i, "served", loss, "adamw"))) for i in ipcs]
            known = [f"{c.mean:.3f} at IPC {i}" for i, c in points if c is not None]
            if len(known) > 1:
                rows.append(f"`{loss}` " + ", ".join(known))
        if rows:
            found.append("**Accuracy by IPC** (AdamW): " + "; ".join(rows) + ".")
    online = sorted({(k[2], k[3]) for k in table if k[0] == ipc and k[1] == "online"})
    deltas = []
    for loss, opt in online:
        s = table.get((ipc, "served", loss, opt))
        o = table[(ipc, "online", loss, opt)]
        if s is not None:
            by_seed = dict(zip(o.seeds, o.values, strict=True))
            deltas += [v - by_seed[k] for k, v in zip(s.seeds, s.values, strict=True)
                       if k in by_seed]  # fmt: skip
    if deltas:
        runs = [r for r in records if r["job"]["ipc"] == ipc
                and (r["job"]["loss"], r["job"]["optimizer"]) in online]  # fmt: skip
        epochs = runs[0]["job"]["epochs"]
        codec = next(r["result"]["codec"] for r in runs if r["job"]["feed"] == "served")
        views = CLASSES * ipc * epochs
        found.append(
            f"**What precomputing costs.** Served labels (E = {epochs}) against the online "
            f"teacher: {statistics.fmean(deltas):+.3f} top-1 on average over {len(deltas)} "
            f"paired runs (from {min(deltas):+.3f} to {max(deltas):+.3f}; per cell below). "
            f"The teacher labels the {views:,} views once, at relabel time, instead of in "
            f"every training run (the compute each saves: `bench/online_cost.py`). "
            f"Relabelled in today's format (version {FORMAT_VERSION}), the "
            f"IPC-{ipc} set as served here stores {bytes_text(codec, views, epochs)} of "
            f"labels{default_codec_note(views, codec, epochs)}."
        )
    return found


def plot(table: dict[tuple, Cell], ipc: int, out: Path) -> list[str]:
    """PNG plots; returns their file names."""
    plt = pyplot()
    names = []
    served = {k: c for k, c in table.items() if k[1] == "served"}
    main = {(k[2], k[3]): c for k, c in served.items() if k[0] == ipc}
    if main:
        losses = _ordered({k[0] for k in main}, PAPER_ORDER)
        optimizers = _ordered({k[1] for k in main}, OPTIMIZER_ORDER)
        fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
        width = 0.8 / len(optimizers)
        for j, opt in enumerate(optimizers):
            xs = [i + (j - (len(optimizers) - 1) / 2) * width for i in range(len(losses))]
            cs = [main.get((loss, opt)) for loss in losses]
            ax.bar(
                xs, [c.mean if c else 0 for c in cs], width, yerr=[c.std if c else 0 for c in cs],
                label=opt, capsize=2,
            )  # fmt: skip
        ax.set_xticks(range(len(losses)), losses)
        ax.set_ylabel("test top-1")
        ax.set_title(f"Fashion-MNIST IPC {ipc}, ConvNet-3 student: loss × optimizer")
        ax.legend()
        names.append(save_figure(fig, out / f"loss_study_ipc{ipc}.png"))
    ipcs = sorted({k[0] for k in served})
    if len(ipcs) > 1:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for loss in _ordered({k[2] for k in served}, PAPER_ORDER):
            points = [(i, served[(i, "served", loss, "adamw")]) for i in ipcs
                      if (i, "served", loss, "adamw") in served]  # fmt: skip
            if len(points) > 1:
                ax.errorbar(
                    [p[0] for p in points], [p[1].mean for p in points],
                    yerr=[p[1].std for p in points], marker="o", capsize=2, label=loss,
                )  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(ipcs, [str(i) for i in ipcs])
        ax.set_xlabel("images per class")
        ax.set_ylabel("test top-1")
        ax.set_title("AdamW, by IPC")
        ax.legend()
        names.append(save_figure(fig, out / "loss_study_by_ipc.png"))
    online = sorted((k[2], k[3]) for k in table if k[0] == ipc and k[1] == "online")
    if online:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for j, feed in enumerate(("served", "online")):
            cs = [table.get((ipc, feed, loss, opt)) for loss, opt in online]
            ax.bar(
                [i + (j - 0.5) * 0.4 for i in range(len(online))],
                [c.mean if c else 0 for c in cs], 0.4, yerr=[c.std if c else 0 for c in cs],
                label="precomputed (served)" if feed == "served" else "online teacher", capsize=2,
            )  # fmt: skip
        ax.set_xticks(range(len(online)), [f"{loss}\n{opt}" for loss, opt in online])
        ax.set_ylabel("test top-1")
        ax.set_title(f"IPC {ipc}: precomputed labels vs the online teacher")
        ax.legend()
        names.append(save_figure(fig, out / "loss_study_online.png"))
    return names


def render(records: list[dict], main_ipc: int, plots: list[str], link: str) -> str:
    """The study's markdown: provenance, tables, claims and plot links."""
    table = cells(records)
    versions = sorted({r["code_version"] for r in records})
    epochs = sorted({r["job"]["epochs"] for r in records})
    evals = sorted({r["command"][r["command"].index("--eval") + 1] for r in records})
    tested = (
        "Fashion-MNIST's real test split (10,000 images)" if evals == ["fashion-mnist"]
        else f"the test images of {', '.join(f'`{e}`' for e in evals)}"
    )  # fmt: skip
    models = ", ".join(
        f"`{m}` ({STUDENTS.get(m, m)})" for m in sorted({r["job"]["model"] for r in records})
    )
    parts = [
        f"{len(records)} runs; code version{'s' if len(versions) > 1 else ''} "
        f"{', '.join(f'`{v}`' for v in versions)}; {'/'.join(map(str, epochs))} epochs; "
        f"student {models}, top-1 on {tested}, as mean ± sample std [population std, as the "
        f"evaluator reports] (seeds). Reproduce: "
        f"`python -m bench.studies.loss_study`; every run's exact `softserve train` command is "
        f"in `{link}loss_study.jsonl`. `python -m bench.studies.loss_report --readme README.md` "
        f"rewrites this section, its tables and plots from that file alone.",
        f"**IPC {main_ipc}, served labels, loss × optimizer**\n\n{grid_table(table, main_ipc)}",
    ]
    expect = expectations(records, table, main_ipc)
    if expect:
        parts.append("What to expect, as found:\n\n" + "\n".join(f"- {e}" for e in expect))
    found = claims(table, main_ipc)
    if found:
        parts.append("The paper's claims, as found here:\n\n" + "\n".join(f"- {c}" for c in found))
    if any(k[1] == "online" for k in table):
        parts.append(
            f"**IPC {main_ipc}: precomputed (served, E = {epochs[-1]}) vs the online teacher**"
            f"\n\n{online_table(table, main_ipc)}"
        )
    if len({k[0] for k in table}) > 1:
        parts.append(f"**AdamW by IPC**\n\n{by_ipc_table(table, 'adamw')}")
        for ipc in sorted({k[0] for k in table if k[0] != main_ipc}):
            parts.append(f"**IPC {ipc}, loss × optimizer**\n\n{grid_table(table, ipc)}")
            found = claims(table, ipc)
            if found:
                names = _ordered({k[2] for k in table if k[:2] == (ipc, "served")}, PAPER_ORDER)
                among = ", ".join(f"`{n}`" for n in names)
                parts.append(
                    f"The paper's claims at IPC {ipc}, among {among}:\n\n"
                    + "\n".join(f"- {c}" for c in found)
                )
    parts += [f"![{name}]({link}{name})" for name in plots]
    return "\n\n".join(parts) + "\n"


def write_report(results: Path, out: Path, readme: Path | None = None, main_ipc: int = 10) -> Path:
    """Write ``loss_study.md`` and the plots into ``out``; update ``readme`` if given."""
    records = load(results)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(cells(records), main_ipc, out) if records else []
    return write_pages(
        out, "loss_study", "Loss study", lambda link: render(records, main_ipc, plots, link),
        readme, (BEGIN, END),
    )  # fmt: skip


#: The cell both view protocols answer the paper's questions on: IPC 10, served labels,
#: these losses × optimizers, every one of these seeds.
COMPARED_IPC = 10
COMPARED_LOSSES = ("gift", "kl", "ce")
COMPARED_OPTIMIZERS = ("adamw", "sgd")
COMPARED_SEEDS = (0, 1, 2)
#: The soft-label losses among them, whose spread across optimizers the paper compares.
SOFT_LOSSES = ("gift", "kl")
#: The view protocols, as a record's ``views`` names them.
PROTOCOLS = {"rrc": "crops + flip", "dsa": "DSA"}


@dataclass(frozen=True)
class Answer:
    """One question's answer for one protocol: its sentence, and what it says (a value two
    protocols can be compared by; None while cells lack seeds)."""

    text: str
    verdict: object | None


def compared_grid(records: list[dict]) -> dict[tuple[str, str], Cell]:
    """The compared cell's top-1 by (loss, optimizer)."""
    return {(k[2], k[3]): c for k, c in cells(records).items()
            if k[:2] == (COMPARED_IPC, "served")}  # fmt: skip


def missing(grid: dict[tuple[str, str], Cell], losses: tuple[str, ...]) -> list[str]:
    """The seeds ``losses`` × the compared optimizers still lack, cell by cell."""
    out = []
    for loss in losses:
        for opt in COMPARED_OPTIMIZERS:
            have = set(grid[(loss, opt)].seeds) if (loss, opt) in grid else set()
            lack = [str(s) for s in COMPARED_SEEDS if s not in have]
            if lack:
                out.append(f"`{loss}`/{opt} seed{'s' * (len(lack) > 1)} {', '.join(lack)}")
    return out


def _pending(grid: dict[tuple[str, str], Cell], losses: tuple[str, ...]) -> Answer | None:
    lack = missing(grid, losses)
    return Answer("not yet: missing " + "; ".join(lack), None) if lack else None


def questions(grid: dict[tuple[str, str], Cell]) -> dict[str, Answer]:
    """The paper's three questions on one protocol's compared cell, by seed means."""
    gift = _pending(grid, COMPARED_LOSSES)
    if gift is None:
        parts, verdict = [], []
        for opt in COMPARED_OPTIMIZERS:
            row = {loss: grid[(loss, opt)].mean for loss in COMPARED_LOSSES}
            best = max(COMPARED_LOSSES, key=lambda loss: row[loss])
            verdict.append((opt, best == "gift"))
            parts.append(f"{opt}: {'yes' if best == 'gift' else 'no'}, GIFT {row['gift']:.3f}"
                         + ("" if best == "gift" else f", `{best}` {row[best]:.3f}"))  # fmt: skip
        gift = Answer("; ".join(parts), tuple(verdict))
    spread = _pending(grid, SOFT_LOSSES)
    if spread is None:
        gaps = {loss: abs(grid[(loss, "adamw")].mean - grid[(loss, "sgd")].mean)
                for loss in SOFT_LOSSES}  # fmt: skip
        smallest = min(SOFT_LOSSES, key=lambda loss: gaps[loss])
        spread = Answer(
            f"`{smallest}`" + ("" if smallest == "gift" else " (not GIFT)") + ": "
            + ", ".join(f"`{loss}` {gaps[loss]:.3f}" for loss in SOFT_LOSSES), smallest,
        )  # fmt: skip
    collapse = _pending(grid, ("kl",))
    if collapse is None:
        sgd, adamw = grid[("kl", "sgd")].mean, grid[("kl", "adamw")].mean
        collapsed = adamw - sgd >= COLLAPSE_DROP
        collapse = Answer(
            f"{'yes' if collapsed else 'no'}: {sgd:.3f} with SGD against {adamw:.3f} with "
            f"AdamW ({sgd - adamw:+.3f})", collapsed,
        )  # fmt: skip
    return {
        "**GIFT best?** (highest mean among `gift`, `kl`, `ce`, per optimizer)": gift,
        "**Smallest cross-optimizer spread** among the soft-label losses (AdamW − SGD gap)":
            spread,
        f"**KL collapses under SGD?** (a drop of at least {COLLAPSE_DROP:.2f})": collapse,
    }


def protocol_table(crop: dict[tuple[str, str], Cell], dsa: dict[tuple[str, str], Cell]) -> str:
    """The compared cell under both protocols, with each loss's spread across optimizers."""
    head = [f"{PROTOCOLS[p]} {opt}" for p in PROTOCOLS for opt in COMPARED_OPTIMIZERS]
    lines = [
        "| loss | " + " | ".join(head[:2]) + " | spread | " + " | ".join(head[2:]) + " | spread |",
        "| --- |" + " --- |" * 6,
    ]
    for loss in COMPARED_LOSSES:
        row = []
        for grid in (crop, dsa):
            found = [grid.get((loss, opt)) for opt in COMPARED_OPTIMIZERS]
            row += [c.text() if c else "–" for c in found]
            means = [c.mean for c in found if c is not None]
            row.append(f"{max(means) - min(means):.3f}" if len(means) == 2 else "–")
        lines.append(f"| `{loss}` | " + " | ".join(row) + " |")
    return "\n".join(lines)


def compare_questions(
    grids: dict[str, dict[tuple[str, str], Cell]], change: str, changer: str
) -> tuple[str, str]:
    """The paper's questions on two grids side by side, the second changing one thing (the
    ``change``; ``changer`` is its subject and verb, "DSA views change"): their table, and
    the sentence saying whether it changes a verdict, or which questions wait for seeds."""
    (first, base), (second, other) = grids.items()
    answers = questions(base), questions(other)
    lines = [f"| question | {first} | {second} | {change} changes it? |",
             "| --- | --- | --- | --- |"]  # fmt: skip
    changed, open_ = [], []
    for question, a in answers[0].items():
        b = answers[1][question]
        name = question.split("**")[1]
        if a.verdict is None or b.verdict is None:
            verdict = "not yet"
            open_.append(name)
        else:
            verdict = "no" if a.verdict == b.verdict else "**yes**"
            if verdict != "no":
                changed.append(name)
        lines.append(f"| {question} | {a.text} | {b.text} | {verdict} |")
    answered = len(answers[0]) - len(open_)
    said = (f"{changer} {len(changed) or 'none'} of the {answered} verdicts"
            + (f" ({'; '.join(changed)})" if changed else ""))
    if open_:
        sentence = (f"Not yet: {len(open_)} of the three questions wait for seeds (above: "
                    f"{'; '.join(open_)})" + (f"; of those answered, {said}" if answered else ""))
    else:
        sentence = f"{'Yes' if changed else 'No'}: {said}"
    return "\n".join(lines), sentence + "."


def render_dsa(records: list[dict], crop_records: list[dict], link: str) -> str:
    """The DSA cell's markdown: provenance, both protocols' table, the questions, the verdict."""
    crop, dsa = compared_grid(crop_records), compared_grid(records)
    versions = sorted({r["code_version"] for r in records})
    views = sorted({r.get("views", r["job"].get("views", "rrc")) for r in records})
    digests = sorted({r["labelset_digest"] for r in records if "labelset_digest" in r})
    teachers = sorted({r["teacher_sha256"] for r in records if "teacher_sha256" in r})
    planned = len(COMPARED_LOSSES) * len(COMPARED_OPTIMIZERS) * len(COMPARED_SEEDS)
    short = lambda values: ", ".join(f"`{v[:12]}`" for v in values) or "–"  # noqa: E731
    parts = [
        f"{len(records)} of {planned} runs under views {', '.join(f'`{v}`' for v in views) or '–'}"
        f"; code version{'s' * (len(versions) > 1)} {', '.join(f'`{v}`' for v in versions) or '–'}"
        f"; label set {short(digests)}, teacher sha256 {short(teachers)}. IPC {COMPARED_IPC}, "
        f"served labels, top-1 as mean ± sample std [population std] (seeds), beside the crop "
        f"study's runs of the same cells (`{link}loss_study.jsonl`). Reproduce: "
        f"`python -m bench.studies.loss_study --views dsa` (every run's command is in "
        f"`{link}loss_study_dsa.jsonl`); `python -m bench.studies.loss_report --views dsa "
        f"--readme README.md` rewrites this section from the two files alone.",
        protocol_table(crop, dsa),
    ]
    table, verdict = compare_questions({PROTOCOLS[p]: g for p, g in (("rrc", crop), ("dsa", dsa))},
                                       "protocol", "DSA views change")  # fmt: skip
    parts += [table, f"**Does the protocol change the verdict?** {verdict}"]
    return "\n\n".join(parts) + "\n"


def write_dsa_report(
    results: Path, out: Path, readme: Path | None = None,
    crop_results: Path = RESULTS / "loss_study.jsonl",
) -> Path:  # fmt: skip
    """Write ``loss_study_dsa.md`` into ``out``; update ``readme``'s DSA section if given."""
    records, crop_records = load(results), load(crop_results)
    out.mkdir(parents=True, exist_ok=True)
    return write_pages(
        out, "loss_study_dsa", "Loss study under DSA views",
        lambda link: render_dsa(records, crop_records, link), readme, (DSA_BEGIN, DSA_END),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", choices=tuple(PROTOCOLS), default="rrc",
                        help="dsa: the DSA cell beside the crop study's")  # fmt: skip
    parser.add_argument("--results", type=Path, default=None,
                        help="[default: loss_study.jsonl, or loss_study_dsa.jsonl]")  # fmt: skip
    parser.add_argument("--crop-results", type=Path, default=RESULTS / "loss_study.jsonl",
                        help="the crop study's records (with --views dsa)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=None)
    parser.add_argument("--main-ipc", type=int, default=10)
    args = parser.parse_args()
    if args.views == "dsa":
        results = args.results or RESULTS / "loss_study_dsa.jsonl"
        print(write_dsa_report(results, args.out, args.readme, args.crop_results))
    else:
        results = args.results or RESULTS / "loss_study.jsonl"
        print(write_report(results, args.out, args.readme, args.main_ipc))


if __name__ == "__main__":
    main()
