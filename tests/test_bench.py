"""The benchmarks still run end to end, and their paths still deliver identical data.

Timings are not asserted here (shared, noisy machines): these are smoke runs at tiny sizes
that catch a benchmark broken by a change in the code it measures. Each runs as a module
from the repository root (``python -m bench.serve_bench``), as the README says.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def bench(module: str, *args: object) -> subprocess.CompletedProcess[str]:
    """``python -m bench.MODULE ARGS`` from the repository root, its output captured."""
    cmd = [sys.executable, "-m", f"bench.{module}", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def run_bench(module: str, *args: object, out: Path) -> dict:
    done = bench(module, *args, "--json", out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_serve_bench_paths_agree(tmp_path: Path) -> None:
    record = run_bench(
        "serve_bench", "--quick", "--samples", 200, "--classes", 10, "--batch-size", 64,
        "--repeats", 1, "--passes", 2, "--student-widths", "16,8",
        "--student-steps", 4, "--student-block", 2, "--student-repeats", 1,
        "--diag-calls", 3, out=tmp_path / "serve.json",
    )  # fmt: skip
    assert record["info"]["checked"] == "yes"  # every path delivered path a's tensors
    paths = record["paths"]
    assert set(paths) == {"in_process", "in_process_grouped", "per_batch", "stream",
                          "stream_per_epoch", "stream_views", "files"}  # fmt: skip
    # 2 passes over 3 stored epochs of 200 // 64 = 3 batches of 64
    assert {(p["batches"], p["samples"]) for p in paths.values()} == {(18, 18 * 64)}
    goals = {g["name"]: g for g in record["goals"]}
    assert goals["stream / in-process"]["value"] > 0
    rss = record["info"]["server_rss_mib"]  # read from /proc: a process's real size
    assert 20 < rss["empty_store"] < rss["torch_alone"] + 100
    assert goals["server RSS MiB per worker, empty store"]["target"] == "<= 150"
    assert goals["stream / in-process server's reads"]["target"] == "info"
    assert goals["student step remote / in-memory w16"]["target"] == "<= 1.05"
    assert goals["student step remote / in-memory w8"]["target"] == "info"
    assert set(record["student"]) == {"16", "8"}
    for student in record["student"].values():  # both feeds took the same timed steps
        assert set(student) == {"in_memory", "remote_loader"}
        assert all(s["steps"] == 4 and len(s["total_s"]) == 1 for s in student.values())
        assert all(t > 0 for s in student.values() for t in s["total_s"])


def test_relabel_bench_runs(tmp_path: Path) -> None:
    record = run_bench(
        "relabel_bench", "--quick", "--config", "fashion-mnist-like", "--repeats", 1,
        out=tmp_path / "relabel.json",
    )  # fmt: skip
    (config,) = record["configs"]
    throughput = config["throughput"]
    assert throughput["samples"] == 1000  # 100 images x 10 epochs went through the pipeline
    assert throughput["ratio_pipeline_over_bare"] > 0
    codecs = {c["codec"]: c for c in config["codecs"]}
    assert set(codecs) == {"fp32", "fp16", "int8", "topk:1", "topk:3", "topk:5"}
    for c in codecs.values():  # what a transcode stored equals the codec's own round trip
        assert c["max_abs_stored_vs_roundtrip"] == 0
        assert c["max_abs_kl_error"] >= c["mean_abs_kl_error"] >= 0
    assert codecs["fp32"]["max_abs_gift_error"] == codecs["fp32"]["max_abs_kl_error"] == 0
    assert codecs["topk:1"]["bytes_per_label"] == 2 + 1 + 2
    # fewer kept classes, more error: the tail matters
    assert codecs["topk:1"]["max_abs_gift_error"] > codecs["topk:5"]["max_abs_gift_error"]


def test_storage_table_runs(tmp_path: Path) -> None:
    """The ImageNet-shaped storage table at a tiny size: every codec and epoch count, the
    sizes ordered as the codecs' bytes per label say."""
    done = bench("storage_table", "--samples", 64, "--classes", 40, "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "storage_table.json").read_text())
    per_view = {(r["codec"], r["epochs"]): r["bytes_per_view"] for r in rows}
    assert len(per_view) == 12
    for epochs in (300, 30):
        sizes = [per_view[(c, epochs)] for c in ("fp32", "fp16", "int8", "topk:10", "topk:1")]
        assert sizes == sorted(sizes, reverse=True)
    assert "| `topk:10` |" in (tmp_path / "storage_table.md").read_text()


def test_label_fidelity_orders_the_codes_by_what_they_keep(tmp_path: Path) -> None:
    """On a set relabelled at fp32 (K = 40) and transcoded: the reference against itself is
    the identity, and the tail-dropping and coarser codes move the targets further."""
    from bench.harness import build_label_set
    from softserve.worker.transcode import TranscodeOptions, transcode

    source = build_label_set(tmp_path, samples=60, classes=40, epochs=3, codec="fp32", seed=0)
    codes = ("int8", "topk:4+int4", "topk:4+int1", "topk:4")
    names = [c.replace(":", "-") for c in codes]
    for code, name in zip(codes, names, strict=True):
        transcode(TranscodeOptions(source, source.parent / name, codec=code, progress=False))
    done = bench("label_fidelity", "--store", source.parent, "--reference", source.name,
                 "--variants", ",".join(names), "--epochs", "0,2", "--top", 4,
                 "--out", tmp_path, "--name", "fidelity")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["codec"]: r for r in json.loads((tmp_path / "fidelity.json").read_text())}
    assert list(rows) == ["fp32", *codes] and rows["fp32"]["rows"] == 2 * 60
    ref = rows["fp32"]
    assert ref["gift_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert ref["kl_t1"] == ref["kl_t20"] == 0.0
    assert ref["tail_correlation"] == pytest.approx(1.0, abs=1e-12)
    assert ref["argmax_agreement"] == 1.0
    # a finer tail keeps more of every target; a dropped one keeps no order at all
    for metric in ("gift_cosine", "tail_correlation"):
        assert ref[metric] > rows["topk:4+int4"][metric] > rows["topk:4+int1"][metric]
    assert rows["topk:4+int1"]["tail_correlation"] > 0.5 > abs(rows["topk:4"]["tail_correlation"])
    for metric in ("kl_t1", "kl_t20"):
        assert 0 < rows["topk:4+int4"][metric] < rows["topk:4+int1"][metric]
    assert rows["topk:4"]["tail_mass_t1"] < ref["tail_mass_t1"]
    assert "| `topk:4+int1` |" in (tmp_path / "fidelity.md").read_text()
    outside = bench("label_fidelity", "--store", source.parent, "--reference", source.name,
                    "--variants", names[0], "--epochs", 3, "--out", tmp_path)  # fmt: skip
    assert outside.returncode == 2 and "stores 3 epochs" in outside.stderr


def test_report_bench_runs_on_a_set_by_the_real_writer(tmp_path: Path) -> None:
    """A tiny synthetic top-k set: the report sees every view and the top-k mass."""
    done = bench("report_bench", "--samples", 40, "--epochs", 3, "--classes", 12,
                 "--codec", "topk:3", "--out", tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "report_bench.json").read_text())
    assert (record["samples"], record["epochs"], record["codec"]) == (40, 3, "topk:3")
    assert record["report_seconds"] > 0 and record["report_over_read"] > 0


def test_fault_trials_deliver_right_labels_or_clear_errors(tmp_path: Path) -> None:
    """One trial of each fault at a tiny size: no wrong label, no unexplained failure."""
    record = run_bench(
        "fault_trials", "--rounds", 1, "--samples", 32, "--epochs", 2, "--stream-epochs", 12,
        out=tmp_path / "faults.json",
    )  # fmt: skip
    assert record["trials"] == 9
    assert set(record["by_kind"]) == {"flip_byte", "kill_worker", "kill_server",
                                      "sigterm_server", "replace_set", "flip_metadata",
                                      "zero_block", "overwrite_in_place",
                                      "truncate_stream"}  # fmt: skip
    assert record["failures"] == record["wrong_labels"] == 0, record["failed"]
    assert record["right"] + record["clear_error"] == 9


def test_load_test_runs_without_errors(tmp_path: Path) -> None:
    """A few seconds of 4 clients against 2 server processes: every client streamed, none
    failed, and the report has its fields (timings are reported, never asserted)."""
    record = run_bench(
        "load_test", "--clients", 4, "--seconds", 3, "--samples", 200, "--classes", 10,
        "--batch-size", 32, "--codec", "fp16", out=tmp_path / "load.json",
    )  # fmt: skip
    assert record["errors"] == 0, record["error_messages"]
    assert record["batches"] > 0 and record["samples"] == 32 * record["batches"]
    assert set(record["latency_ms"]) == {"p50", "p99"}
    assert set(record["first_batch_ms"]) == {"p50", "max"}
    assert set(record["server_rss_mb"]) == {"before", "after", "peak"}
    assert record["server_rss_mb"]["before"] > 0


def test_online_cost_times_both_arms(tmp_path: Path) -> None:
    record = run_bench("online_cost", "--epochs", 2, "--repeats", 2, out=tmp_path / "o.json")
    assert len(record["results"]) == 2
    for r in record["results"]:
        assert len(r["served_s"]) == len(r["online_s"]) == 2 and r["relabel_s"] > 0
        assert r["online_over_served"] == pytest.approx(
            statistics.median(r["online_s"]) / statistics.median(r["served_s"]), abs=2e-3
        )


def test_scale_bench_smoke_reports_every_figure(tmp_path: Path) -> None:
    """The ImageNet-shaped benchmark at tiny sizes: every section and goal reported, its
    figures finite and positive, one download of the images for a node of 2 ranks × 2
    workers over HTTP and none for a local set."""
    record = run_bench("scale_bench", "--smoke", out=tmp_path / "scale.json")
    assert record["meta"]["complete"] is True
    assert set(record) == {"meta", "relabel", "server", "client", "node", "report",
                           "projection", "goals"}  # fmt: skip
    relabel, server, client = record["relabel"], record["server"], record["client"]
    assert relabel["views"] == 256 * 2  # N x E went through the pipeline
    figures = [
        relabel["bare_samples_per_s"], relabel["pipeline_samples_per_s"],
        relabel["paired_ratio_pipeline_over_bare"], relabel["peak_rss_bytes"],
        relabel["stored_label_bytes_per_view"], server["stream_samples_per_s"],
        server["samples_per_server_cpu_s"], server["wire_bytes_per_sample"],
        *(client[part][f"{kind}_samples_per_s"] for part in ("loader", "stored")
          for kind in ("remote", "local")),
        client["loader"]["paired_remote_over_local"],
        *(record["report"][k] for k in ("read_seconds", "report_seconds", "verify_seconds")),
        *(v for k, v in record["projection"].items() if k != "node_image_memory_bytes"),
    ]  # fmt: skip
    assert all(math.isfinite(x) and x > 0 for x in figures), figures
    # at smoke sizes the images' memory is within the processes' noise: it may project < 0
    assert math.isfinite(record["projection"]["node_image_memory_bytes"])
    for kind, node in record["node"].items():
        assert node["set"]["processes"] == node["baseline"]["processes"] == 2 * (1 + 2)
        assert node["set"]["samples"] == node["baseline"]["samples"] == 256  # as many batches
        assert node["set"]["pss_bytes"]["cache_file"] > 0  # the workers map the cache file
        assert math.isfinite(node["memory_growth_over_image_bytes"])
        sent = node["image_bytes_sent_over_image_bytes"]
        assert (1.0 <= sent < 1.1) if kind == "remote" else sent == 0, (kind, sent)
    goals = {g["name"]: g for g in record["goals"]}
    assert {g["target"] for g in goals.values() if g["met"] is not None} == {
        ">= 0.9", "<= 1.25", "<= 1.1", "<= 3"
    }
    assert len([g for g in goals.values() if g["met"] is not None]) == 5
    assert all(math.isfinite(g["value"]) and math.isfinite(g["paired"]) for g in goals.values())
