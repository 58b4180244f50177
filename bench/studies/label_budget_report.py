"""Table, Pareto plot and default-codec verdict of the label-budget study, from its results.

    python -m bench.studies.label_budget_report [--results FILE.jsonl] [--readme README.md]

Writes ``label_budget.md`` and ``label_budget.png`` into the output folder and, with
``--readme``, replaces the README's section between ``<!-- label-budget:begin -->`` and
``<!-- label-budget:end -->``. The same results give the same bytes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bench.studies import loss_report
from bench.studies.study import RESULTS, Cell, cells_by, load, pyplot, save_figure, write_pages


@dataclass(frozen=True)
class BudgetTask:
    """Where one task's study is written: its page stem, README markers and headline."""

    stem: str
    headline: str
    command: str
    classes: int
    field: str = ""  # what the literature reports for this budget, shown beside the table
    #: The SGD column (NAME@LR) on which the reference answers the paper's questions beside
    #: the K = 10 loss study; empty: not asked of this task.
    paper_sgd: str = ""

    @property
    def markers(self) -> tuple[str, str]:
        tag = self.stem.replace("_", "-")
        return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


#: The field's figures for ImageNet-1K labels, cited from the papers.
IMAGENET_FIGURES = """The field's figures at ImageNet-1K IPC 10, ResNet-18 students, as \
the papers report them (their numbers, not softserve's, on another task: compare the \
shape of the trade-off, not the top-1):

| method | labels stored | size | top-1 |
| --- | --- | --- | --- |
| SRe2L (NeurIPS 2023) | all batches, full fp16 logits | 5.67 GB | 20.1% |
| LPLD (NeurIPS 2024) | 2.5% of batches | 0.14 GB | 20.2% |
| LPQLD (TPAMI 2026) | top-100 fp16 values + int16 indices, 10% of batches | 0.13 GB | 29.6% |
| LPQLD | top-10, 0.5% of batches | 0.03 GB | 20.0% |"""

#: The label-budget study by --task of bench.studies.label_budget.
TASKS = {
    "fashion-mnist": BudgetTask(
        "label_budget", "Fashion-MNIST IPC 10", "python -m bench.studies.label_budget", 10
    ),
    "triplets": BudgetTask(
        "label_budget_k1000", "Fashion-MNIST triplets (K = 1000) IPC 1",
        "python -m bench.studies.label_budget --task triplets", 1000, IMAGENET_FIGURES,
        paper_sgd="sgd@1.0",
    ),
}  # fmt: skip
#: The losses the verdict rests on; any other soft-label loss measured is shown beside them.
LOSSES = ("gift", "kl")
FLOOR_LOSS = "ce"
OPTIMIZER_ORDER = ("adamw", "adam", "sgd")


@dataclass(frozen=True)
class Row:
    """One variant: its stored form, its size, and its cells by (loss, optimizer)."""

    codec: str
    stored_epochs: int
    label_bytes: int
    bytes_per_view: float
    cells: dict[tuple[str, str], Cell]

    @property
    def label(self) -> str:
        return f"{self.codec}, E={self.stored_epochs}"


def build_of(record: dict) -> tuple[str, str] | None:
    """Which relabel of the reference a run's labels come from: its teacher and images."""
    if "teacher_sha256" not in record:
        return None
    return record["teacher_sha256"], record["images_sha256"]


def builds(records: list[dict]) -> dict[tuple[str, str] | None, str]:
    """Each build of the reference by first appearance, tagged: "" for the first, then
    " (b)", " (c)", ...; a rebuild elsewhere has another teacher (float32 training differs
    across CPUs), so its runs form columns of their own."""
    found = dict.fromkeys(build_of(r) for r in records)
    return {build: "" if i == 0 else f" ({chr(ord('a') + i)})" for i, build in enumerate(found)}


def rows(records: list[dict], metric: str = "top1") -> list[Row]:
    """Variants in the order they first appear (the reference first), with their cells; a
    rebuild's columns carry its tag after the optimizer."""
    tags = builds(records)
    table = cells_by(
        [{**r, "job": {**r["job"], "optimizer": r["job"]["optimizer"] + tags[build_of(r)]}}
         for r in records],
        lambda j: (j["codec"], j["stored_epochs"], j["loss"], j["optimizer"]), metric,
    )  # fmt: skip
    sizes: dict[tuple[str, int], dict] = {}
    for r in records:
        sizes.setdefault((r["job"]["codec"], r["job"]["stored_epochs"]), r["labels"])
    return [
        Row(codec, epochs, size["label_bytes"], size["bytes_per_view"],
            {(k[2], k[3]): c for k, c in table.items() if k[:2] == (codec, epochs)})
        for (codec, epochs), size in sizes.items()
    ]  # fmt: skip


def columns(table: list[Row]) -> list[tuple[str, str]]:
    """(loss, optimizer) columns: GIFT, KL, then any other soft-label loss measured, under
    every optimizer measured."""
    measured = {k for row in table for k in row.cells}
    optimizers = {opt for _, opt in measured}
    ordered = [o for o in OPTIMIZER_ORDER if o in optimizers] + sorted(
        optimizers - set(OPTIMIZER_ORDER)
    )
    others = sorted({loss for loss, _ in measured} - {*LOSSES, FLOOR_LOSS})
    return [(loss, opt) for loss in (*LOSSES, *others) for opt in ordered
            if (loss, opt) in measured]  # fmt: skip


def within(row: Row, reference: Row, cols: list[tuple[str, str]]) -> bool | None:
    """No GIFT or KL mean more than one seed std below the reference's: no measured cost.

    One-sided: a variant that trains better than the reference costs nothing (under SGD,
    KL's collapse varies by seeds, and top-k codes change how far it falls). False once one
    complete column costs; None (not decidable yet) while none does but the reference lacks
    a std or the row lacks some of its seeds.
    """
    verdicts = []
    for col in cols:
        ref, cell = reference.cells.get(col), row.cells.get(col)
        if ref is None or cell is None or len(ref.values) < 2 or len(cell.values) < len(ref.values):
            verdicts.append(None)
        else:
            verdicts.append(cell.mean >= ref.mean - ref.std)
    if False in verdicts:
        return False
    return None if None in verdicts or not verdicts else True


def untrained(table: list[Row]) -> list[tuple[str, str]]:
    """GIFT and KL columns whose reference does not beat hard labels (the floor) under the
    same optimizer: there the optimizer fails, whatever the labels, so codes cannot be told
    apart (KL under SGD at K = 1000 stays near chance)."""
    cells = table[0].cells
    return [(loss, opt) for loss, opt in columns(table) if loss in LOSSES
            and (loss, opt) in cells and (FLOOR_LOSS, opt) in cells
            and cells[(loss, opt)].mean <= cells[(FLOOR_LOSS, opt)].mean]  # fmt: skip


def verdict_columns(table: list[Row]) -> list[tuple[str, str]]:
    """The columns a verdict rests on: GIFT and KL where the reference has a std (2+ seeds),
    trains better than hard labels, and is not alone among the full-epoch codecs the verdict
    judges (a rebuild's reference replicate, or one beside fewer stored epochs only)."""
    reference, skipped = table[0], untrained(table)
    judged = [row for row in table[1:] if row.stored_epochs == reference.stored_epochs]
    return [c for c in columns(table) if c[0] in LOSSES and c in reference.cells
            and len(reference.cells[c].values) > 1 and c not in skipped
            and any(c in row.cells for row in judged)]  # fmt: skip


def verdicts(table: list[Row]) -> dict[str, bool | None]:
    """Each full-epoch codec: no measured cost against the reference (None: undecided)."""
    reference = table[0]
    cols = verdict_columns(table)
    return {row.codec: within(row, reference, cols) for row in table
            if row.stored_epochs == reference.stored_epochs}  # fmt: skip


def chosen_codec(table: list[Row]) -> Row | None:
    """The smallest full-epoch codec with no measured cost; None while it or a smaller codec
    is undecided (larger ones cannot change the choice)."""
    found = verdicts(table)
    full = [row for row in table if row.stored_epochs == table[0].stored_epochs]
    for row in sorted(full, key=lambda row: row.label_bytes):
        if found[row.codec] is None:
            return None
        if found[row.codec]:
            return row
    return None


def default_codec(table: list[Row]) -> str:
    """The verdict on the default codec, as a sentence."""
    reference, best = table[0], chosen_codec(table)
    cols = verdict_columns(table)
    optimizers = ", ".join(dict.fromkeys(o for _, o in cols)) or "any optimizer"
    if best is None:
        return (
            "**Default codec:** not decided yet: every codec smaller than the smallest with no "
            f"measured cost needs GIFT and KL under {optimizers} with as many seeds as "
            f"`{reference.codec}`, at least 2."
        )
    found = verdicts(table)
    failing = [row.codec for row in table if found.get(row.codec) is False
               and row.label_bytes < best.label_bytes]  # fmt: skip
    skipped = untrained(table)
    return (
        f"**Default codec:** `{best.codec}`, {best.bytes_per_view:.1f} bytes per view: the "
        f"smallest with no GIFT or KL top-1 under {optimizers} more than one seed std below "
        f"`{reference.codec}`"
        + (f" (below it: {', '.join(f'`{c}`' for c in failing)})" if failing else "")
        + (f"; left out, as `{reference.codec}` itself trains no better than `{FLOOR_LOSS}` "
           f"on hard labels there: {', '.join(f'`{loss}` {opt}' for loss, opt in skipped)}"
           if skipped else "")
        + "."
    )  # fmt: skip


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with fewer (or as many) bytes and higher accuracy."""
    front, best = [], float("-inf")
    for size, top1 in sorted(points, key=lambda p: (p[0], -p[1])):
        if top1 > best:
            front.append((size, top1))
            best = top1
    return front


def markdown_table(table: list[Row]) -> str:
    cols, decisive = columns(table), verdict_columns(table)
    reference = table[0]
    lines = [
        "| codec | stored epochs | label bytes | bytes per view | "
        + " | ".join(f"`{loss}` {opt}" for loss, opt in cols) + " | ≥ ref. − 1 std |",
        "| --- | --- | --- | --- |" + " --- |" * (len(cols) + 1),
    ]  # fmt: skip
    for row in table:
        texts = [row.cells[c].text() if c in row.cells else "–" for c in cols]
        verdict = "(reference)" if row is reference else {
            True: "yes", False: "no", None: "–"}[within(row, reference, decisive)]  # fmt: skip
        lines.append(
            f"| `{row.codec}` | {row.stored_epochs} | {row.label_bytes / 1e6:.3f} MB | "
            f"{row.bytes_per_view:.1f} | " + " | ".join(texts) + f" | {verdict} |"
        )
    return "\n".join(lines)


def plot(table: list[Row], out: Path, task: BudgetTask) -> str:
    """Top-1 against label bytes (log), one panel per optimizer, the Pareto front dashed."""
    plt = pyplot()
    cols = columns(table)
    optimizers = list(dict.fromkeys(opt for _, opt in cols))
    fig, axes = plt.subplots(1, len(optimizers), figsize=(5 * len(optimizers), 4), dpi=100,
                             squeeze=False, sharey=True)  # fmt: skip
    for ax, opt in zip(axes[0], optimizers, strict=True):
        for loss in dict.fromkeys(loss for loss, o in cols if o == opt):
            measured = [(row, row.cells[(loss, opt)]) for row in table if (loss, opt) in row.cells]
            line = ax.errorbar(
                [row.label_bytes for row, _ in measured], [c.mean for _, c in measured],
                yerr=[c.std for _, c in measured], fmt="o", capsize=2, label=loss,
            )  # fmt: skip
            front = pareto([(row.label_bytes, c.mean) for row, c in measured])
            ax.plot(*zip(*front, strict=True), "--", color=line[0].get_color(), alpha=0.6)
            for row, c in measured:
                ax.annotate(row.label, (row.label_bytes, c.mean), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))  # fmt: skip
        floor = table[0].cells.get((FLOOR_LOSS, opt))
        if floor is not None:
            ax.axhline(floor.mean, color="gray", linestyle=":", label=f"{FLOOR_LOSS} (hard labels)")
        ax.set_xscale("log")
        ax.set_xlabel("label bytes (log)")
        ax.set_title(opt)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test top-1")
    fig.suptitle(f"{task.headline}: accuracy against stored label bytes (dashed: Pareto front)")
    return save_figure(fig, out / f"{task.stem}.png")


def width_text(records: list[dict]) -> str:
    """The students' width, when the study set one (the K = 10 study used the default 128)."""
    widths = sorted({r["job"].get("width") or 128 for r in records})
    return f" of width {'/'.join(map(str, widths))}"


def paper_questions(table: list[Row], task: BudgetTask, loss_records: list[dict]) -> str:
    """The paper's three questions on the reference's GIFT, KL and CE cells (AdamW, and SGD
    at the task's lr), beside the K = 10 loss study's answers, and whether K changes them."""
    reference = table[0]
    tag = next((opt.removeprefix(task.paper_sgd) for loss, opt in reference.cells
                if loss == "gift" and opt.startswith(task.paper_sgd)), "")  # fmt: skip
    sgd = task.paper_sgd + tag
    # AdamW on the SGD column's build where its reference has every seed, else the first's
    adamw = "adamw" + tag
    if any(len(reference.cells.get((loss, adamw), Cell((), ())).seeds)
           < len(loss_report.COMPARED_SEEDS) for loss in loss_report.COMPARED_LOSSES):
        adamw = "adamw"
    grid = {(loss, "sgd" if opt == sgd else "adamw"): cell for (loss, opt), cell
            in reference.cells.items() if opt in (adamw, sgd)}  # fmt: skip
    questions, verdict = loss_report.compare_questions(
        {"K = 10 (loss study, crops)": loss_report.compared_grid(loss_records),
         f"K = {task.classes} (`{reference.codec}`, AdamW as `{adamw}`, SGD as `{sgd}`)": grid},
        "K", f"K = {task.classes} changes",
    )  # fmt: skip
    return (
        f"The paper's questions at K = {task.classes}, on the reference's GIFT, KL and CE "
        f"cells (seeds {', '.join(map(str, loss_report.COMPARED_SEEDS))}), beside the "
        f"K = 10 loss study's IPC-10 answers (`loss_study.jsonl`; its SGD at `softserve "
        f"train`'s lr):\n\n{questions}\n\n**Does K = {task.classes} change the verdict?** "
        f"{verdict}"
    )


def builds_text(records: list[dict]) -> str:
    """Which reference build each column's tag names, when the study has more than one."""
    tags = builds(records)
    if len(tags) < 2:
        return ""
    cpus: dict[tuple[str, str] | None, set[str]] = {}
    for r in records:
        cpus.setdefault(build_of(r), set()).add(r.get("host", {}).get("cpu", "unknown CPU"))
    said = [f"{'unmarked' if not tag else 'marked' + tag}: "
            + (f"teacher sha256 `{b[0][:12]}`, images `{b[1][:12]}`, on "
               f"{', '.join(sorted(cpus[b]))}" if b else "records without provenance")
            for b, tag in tags.items()]  # fmt: skip
    return (
        "The reference was built more than once, on another machine: its teacher, trained "
        "afresh, differs, as float32 training differs across CPUs. Every build's variants are "
        "transcoded from its own fp32 labels, and a column compares codes within one build. "
        "Columns " + "; ".join(said) + "."
    )


def by_ipc(records: list[dict]) -> dict[int | None, list[dict]]:
    """Records by the synthetic set's IPC: None (the task's own) first, then each ``--ipc``
    in turn; another IPC has other images and ten times the label bytes, so a table of its
    own."""
    groups: dict[int | None, list[dict]] = {None: []}
    for r in records:
        groups.setdefault(r["job"].get("ipc"), []).append(r)
    return dict(sorted(groups.items(), key=lambda item: item[0] or 0))


def ipc_section(ipc: int, records: list[dict]) -> str:
    """Another IPC's runs: their own table, each variant transcoded from that IPC's fp32."""
    table = rows(records)
    return "\n\n".join(filter(None, [
        f"**At IPC {ipc}** ({len(records)} runs; reference `{table[0].codec}` with "
        f"E = {table[0].stored_epochs} relabelled from the IPC {ipc} synthetic set, "
        f"`--ipc {ipc}`; not in the verdict or the plot):",
        markdown_table(table), builds_text(records),
    ]))  # fmt: skip


def render(
    records: list[dict], plots: list[str], link: str, task: BudgetTask,
    loss_records: list[dict] | None = None,
) -> str:  # fmt: skip
    """The study's markdown: provenance, table, floor, verdict and plot at the task's IPC,
    then a table for each other IPC measured."""
    if not records:
        return f"No runs yet: `{task.command}` fills this section.\n"
    groups = by_ipc(records)
    parts = task_parts(groups.pop(None), plots, link, task, loss_records or [])
    parts += [ipc_section(ipc, group) for ipc, group in groups.items()]
    return "\n\n".join(parts) + "\n"


def task_parts(
    records: list[dict], plots: list[str], link: str, task: BudgetTask, loss_records: list[dict]
) -> list[str]:  # fmt: skip
    """The sections of the runs at the task's own IPC."""
    if not records:
        return [f"No runs yet at the task's IPC: `{task.command}` fills this section."]
    table = rows(records)
    versions = sorted({r["code_version"] for r in records})
    epochs = sorted({r["job"]["epochs"] for r in records})
    parts = [
        f"{len(records)} runs; code version{'s' if len(versions) > 1 else ''} "
        f"{', '.join(f'`{v}`' for v in versions)}; students train {'/'.join(map(str, epochs))} "
        f"epochs (fewer stored epochs wrap around); ConvNet-3{width_text(records)}, top-1 after "
        f"the last epoch as mean ± sample std [population std] (seeds). Reference: "
        f"`{table[0].codec}` with E = {table[0].stored_epochs}, every other "
        f"row transcoded from it. Reproduce: `{task.command}`; each run's command "
        f"is in `{link}{task.stem}.jsonl`.",
        markdown_table(table),
    ]
    if builds_text(records):
        parts.append(builds_text(records))
    floors = {opt: c for (loss, opt), c in table[0].cells.items() if loss == FLOOR_LOSS}
    if floors:
        parts.append(
            f"Floor, `{FLOOR_LOSS}` on hard labels only: "
            + "; ".join(f"{opt} {c.text()}" for opt, c in sorted(floors.items())) + "."
        )
    parts.append(default_codec(table))
    if task.paper_sgd:
        parts.append(paper_questions(table, task, loss_records))
    if task.field:
        parts.append(task.field)
    if all("top1_best4" in r["result"] for r in records):
        parts.append(
            "The official evaluator's number, the best of its evaluations at E/4, E/2, 3E/4 "
            "and E (the verdict above uses the last epoch's):\n\n"
            + markdown_table(rows(records, "top1_best4"))
        )
    return parts + [f"![{name}]({link}{name})" for name in plots]


def write_report(
    results: Path, out: Path, readme: Path | None = None, task: str = "fashion-mnist",
    loss_results: Path = RESULTS / "loss_study.jsonl",
) -> Path:  # fmt: skip
    """Write the task's page and plot into ``out``; update ``readme`` if given. A task that
    asks the paper's questions reads the K = 10 answers from ``loss_results``."""
    study = TASKS[task]
    records = load(results)
    loss_records = load(loss_results) if study.paper_sgd else []
    out.mkdir(parents=True, exist_ok=True)
    own = by_ipc(records)[None]
    plots = [plot(rows(own), out, study)] if own else []
    return write_pages(
        out, study.stem, f"Label budget: {study.headline}",
        lambda link: render(records, plots, link, study, loss_records), readme, study.markers,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=TASKS, default="fashion-mnist")
    parser.add_argument("--results", type=Path, default=None, help="[default: the task's]")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=None)
    args = parser.parse_args()
    results = args.results or RESULTS / f"{TASKS[args.task].stem}.jsonl"
    print(write_report(results, args.out, args.readme, args.task))


if __name__ == "__main__":
    main()
