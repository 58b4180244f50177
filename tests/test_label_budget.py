"""The label-budget study: its report from known records, and a smoke run on real data."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_label_set

from bench.studies import label_budget, label_budget_report
from softserve.worker import fashion_mnist

ROOT = Path(__file__).resolve().parent.parent

HAVE_DATA = (fashion_mnist.DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists()
SIZES = {("fp32", 300): 3_000_000, ("fp16", 300): 1_500_000, ("topk:1", 300): 200_000,
         ("fp32", 30): 300_000}  # fmt: skip


def record(codec: str, epochs: int, loss: str, optimizer: str, seed: int, top1: float) -> dict:
    job = {"codec": codec, "stored_epochs": epochs, "loss": loss, "optimizer": optimizer,
           "seed": seed, "epochs": 300, "model": "convnet"}  # fmt: skip
    labels = {"label_bytes": SIZES[(codec, epochs)],
              "bytes_per_view": SIZES[(codec, epochs)] / (epochs * 100)}  # fmt: skip
    return {"job": job, "result": {"top1": top1}, "labels": labels, "command": ["softserve"],
            "code_version": "abc"}  # fmt: skip


def records_for(top1: dict[tuple, list[float]]) -> list[dict]:
    return [record(*key, seed, v) for key, values in top1.items() for seed, v in enumerate(values)]


def budget_page(tmp_path: Path, top1: dict[tuple, list[float]]) -> str:
    """The K = 10 report's page for these cells' records."""
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records_for(top1)))
    return label_budget_report.write_report(results, tmp_path / "out").read_text()


def test_report_table_verdict_and_plot_from_known_records(tmp_path: Path) -> None:
    """Means ± stds per cell, sizes, the one-std test against fp32 and the chosen codec."""
    top1 = {
        ("fp32", 300, "gift", "adamw"): [0.80, 0.82], ("fp32", 300, "kl", "adamw"): [0.84, 0.86],
        ("fp32", 300, "ce", "adamw"): [0.70, 0.72],
        ("fp16", 300, "gift", "adamw"): [0.81, 0.81], ("fp16", 300, "kl", "adamw"): [0.85, 0.85],
        # topk:1 keeps GIFT but loses KL by more than fp32's std (0.014): not the default
        ("topk:1", 300, "gift", "adamw"): [0.80, 0.81],
        ("topk:1", 300, "kl", "adamw"): [0.80, 0.81],
        ("fp32", 30, "gift", "adamw"): [0.80, 0.81], ("fp32", 30, "kl", "adamw"): [0.85, 0.86],
    }  # fmt: skip
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records_for(top1)))
    readme = tmp_path / "README.md"
    begin, end = label_budget_report.TASKS["fashion-mnist"].markers
    readme.write_text(f"intro\n{begin}\nold\n{end}\nz\n")
    page = label_budget_report.write_report(results, tmp_path / "out", readme=readme).read_text()

    std = statistics.stdev([0.80, 0.82])
    pstd = std / 2**0.5  # two seeds: population std = sample std / sqrt(2)
    assert (f"| `fp32` | 300 | 3.000 MB | 100.0 | 0.810 ± {std:.3f} [{pstd:.3f}] (2) | "
            f"0.850 ± {std:.3f} [{pstd:.3f}] (2) "
            "| (reference) |") in page  # fmt: skip
    for row in (
        "| `fp16` | 300 | 1.500 MB | 50.0 "
        "| 0.810 ± 0.000 [0.000] (2) | 0.850 ± 0.000 [0.000] (2) | yes |",
        "| `topk:1` | 300 | 0.200 MB | 6.7 "
        "| 0.805 ± 0.007 [0.005] (2) | 0.805 ± 0.007 [0.005] (2) | no |",
        "| `fp32` | 30 | 0.300 MB | 100.0 "
        "| 0.805 ± 0.007 [0.005] (2) | 0.855 ± 0.007 [0.005] (2) | yes |",
    ):
        assert row in page
    assert "Floor, `ce` on hard labels only: adamw 0.710 ± 0.014 [0.010] (2)." in page
    # fp32 E=30 is smaller and passes, but the default is a codec: full epochs only
    assert "**Default codec:** `fp16`, 50.0 bytes per view" in page
    assert "(below it: `topk:1`)" in page
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("z\n") and "old" not in text
    assert "![label_budget.png](out/label_budget.png)" in text
    assert (tmp_path / "out" / "label_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = label_budget_report.write_report(results, tmp_path / "out2").read_text()
    assert again == page
    assert "LPQLD" not in page  # the ImageNet figures stand beside the K = 1000 study only
    k1000 = label_budget_report.write_report(results, tmp_path / "out3", task="triplets")
    assert label_budget_report.IMAGENET_FIGURES in k1000.read_text()


def test_default_codec_waits_for_seeds(tmp_path: Path) -> None:
    """One seed on the reference gives no std: the verdict says it is not decided."""
    top1 = {("fp32", 300, "gift", "adamw"): [0.8], ("fp16", 300, "gift", "adamw"): [0.8]}
    page = budget_page(tmp_path, top1)
    assert "**Default codec:** not decided yet" in page
    assert "| `fp16` | 300 | 1.500 MB | 50.0 | 0.800 (1) | – |" in page


def test_default_codec_is_one_sided_and_waits_for_every_seed(tmp_path: Path) -> None:
    """Training better than fp32 by more than its std costs nothing, so topk:1 passes; and
    no verdict while a codec has fewer seeds than the reference."""
    top1 = {("fp32", 300, "gift", "adamw"): [0.80, 0.82],
            ("fp16", 300, "gift", "adamw"): [0.81, 0.81],
            ("topk:1", 300, "gift", "adamw"): [0.90, 0.91]}  # fmt: skip
    page = budget_page(tmp_path, top1)
    assert "**Default codec:** `topk:1`, 6.7 bytes per view" in page
    assert "| `topk:1` | 300 | 0.200 MB | 6.7 | 0.905 ± 0.007 [0.005] (2) | yes |" in page

    top1[("topk:1", 300, "gift", "adamw")] = [0.90]
    page = budget_page(tmp_path, top1)
    assert "**Default codec:** not decided yet" in page
    assert "| `topk:1` | 300 | 0.200 MB | 6.7 | 0.900 (1) | – |" in page


def test_a_codec_that_costs_in_one_column_fails_without_the_others(tmp_path: Path) -> None:
    """topk:1 loses under AdamW and lacks SGD: it fails (not undecided), so fp16, measured
    under both, is the default."""
    top1 = {("fp32", 300, "gift", "adamw"): [0.80, 0.82], ("fp32", 300, "gift", "sgd"): [0.7, 0.72],
            ("fp16", 300, "gift", "adamw"): [0.81, 0.81], ("fp16", 300, "gift", "sgd"): [0.7, 0.7],
            ("topk:1", 300, "gift", "adamw"): [0.70, 0.71]}  # fmt: skip
    page = budget_page(tmp_path, top1)
    assert "**Default codec:** `fp16`, 50.0 bytes per view" in page
    assert "(below it: `topk:1`)" in page
    assert "| `topk:1` | 300 | 0.200 MB | 6.7 | 0.705 ± 0.007 [0.005] (2) | – | no |" in page


def test_default_codec_ignores_larger_undecided_codecs_and_single_seed_optimizers(
    tmp_path: Path,
) -> None:
    """A codec larger than the chosen one cannot change the choice, so it may still lack
    seeds; an optimizer whose reference has one seed (no std) is left out of the verdict,
    which names the optimizers it rests on."""
    top1 = {("fp32", 300, "gift", "adamw"): [0.80, 0.82],
            ("fp32", 300, "gift", "sgd"): [0.20],
            ("topk:1", 300, "gift", "adamw"): [0.81, 0.80],
            ("topk:1", 300, "gift", "sgd"): [0.05],
            ("fp16", 300, "gift", "adamw"): [0.81]}  # fmt: skip
    page = budget_page(tmp_path, top1)
    assert "**Default codec:** `topk:1`, 6.7 bytes per view: the smallest with no GIFT or KL " \
        "top-1 under adamw more than" in page

    top1[("topk:1", 300, "gift", "adamw")] = [0.81]  # now the smallest is undecided
    page = budget_page(tmp_path, top1)
    assert "**Default codec:** not decided yet" in page


def test_verdict_leaves_out_untrained_columns_and_losses_other_than_gift_and_kl(
    tmp_path: Path,
) -> None:
    """KL under SGD whose fp32 reference trains no better than CE on hard labels cannot tell
    codes apart, and softce is shown but not judged: topk:1, which loses only there, is the
    default; once fp32's KL beats the floor, topk:1 loses."""
    top1 = {("fp32", 300, "gift", "adamw"): [0.80, 0.82], ("fp32", 300, "kl", "sgd"): [0.02, 0.03],
            ("fp32", 300, "ce", "sgd"): [0.08, 0.09], ("fp32", 300, "softce", "adamw"): [0.7, 0.7],
            ("topk:1", 300, "gift", "adamw"): [0.81, 0.80],
            ("topk:1", 300, "kl", "sgd"): [0.0, 0.0],
            ("topk:1", 300, "softce", "adamw"): [0.1, 0.1]}  # fmt: skip
    page = budget_page(tmp_path, top1)
    assert "| `gift` adamw | `kl` sgd | `softce` adamw | ≥ ref. − 1 std |" in page
    assert ("**Default codec:** `topk:1`, 6.7 bytes per view: the smallest with no GIFT or KL "
            "top-1 under adamw more than one seed std below `fp32`; left out, as `fp32` itself "
            "trains no better than `ce` on hard labels there: `kl` sgd.") in page  # fmt: skip

    top1[("fp32", 300, "ce", "sgd")] = [0.01, 0.01]
    page = budget_page(tmp_path, top1)
    assert "**Default codec:** `fp32`" in page and "left out" not in page


def test_a_column_beside_fewer_stored_epochs_only_decides_nothing(tmp_path: Path) -> None:
    """The verdict judges full-epoch codecs: a column where only E' = 30 sits beside the
    reference leaves the default decided by the others."""
    page = budget_page(tmp_path, {
        ("fp32", 300, "gift", "adamw"): [0.80, 0.82], ("fp16", 300, "gift", "adamw"): [0.81, 0.81],
        ("fp32", 300, "gift", "sgd"): [0.60, 0.62], ("fp32", 30, "gift", "sgd"): [0.60, 0.60],
    })  # fmt: skip
    assert "**Default codec:** `fp16`, 50.0 bytes per view: the smallest with no GIFT or KL " \
        "top-1 under adamw more than one seed std below `fp32`." in page


def test_k1000_report_asks_the_papers_questions_beside_k10(tmp_path: Path) -> None:
    """The K = 1000 reference's GIFT, KL and CE cells under AdamW and SGD at the task's lr
    (not SGD at another lr) answer the three questions beside the loss study's K = 10."""
    sgd = label_budget_report.TASKS["triplets"].paper_sgd
    k1000 = {("fp32", 300, "gift", "adamw"): [0.53, 0.54, 0.53],
             ("fp32", 300, "kl", "adamw"): [0.55, 0.55, 0.56],
             ("fp32", 300, "ce", "adamw"): [0.08, 0.09, 0.08],
             ("fp32", 300, "gift", sgd): [0.54, 0.53, 0.54],
             ("fp32", 300, "kl", sgd): [0.02, 0.03, 0.02],
             ("fp32", 300, "ce", sgd): [0.10, 0.09, 0.10],
             ("fp32", 300, "gift", "sgd"): [0.9, 0.9, 0.9]}  # another lr: not asked
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records_for(k1000)))
    k10 = {("gift", "adamw"): 0.83, ("kl", "adamw"): 0.86, ("ce", "adamw"): 0.72,
           ("gift", "sgd"): 0.80, ("kl", "sgd"): 0.80, ("ce", "sgd"): 0.73}  # no collapse
    jobs = [({"ipc": 10, "feed": "served", "loss": loss, "optimizer": opt, "seed": seed},
             top1) for (loss, opt), top1 in k10.items() for seed in (0, 1, 2)]  # fmt: skip
    loss_results = tmp_path / "loss.jsonl"
    loss_results.write_text("".join(json.dumps({"job": j, "result": {"top1": t}}) + "\n"
                                    for j, t in jobs))  # fmt: skip
    page = label_budget_report.write_report(
        results, tmp_path / "out", task="triplets", loss_results=loss_results
    ).read_text()
    assert ("| question | K = 10 (loss study, crops) | K = 1000 (`fp32`, AdamW as `adamw`, SGD "
            f"as `{sgd}`) | K changes it? |") in page  # fmt: skip
    assert "| adamw: no, GIFT 0.830, `kl` 0.860; sgd: yes, GIFT 0.800 | " \
        "adamw: no, GIFT 0.533, `kl` 0.553; sgd: yes, GIFT 0.537 | no |" in page
    assert "| `gift`: `gift` 0.030, `kl` 0.060 | `gift`: `gift` 0.003, `kl` 0.530 | no |" in page
    assert ("| no: 0.800 with SGD against 0.860 with AdamW (-0.060) | yes: 0.023 with SGD "
            "against 0.553 with AdamW (-0.530) | **yes** |") in page  # fmt: skip
    assert ("**Does K = 1000 change the verdict?** Yes: K = 1000 changes 1 of the 3 verdicts "
            "(KL collapses under SGD?).") in page  # fmt: skip

    # SGD measured on a rebuild: AdamW from the same build once its reference has every seed
    rebuild = {"teacher_sha256": "3" * 64, "images_sha256": "4" * 64}
    first = [{**r, "teacher_sha256": "1" * 64, "images_sha256": "2" * 64}
             for r in records_for({k: v for k, v in k1000.items() if k[3] == "adamw"})]
    second = {k: v for k, v in k1000.items() if k[3] == sgd}
    for seeds in ([0.40], [0.40, 0.41, 0.40]):
        second |= {("fp32", 300, loss, "adamw"): seeds for loss in ("gift", "kl", "ce")}
        results.write_text("".join(json.dumps(r) + "\n" for r in first + [
            {**r, **rebuild} for r in records_for(second)]))  # fmt: skip
        page = label_budget_report.write_report(
            results, tmp_path / "out", task="triplets", loss_results=loss_results
        ).read_text()
        adamw = "adamw" if len(seeds) == 1 else "adamw (b)"
        assert f"K = 1000 (`fp32`, AdamW as `{adamw}`, SGD as `{sgd} (b)`)" in page


@pytest.mark.parametrize("task", label_budget_report.TASKS)
def test_relabels_defaults_are_the_committed_studies_verdicts(task: str) -> None:
    """STUDY_VERDICTS holds the verdict of each committed study that has decided one, and
    nothing for one that has not: changing the code or the results alone fails here."""
    from softserve.format.codecs import STUDY_VERDICTS

    study = label_budget_report.TASKS[task]
    records = label_budget_report.load(ROOT / "bench" / "results" / f"{study.stem}.jsonl")
    own = label_budget_report.by_ipc(records)[None]
    chosen = label_budget_report.chosen_codec(label_budget_report.rows(own))
    assert STUDY_VERDICTS.get(study.classes) == (chosen and chosen.codec)


def test_a_rebuilt_reference_gets_columns_of_its_own(tmp_path: Path) -> None:
    """Runs on a reference relabelled from another teacher never share a cell with the
    first build's; a rebuild's column that holds only the reference decides nothing."""
    first, second = {"teacher_sha256": "1" * 64, "images_sha256": "2" * 64}, {
        "teacher_sha256": "3" * 64, "images_sha256": "4" * 64, "host": {"cpu": "AMD EPYC"}}
    runs = [(first, {("fp32", 300, "gift", "adamw"): [0.80, 0.82],
                     ("fp16", 300, "gift", "adamw"): [0.81, 0.81]}),
            (second, {("fp32", 300, "gift", "adamw"): [0.70, 0.70],
                      ("fp32", 300, "gift", "sgd"): [0.60, 0.62],
                      ("fp16", 300, "gift", "sgd"): [0.50, 0.50]})]  # fmt: skip
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps({**r, **build}) + "\n"
                               for build, top1 in runs for r in records_for(top1)))  # fmt: skip
    page = label_budget_report.write_report(results, tmp_path / "out").read_text()
    assert "| `gift` adamw | `gift` adamw (b) | `gift` sgd (b) | ≥ ref. − 1 std |" in page
    assert ("| `fp32` | 300 | 3.000 MB | 100.0 | 0.810 ± 0.014 [0.010] (2) | 0.700 ± 0.000 "
            "[0.000] (2) | 0.610 ± 0.014 [0.010] (2) | (reference) |") in page  # fmt: skip
    assert "| `fp16` | 300 | 1.500 MB | 50.0 | 0.810 ± 0.000 [0.000] (2) | – | 0.500 " in page
    assert "under adamw, sgd (b) more than one seed std" in page  # not adamw (b)
    assert "**Default codec:** `fp32`" in page  # fp16 loses under SGD on the second build
    assert ("Columns unmarked: teacher sha256 `111111111111`, images `222222222222`, on "
            "unknown CPU; marked (b): teacher sha256 `333333333333`, images `444444444444`, "
            "on AMD EPYC.") in page  # fmt: skip


def test_another_ipc_is_another_job_and_another_table(tmp_path: Path) -> None:
    """--ipc 10 plans jobs whose keys differ from the task's IPC's, and its runs (other
    images, ten times the label bytes) form a table of their own, with their own sizes,
    outside the verdict."""
    variants = [label_budget.Variant("fp32", 300)]
    plain, ten = (label_budget.plan(variants, [0], 100, ["gift"], ["adamw"], floor=False,
                                    width=32, ipc=ipc) for ipc in (None, 10))  # fmt: skip
    assert [j.ipc for j in ten] == [10] and plain[0].key != ten[0].key
    base = {"teacher_sha256": "1" * 64, "images_sha256": "2" * 64}
    records = [{**r, **base} for r in records_for({("fp32", 300, "gift", "adamw"): [0.8, 0.8],
                                                   ("fp16", 300, "gift", "adamw"): [0.8, 0.8]})]
    records += [{**r, **base, "images_sha256": "5" * 64, "job": {**r["job"], "ipc": 10},
                 "labels": {**r["labels"], "label_bytes": 10 * r["labels"]["label_bytes"]}}
                for r in records_for({("fp32", 300, "gift", "adamw"): [0.9],
                                      ("fp16", 300, "gift", "adamw"): [0.5]})]  # fmt: skip
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    page = label_budget_report.write_report(results, tmp_path / "out").read_text()
    own, at_ten = page.split("**At IPC 10** (2 runs;")
    assert "| `fp32` | 300 | 3.000 MB | 100.0 | 0.800 ± 0.000 [0.000] (2) | (reference) |" in own
    assert "**Default codec:** `fp16`" in own  # IPC 10's single seed decides nothing
    assert "(b)" not in page and "0.900" not in own
    assert "| `fp32` | 300 | 30.000 MB | 100.0 | 0.900 (1) | (reference) |" in at_ten
    assert "| `fp16` | 300 | 15.000 MB | 50.0 | 0.500 (1) | – |" in at_ten


def test_a_run_counts_as_done_only_on_the_labels_it_ran_on(tmp_path: Path) -> None:
    """A reference rebuilt on another CPU has other labels: its cells run afresh. Records
    before content sha256s count by digest, or by teacher and images on this kind of CPU;
    records without provenance (older studies) count for any labels."""
    from bench.studies.study import cpu_model, done_keys, is_done, labels_of

    job = label_budget.Job("fp32", 300, "gift", "sgd@1.0", 0, 100, width=32)
    old = label_budget.Job("fp32", 300, "kl", "adamw", 0, 100, width=32)
    built = label_budget.Job("fp32", 300, "kl", "sgd@1.0", 0, 100, width=32)
    content = label_budget.Job("fp32", 300, "gift", "adamw", 1, 100, width=32)
    source = {"teacher_sha256": "t" * 64, "images_sha256": "i" * 64}
    records = [{"job": vars(job), "labelset_digest": "a" * 64}, {"job": vars(old)},
               {"job": vars(built), **source, "labelset_digest": "c" * 64,
                "host": {"cpu": cpu_model()}},
               {"job": vars(content), **source, "labels_sha256": "l" * 64,
                "host": {"cpu": cpu_model()}}]  # fmt: skip
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = done_keys(results, label_budget.Job)

    def starting(**provenance: str) -> frozenset[str]:
        return labels_of(provenance, starting=True)

    assert is_done(done, job.key, starting(labelset_digest="a" * 64))
    assert not is_done(done, job.key, starting(labelset_digest="b" * 64))
    assert is_done(done, job.key, frozenset())  # labels unknown: any run of the job counts
    assert is_done(done, old.key, starting(labelset_digest="b" * 64))
    rebuilt = starting(**source, labelset_digest="d" * 64, labels_sha256="m" * 64)
    assert is_done(done, built.key, rebuilt)  # a record before content sha256s
    assert not is_done(done, built.key, starting(**{**source, "images_sha256": "j" * 64}))
    assert not is_done(done, content.key, rebuilt)  # other content, whatever its source
    assert is_done(done, content.key, starting(**source, labels_sha256="l" * 64))
    assert not is_done(done, label_budget.Job("fp32", 300, "gift", "adamw", 0, 100).key,
                       starting(labelset_digest="a" * 64))  # fmt: skip


def test_a_rebuild_of_the_same_labels_counts_as_the_same_labels(
    tmp_path: Path, builds: tuple[Path, Path]
) -> None:  # fmt: skip
    """Relabelled again elsewhere and later, the same labels get another digest (the
    manifest holds its creation time) but the same content sha256, so their runs are done;
    other labels (another seed) are not."""
    from bench.studies.study import done_keys, is_done, labels_of, provenance

    first, other = builds
    again = provenance(build_label_set(tmp_path / "again", n=20, seed=0))
    ran = provenance(first)
    assert again["labelset_digest"] != ran["labelset_digest"]
    assert again["labels_sha256"] == ran["labels_sha256"] != provenance(other)["labels_sha256"]
    job = label_budget.Job("fp32", 4, "gift", "adamw", 0, 4)
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps({"job": vars(job), **ran}) + "\n")
    done = done_keys(results, label_budget.Job)
    assert is_done(done, job.key, labels_of(again, starting=True))
    assert not is_done(done, job.key, labels_of(provenance(other), starting=True))


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(10, 0.5), (20, 0.4), (30, 0.7), (40, 0.7), (5, 0.2), (30, 0.6)]
    assert label_budget_report.pareto(points) == [(5, 0.2), (10, 0.5), (30, 0.7)]


def test_an_optimizer_at_a_learning_rate_trains_with_it(tmp_path: Path) -> None:
    """``sgd@0.1`` is SGD at lr 0.1 in the run's command; a bare name passes no --lr."""
    ctx = label_budget.Context("http://x", "test.pt", "cpu", {}, tmp_path)
    swept = ctx.command(label_budget.Job("fp32", 300, "gift", "sgd@0.1", 0, 100))
    at = swept.index("--optimizer")
    assert swept[at : at + 4] == ["--optimizer", "sgd", "--lr", "0.1"]
    assert "--lr" not in ctx.command(label_budget.Job("fp32", 300, "gift", "sgd", 0, 100))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DATA, reason="needs Debian's dataset-fashion-mnist")
def test_label_budget_smoke_transcodes_serves_and_resumes(tmp_path: Path) -> None:
    """fp32@2 relabelled, topk:1@2 and fp32@1 transcoded, each trained through a server."""
    results, out = tmp_path / "results.jsonl", tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.studies.label_budget", "--smoke",
           "--workdir", tmp_path / "w", "--results", results, "--out", out]  # fmt: skip
    done = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert {(r["job"]["codec"], r["job"]["stored_epochs"]) for r in records} == {
        ("fp32", 2), ("topk:1", 2), ("fp32", 1)}  # fmt: skip
    by_variant = {(r["job"]["codec"], r["job"]["stored_epochs"]): r for r in records}
    for (codec, epochs), r in by_variant.items():
        name = f"budget-{codec.replace(':', '')}-e{epochs}"
        assert r["command"][r["command"].index("--labelset") + 1] == name
        assert r["result"]["codec"] == codec and r["result"]["epochs"] == 2
        assert r["labels"]["bytes_per_view"] == pytest.approx(
            r["labels"]["label_bytes"] / (epochs * 100), abs=0.01)  # fmt: skip
    sizes = {key: r["labels"]["label_bytes"] for key, r in by_variant.items()}
    assert sizes[("topk:1", 2)] < sizes[("fp32", 2)] and sizes[("fp32", 1)] < sizes[("fp32", 2)]
    page = (out / "label_budget.md").read_text()
    assert "| `topk:1` | 2 |" in page

    rerun = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True,
                           timeout=900)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "3 runs planned, 3 already in" in rerun.stdout
    assert results.read_text().count("\n") == len(records)
