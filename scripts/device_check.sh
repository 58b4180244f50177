#!/usr/bin/env bash
# The GPU checks, as one prepared command for a host lent for minutes (the `device` tool):
# install softserve beside the host's own torch, then run the named phases, each writing
# under $OUT (logs, JSON, JSON-lines results as they fill):
#
#   tests   the CUDA tests (tests/test_cuda.py, tests/test_views.py)        cuda_tests.log
#   bench   relabel_bench at bf16 on CUDA, against the bare teacher         relabel_bench_bf16.json
#   scale   scale_bench's relabel (ResNet-18, bf16, SCALE_EPOCHS) and serve   scale_bench_cuda.json
#           sections at 224 px, K = 1000: the two a GPU changes
#   loss    the loss study with --device cuda, for STUDY_SECONDS (420)      loss_study_cuda.jsonl
#   budget  the label-budget study with --device cuda, for STUDY_SECONDS    label_budget_cuda.jsonl
#   budget1000  the same at K = 1000 (--task triplets)                     label_budget_k1000_cuda.jsonl
#
# Stage first, here: scripts/device_wheels.sh (wheels in .whl/, Fashion-MNIST in .data/);
# then run there, e.g. (carry: .whl .data; the copy there has no git to name the commit):
#   SOFTSERVE_CODE_VERSION=<commit> scripts/device_check.sh tests bench loss
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
STUDY_SECONDS=${STUDY_SECONDS:-420}
SCALE_EPOCHS=${SCALE_EPOCHS:-20}
mkdir -p "$OUT"
# PYTHONSAFEPATH: `python -m` in this folder would import ./softserve, the source folder,
# over the installed package (whose softserve.client lives in clients/python)
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 PYTHONPATH=/tmp/softserve-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$PYTHONPATH" .whl/*.whl || exit 1
mkdir -p /usr/share/datasets/fashion-mnist && cp .data/*.gz /usr/share/datasets/fashion-mnist/
# the benchmarks run as modules of the bench package: this folder after the installed site,
# so that `softserve` still resolves to the installed package
BENCH_PATH="$PYTHONPATH:$PWD"
{ nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"; } \
  | tee "$OUT/gpu.txt"

status=0
for phase in "$@"; do
  case $phase in
    tests)
      python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_views.py \
        2>&1 | tee "$OUT/cuda_tests.log" || status=1 ;;
    bench)
      PYTHONPATH=$BENCH_PATH python3 -m bench.relabel_bench --device cuda --precision bf16 \
        --json "$OUT/relabel_bench_bf16.json" 2>&1 | tail -n 60 || status=1 ;;
    scale)
      PYTHONPATH=$BENCH_PATH python3 -m bench.scale_bench --device cuda --epochs "$SCALE_EPOCHS" \
        --sections relabel,serve --workdir /tmp/scale --json "$OUT/scale_bench_cuda.json" \
        > "$OUT/scale_bench.log" 2>&1 || status=1
      tail -n 30 "$OUT/scale_bench.log" ;;
    loss)
      PYTHONPATH=$BENCH_PATH timeout "$STUDY_SECONDS" python3 -m bench.studies.loss_study --device cuda --workers 8 \
        --threads 2 --workdir /tmp/study --out /tmp/study/out \
        --results "$OUT/loss_study_cuda.jsonl" > "$OUT/loss_study.log" 2>&1
      tail -n 5 "$OUT/loss_study.log" ;;
    budget|budget1000)
      task=fashion-mnist stem=label_budget
      [ "$phase" = budget1000 ] && task=triplets stem=label_budget_k1000
      PYTHONPATH=$BENCH_PATH timeout "$STUDY_SECONDS" python3 -m bench.studies.label_budget \
        --task "$task" --device cuda --workers 8 --threads 2 --workdir "/tmp/study-$task" \
        --out "/tmp/study-$task/out" --results "$OUT/${stem}_cuda.jsonl" > "$OUT/$stem.log" 2>&1
      tail -n 5 "$OUT/$stem.log" ;;
    *) echo "unknown phase $phase: tests, bench, scale, loss, budget or budget1000" >&2; exit 2 ;;
  esac
done
exit $status
