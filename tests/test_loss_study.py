"""The loss study's pipeline: its report from known records, and a smoke run on real data."""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench.studies import loss_report, loss_study
from softserve.storage.manifest import load_manifest
from softserve.worker import fashion_mnist

ROOT = Path(__file__).resolve().parent.parent

HAVE_DATA = (fashion_mnist.DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists()


def record(
    ipc: int, feed: str, loss: str, optimizer: str, seed: int, top1: float, views: str = "rrc"
) -> dict:
    job = {"ipc": ipc, "feed": feed, "loss": loss, "optimizer": optimizer, "seed": seed,
           "epochs": 300, "model": "convnet"}  # fmt: skip
    if views != "rrc":  # crop records before DSA views carry no views
        job["views"] = views
    command = ["softserve", "train", "--loss", loss, "--eval", "fashion-mnist"]
    result = {"top1": top1, "codec": "fp16"}
    return {"job": job, "result": result, "command": command, "code_version": "abc",
            **({"views": views, "labelset_digest": "d" * 64, "teacher_sha256": "t" * 64}
               if views != "rrc" else {})}  # fmt: skip


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_report_tables_and_claims_from_known_records(tmp_path: Path) -> None:
    """Means, sample stds, spreads, paired differences and the three verdicts."""
    top1 = {  # (loss, optimizer): per-seed top-1
        ("gift", "adamw"): [0.80, 0.82], ("gift", "sgd"): [0.78, 0.80],
        ("kl", "adamw"): [0.84, 0.86], ("kl", "sgd"): [0.30, 0.34],
        ("ce", "adamw"): [0.70, 0.70], ("ce", "sgd"): [0.60, 0.62],
    }  # fmt: skip
    records = [
        record(10, "served", loss, opt, seed, v)
        for (loss, opt), values in top1.items() for seed, v in enumerate(values)
    ]  # fmt: skip
    records += [record(10, "online", "gift", "adamw", s, v) for s, v in enumerate([0.83, 0.84])]
    records += [record(1, "served", "gift", "adamw", 0, 0.5)]
    records += [record(1, "served", "kl", opt, 0, v) for opt, v in [("adamw", 0.6), ("sgd", 0.35)]]
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{loss_report.BEGIN}\nold\n{loss_report.END}\nrest\n")
    page = loss_report.write_report(results, tmp_path / "out", readme=readme).read_text()

    std = statistics.stdev([0.80, 0.82])
    pstd = std / 2**0.5  # two seeds: population std = sample std / sqrt(2)
    assert (f"| `gift` | 0.810 ± {std:.3f} [{pstd:.3f}] (2) | "
            f"0.790 ± {std:.3f} [{pstd:.3f}] (2) | 0.020 |") in page
    assert "| `kl` | 0.850 ± 0.014 [0.010] (2) | 0.320 ± 0.028 [0.020] (2) | 0.530 |" in page
    assert "adamw: no, GIFT 0.810 ranks 2 of 3 (best: `kl` 0.850)" in page
    assert "sgd: yes, GIFT 0.790 ranks 1 of 3" in page
    assert "**Smallest cross-optimizer spread?** yes: GIFT's is 0.020" in page
    assert "**KL collapses under SGD?** yes: KL reaches 0.320 with SGD against 0.850" in page
    # served - online per seed: -0.03, -0.02
    assert ("| `gift` | adamw | 0.810 ± 0.014 [0.010] (2) | 0.835 ± 0.007 [0.005] (2) "
            "| -0.025 ± 0.007 (2) |") in page  # fmt: skip
    assert "| `gift` | 0.500 (1) | 0.810 ± 0.014 [0.010] (2) |" in page  # by IPC
    # what to expect: worst case over optimizers, best per optimizer, by IPC, the arms' cost
    assert "`gift`: the best worst case over adamw, sgd (0.790, mean 0.800)" in page
    assert "adamw → `kl` 0.850, sgd → `gift` 0.790" in page
    assert "**Accuracy by IPC** (AdamW): `gift` 0.500 at IPC 1, 0.810 at IPC 10; `kl`" in page
    # the claims at another IPC, among its losses; GIFT's rank only where it has rivals
    ipc1 = page[page.index("The paper's claims at IPC 1, among `gift`, `kl`:") :]
    assert "**GIFT best?** adamw: no, GIFT 0.500 ranks 2 of 2 (best: `kl` 0.600)." in ipc1
    assert "KL reaches 0.350 with SGD against 0.600 with AdamW, -0.250" in ipc1
    assert "-0.025 top-1 on average over 2 paired runs (from -0.030 to -0.020" in page
    assert "The teacher labels the 30,000 views once" in page
    # sizes as the label-budget study measured the same set's files, HDF5 overhead included
    served, default = (
        loss_report.stored_bytes(c, 300)[0] for c in ("fp16", loss_report.DEFAULT_CODEC)
    )
    assert (served, default) == (41.05, 40.37)
    assert (f"stores {served:g} bytes per view on disk, as `label_budget.jsonl` measures (fp16), "
            f"{served * 30_000 / 1e6:.2f} MB") in page  # fmt: skip
    assert f"{default:g} bytes per view on disk, as `label_budget.jsonl` measures " in page
    assert f"({loss_report.DEFAULT_CODEC}), {default * 30_000 / 1e6:.2f} MB." in page
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert "![loss_study_ipc10.png](out/loss_study_ipc10.png)" in text
    for name in ("loss_study_ipc10.png", "loss_study_by_ipc.png", "loss_study_online.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = loss_report.write_report(results, tmp_path / "out2").read_text()
    assert again == page  # deterministic


def run_smoke(work: Path, results: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``loss_study --smoke`` in a subprocess, as CI runs it; asserts it succeeded."""
    cmd = [sys.executable, "-m", "bench.studies.loss_study", "--smoke", *extra, "--workdir", work,
           "--results", results, "--out", out]  # fmt: skip
    done = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def cell_key(record: dict) -> tuple:
    """A record's (ipc, feed, loss, optimizer)."""
    job = record["job"]
    return job["ipc"], job["feed"], job["loss"], job["optimizer"]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DATA, reason="needs Debian's dataset-fashion-mnist")
def test_loss_study_smoke_runs_through_a_server_and_resumes(tmp_path: Path) -> None:
    """2 epochs, gift and kl, AdamW and SGD, seed 0, IPC 1 and 10, served and online."""
    results, out = tmp_path / "results.jsonl", tmp_path / "out"
    run_smoke(tmp_path / "w", results, out)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    keys = {cell_key(r) for r in records}
    expected = {(ipc, "served", loss, opt) for ipc in (1, 10) for loss in ("gift", "kl")
                for opt in ("adamw", "sgd")}  # fmt: skip
    expected |= {(10, "online", loss, opt) for loss in ("gift", "kl") for opt in ("adamw", "sgd")}
    assert keys == expected and len(records) == len(expected)
    teacher = hashlib.sha256((tmp_path / "w" / "teacher.pt").read_bytes()).hexdigest()
    for r in records:
        assert r["result"]["epochs"] == 2 and r["result"]["feed"] == r["job"]["feed"]
        assert r["views"] == r["job"]["views"] == "rrc" and r["teacher_sha256"] == teacher
        assert ("labelset_digest" in r) == (r["job"]["feed"] == "served")
        assert 0.0 <= r["result"]["top1"] <= 1.0
        assert r["command"][:2] == ["softserve", "train"] and "--epochs" in r["command"]
    page = (out / "loss_study.md").read_text()
    gift = [r["result"]["top1"] for r in records if cell_key(r) == (10, "served", "gift", "adamw")]
    assert f"| `gift` | {gift[0]:.3f} (1) |" in page

    rerun = run_smoke(tmp_path / "w", results, out)
    assert "12 runs planned, 12 already in" in rerun.stdout
    assert results.read_text().count("\n") == len(records)


def test_which_loss_names_the_losses_tied_with_the_best_worst_case() -> None:
    top1 = {("gift", "adamw"): [0.80, 0.84], ("gift", "sgd"): [0.79, 0.81],
            ("mse", "adamw"): [0.85, 0.85], ("mse", "sgd"): [0.785, 0.795],
            ("kl", "adamw"): [0.86, 0.86], ("kl", "sgd"): [0.30, 0.30]}  # fmt: skip
    records = [
        record(10, "served", loss, opt, seed, v)
        for (loss, opt), values in top1.items() for seed, v in enumerate(values)
    ]  # fmt: skip
    (which,) = loss_report.expectations(records, loss_report.cells(records), 10)
    # gift's worst case 0.800 ± 0.014; mse's 0.790 is within it, kl's 0.300 is not
    assert "`gift`: the best worst case over adamw, sgd (0.800, mean 0.810)" in which
    assert "within a seed std of it: `mse` 0.790." in which and "`kl` 0.300" not in which


def test_dsa_plan_is_the_crop_planners_served_cell_and_old_records_still_resume() -> None:
    jobs = loss_study.plan([10], 10, [0, 1, 2], 300, loss_study.CORE_LOSSES,
                           loss_study.CORE_LOSSES, ("adamw", "sgd"), online=True, views="dsa")
    assert len(jobs) == 18 and {j.feed for j in jobs} == {"served"}  # no online arm for DSA
    assert {j.views for j in jobs} == {"dsa"} and jobs[0].labelset == "fashion-mnist-ipc10-dsa"
    assert [j.seed for j in jobs[:6]] == [0] * 6  # seed-major
    crops = loss_study.plan([10], 10, [0], 300, ["gift"], ["gift"], ["adamw"], online=True)
    assert [(j.feed, j.labelset) for j in crops] == [
        ("served", "fashion-mnist-ipc10"), ("online", "fashion-mnist-ipc10")
    ]
    old = record(10, "served", "gift", "adamw", 0, 0.8)["job"]  # a record without views
    assert loss_study.Job(**old).key == crops[0].key != jobs[0].key


def dsa_grid(top1: dict[tuple[str, str], list[float]], views: str) -> list[dict]:
    return [record(10, "served", loss, opt, seed, v, views)
            for (loss, opt), values in top1.items() for seed, v in enumerate(values)]  # fmt: skip


def test_dsa_report_answers_both_protocols_and_says_what_changes(tmp_path: Path) -> None:
    crop = {("gift", "adamw"): [0.80, 0.82, 0.81], ("gift", "sgd"): [0.78, 0.80, 0.79],
            ("kl", "adamw"): [0.84, 0.86, 0.85], ("kl", "sgd"): [0.30, 0.34, 0.32],
            ("ce", "adamw"): [0.70, 0.70, 0.70], ("ce", "sgd"): [0.60, 0.62, 0.61]}  # fmt: skip
    dsa = {("gift", "adamw"): [0.86, 0.88, 0.87], ("gift", "sgd"): [0.70, 0.72, 0.71],
           ("kl", "adamw"): [0.84, 0.86, 0.85], ("kl", "sgd"): [0.80, 0.82, 0.81],
           ("ce", "adamw"): [0.70, 0.70, 0.70], ("ce", "sgd"): [0.60, 0.62, 0.61]}  # fmt: skip
    crops = write_records(tmp_path / "crop.jsonl", dsa_grid(crop, "rrc"))
    results = write_records(tmp_path / "dsa.jsonl", dsa_grid(dsa, "dsa"))
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{loss_report.DSA_BEGIN}\nold\n{loss_report.DSA_END}\nb\n")
    page = loss_report.write_dsa_report(results, tmp_path / "out", readme, crops).read_text()

    assert "18 of 18 runs under views `dsa`" in page and "`dddddddddddd`" in page
    assert ("| `kl` | 0.850 ± 0.010 [0.008] (3) | 0.320 ± 0.020 [0.016] (3) | 0.530 "
            "| 0.850 ± 0.010 [0.008] (3) | 0.810 ± 0.010 [0.008] (3) | 0.040 |") in page
    # GIFT best: crops: no under AdamW (kl), yes under SGD; DSA: yes under AdamW, no under SGD
    assert "| adamw: no, GIFT 0.810, `kl` 0.850; sgd: yes, GIFT 0.790 " in page
    assert "| adamw: yes, GIFT 0.870; sgd: no, GIFT 0.710, `kl` 0.810 | **yes** |" in page
    # spread among soft-label losses: crops gift 0.020 < kl 0.530; DSA kl 0.040 < gift 0.160
    assert ("| `gift`: `gift` 0.020, `kl` 0.530 "
            "| `kl` (not GIFT): `gift` 0.160, `kl` 0.040 | **yes** |") in page
    # KL: crops collapse (-0.530), DSA does not (-0.040)
    assert ("| yes: 0.320 with SGD against 0.850 with AdamW (-0.530) "
            "| no: 0.810 with SGD against 0.850 with AdamW (-0.040) | **yes** |") in page
    assert "verdict?** Yes: DSA views change 3 of the 3 verdicts (GIFT best?; Smallest" in page
    text = readme.read_text()
    assert text.startswith("a\n") and text.endswith("b\n") and "old" not in text

    same = write_records(tmp_path / "same.jsonl", dsa_grid(crop, "dsa"))
    again = loss_report.write_dsa_report(same, tmp_path / "o2", None, crops).read_text()
    assert "verdict?** No: DSA views change none of the 3 verdicts." in again


def test_dsa_report_names_the_missing_seeds_instead_of_answering(tmp_path: Path) -> None:
    crop = {(loss, opt): [0.8, 0.8, 0.8]
            for loss in ("gift", "kl", "ce") for opt in ("adamw", "sgd")}  # fmt: skip
    partial = {("kl", "adamw"): [0.85, 0.86, 0.84], ("kl", "sgd"): [0.4, 0.5],
               ("gift", "adamw"): [0.8]}  # fmt: skip
    crops = write_records(tmp_path / "crop.jsonl", dsa_grid(crop, "rrc"))
    results = write_records(tmp_path / "dsa.jsonl", dsa_grid(partial, "dsa"))
    page = loss_report.write_dsa_report(results, tmp_path / "out", None, crops).read_text()
    assert "6 of 18 runs" in page
    assert ("not yet: missing `gift`/adamw seeds 1, 2; `gift`/sgd seeds 0, 1, 2; "
            "`kl`/sgd seed 2") in page  # the spread question needs gift and kl only
    assert "`ce`/adamw seeds 0, 1, 2" in page  # GIFT best? needs ce too
    assert page.count("| not yet |") == 3
    assert "Not yet: 3 of the three questions wait for seeds (above: GIFT best?; Smallest" in page
    assert "0.450 ± 0.071" in page  # the table shows partial cells as they are

    partial[("kl", "sgd")] = [0.4, 0.5, 0.45]  # KL's question can be answered; crops: no drop
    results = write_records(tmp_path / "dsa2.jsonl", dsa_grid(partial, "dsa"))
    page = loss_report.write_dsa_report(results, tmp_path / "out", None, crops).read_text()
    assert "| yes: 0.450 with SGD against 0.850 with AdamW (-0.400) | **yes** |" in page
    assert ("Not yet: 2 of the three questions wait for seeds (above: GIFT best?; Smallest "
            "cross-optimizer spread); of those answered, DSA views change 1 of the 1 verdicts "
            "(KL collapses under SGD?).") in page  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DATA, reason="needs Debian's dataset-fashion-mnist")
def test_loss_study_dsa_smoke_serves_a_dsa_set(tmp_path: Path) -> None:
    """--views dsa: the IPC-10 DSA set built and served, its records saying so."""
    results, out, work = tmp_path / "results.jsonl", tmp_path / "out", tmp_path / "w"
    run_smoke(work, results, out, "--views", "dsa")
    records = [json.loads(line) for line in results.read_text().splitlines()]
    keys = {cell_key(r) for r in records}
    assert keys == {(10, "served", loss, opt)
                    for loss in ("gift", "kl") for opt in ("adamw", "sgd")}  # fmt: skip
    assert len(records) == 4 and sorted(p.name for p in (work / "store").iterdir()) == [
        "fashion-mnist-ipc10-dsa"
    ]  # the crop set is not built
    manifest, digest = load_manifest(work / "store" / "fashion-mnist-ipc10-dsa")
    assert manifest.config.views.policy == "dsa"
    teacher = hashlib.sha256((work / "teacher.pt").read_bytes()).hexdigest()
    for r in records:
        assert r["job"]["views"] == r["views"] == "dsa"
        assert r["result"]["labelset"] == "fashion-mnist-ipc10-dsa" and r["result"]["epochs"] == 2
        assert r["labelset_digest"] == digest and r["teacher_sha256"] == teacher
        assert r["images_sha256"] == manifest.config.dataset_sha256 and r["host"]["cpu"]
    page = (out / "loss_study_dsa.md").read_text()
    assert "4 of 18 runs under views `dsa`" in page and f"`{digest[:12]}`" in page
    assert page.count("| not yet |") == 3  # one seed answers none of the questions
