#!/usr/bin/env bash
# The GPU report and the asv history, as device calls (the working tree is copied; its .git
# there can be an older snapshot; no network).
#
#   bash scripts/device_bench.sh report [flashtile.bench options]   # e.g. --dtypes fp16
#   bash scripts/device_bench.sh asv [scripts/asv_record.sh options] # e.g. --budget 480 --skip-existing
#
# report: installs flashtile from this tree (the CUDA reference for sm_90 only), runs
#   python -m flashtile.bench --out /tmp/report, and packs it into $OUT/report.tgz (bench.json,
#   the PNGs, bench.log). FLASHTILE_COMMIT should name the commit (without it bench.json records
#   the machine's HEAD, marked "+changes" where the tree differs from it).
# asv: installs the carried asv wheels (.whl/asv, `pip download` them here first) into
#   /tmp/site, records the kernel commits from the carried bare mirror (.asv_mirror.git) into
#   asv_bench/results/h100/, and packs that folder into $OUT/asv_results.tgz (the log: $OUT/asv_record.log).
# A time limit (REPORT_LIMIT, default 540 s) stops the report early enough to pack what it has:
# bench.json is rewritten after every point.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results_tmp}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
what=${1:?report or asv}; shift
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
case $what in
  report)
    python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
    python3 -c "import flashtile.bench as b; print('cuda reference built:', b.cuda_reference_built())"
    mkdir -p /tmp/report
    timeout "${REPORT_LIMIT:-540}" python3 -m flashtile.bench --out /tmp/report "$@" 2>&1 \
      | tr '\r' '\n' | grep -v '%|' | tee /tmp/report/bench.log
    status=${PIPESTATUS[0]}
    if [[ ! -f /tmp/report/fwd_latency.png && -f /tmp/report/bench.json ]]; then  # stopped early: plot what there is
      python3 -m flashtile.bench --from-json /tmp/report/bench.json --out /tmp/report >/dev/null
    fi
    tar -czf "$OUT/report.tgz" -C /tmp/report .
    exit "$status" ;;
  asv)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/asv/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    python3 -m asv --version
    bash scripts/asv_record.sh --mirror .asv_mirror.git "$@" 2>&1 | tee "$OUT/asv_record.log"
    status=${PIPESTATUS[0]}
    tar -czf "$OUT/asv_results.tgz" asv_bench/results
    exit "$status" ;;
  *) echo "unknown: $what (report or asv)" >&2; exit 2 ;;
esac
