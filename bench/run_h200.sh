#!/usr/bin/env bash
# The H200 benchmark suite, section by section, as it is run through the workplace's device tool:
#   bench/run_h200.sh kernels e2e e2e-14b-extra   (wheels: .whl2 = av, diffusers, locust and their needs)
#   bench/run_h200.sh attention e2e-kernels       (after a kernel change: bench/attention.py, the DiT on it)
#   bench/run_h200.sh passes                      (launch sweeps of the passes: bench/passes.py)
#   bench/run_h200.sh repeat                      (second samples of those at 720p / 14B)
#   bench/run_h200.sh serve metrics load (wheels: .whl = Ray Serve, from shared/tools/gpu-wheelhouse;
#                                         .whl3 = pydantic-settings, python-multipart, redis)
# Wheels found in .whl*/ are installed into /tmp/site with the project itself; each section runs
# under its own time limit; logs, JSON and PNG results (machine paths scrubbed) travel back as one
# archive in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
logs=bench/results/logs
mkdir -p "$logs"
# Wheels not installed yet (a warm machine keeps /tmp/site and earlier calls' wheel folders).
installed=/tmp/site/.installed-wheels
touch "$installed" 2>/dev/null || { mkdir -p /tmp/site && touch "$installed"; }
wheels=$(for w in .whl*/*.whl; do [ -e "$w" ] && ! grep -qxF "$(basename "$w")" "$installed" && echo "$w"; done)
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
  for w in $wheels; do basename "$w"; done >>"$installed"
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . \
  >/dev/null 2>&1 || { echo "project install failed"; exit 1; }

run() {  # run NAME SECONDS COMMAND...: one benchmark, bounded, its log kept
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  echo "   rc=$? in $((SECONDS - start))s"
  tail -n 25 "$logs/$name.log"
}

for section in "$@"; do
  case $section in
    kernels)
      run attention 300 python3 bench/attention.py
      run w8a8 60 python3 bench/w8a8.py
      run fused_norm 60 python3 bench/fused_norm.py ;;
    attention)  # the attention kernels alone (bench/attention.py's own JSON and log)
      run attention 300 python3 bench/attention.py ;;
    passes)  # launch sweeps of the passes around the flash kernel (pooling, key pass, Sage's quantisation)
      run passes 200 python3 bench/passes.py ;;
    e2e)
      run e2e 420 python3 bench/e2e.py --budget-s 390 ;;
    e2e-kernels)  # the DiT with sla / sagesla at real sizes on the current kernels: 14B sampling, 1.3B request
      run e2e_kernels 320 python3 bench/e2e.py --cases 14b-720p,1.3b-480p --only 'build|/(sagesla|sla)/sampling$' \
        --budget-s 300 --out bench/results/e2e_kernels_h200.json
      run e2e_kernels_1.3b 170 python3 bench/e2e.py --cases 1.3b-480p --only 'build|/(sagesla|sla)/request$' \
        --budget-s 150 --out bench/results/e2e_kernels_1.3b_h200.json ;;
    repeat)  # a second sample of the numbers above that vary from lease to lease: attention at 720p, 14B sampling
      run attention_720p_repeat 200 python3 bench/attention.py --shapes 720p \
        --out bench/results/attention_h200_720p_repeat.json
      run e2e_kernels_repeat 250 python3 bench/e2e.py --cases 14b-720p --only 'build|/(sagesla|sla)/sampling$' \
        --budget-s 230 --out bench/results/e2e_kernels_h200_repeat.json ;;
    e2e-14b-extra)  # what e2e's budget leaves out at 14B: quant_linear and diffusers' transformer
      run e2e_14b 300 python3 bench/e2e.py --cases 14b-720p --only 'build|quant|diffusers' --budget-s 280 \
        --out bench/results/e2e_14b_h200.json ;;
    e2e-gelu)  # the FFN's GELU in the GEMM epilogue vs separate ops (14B), and the 1.3B request with it
      run e2e_gelu 300 python3 bench/e2e.py --only 'build|gelu|sagesla/(request|sampling)|vae_decode$' --budget-s 280 \
        --out bench/results/e2e_gelu_h200.json ;;
    serve)
      run serve 300 python3 bench/serve.py ;;
    metrics)
      run gpu_metrics 150 python3 bench/gpu_metrics.py --load jobs --jobs 4 --jobs-budget-s 60 --attention-type sagesla ;;
    load)
      run load 300 python3 bench/load_h200.py ;;
    *) echo "unknown section $section"; exit 2 ;;
  esac
done
bench/scrub_paths.sh bench/results/*.json "$logs"/*.log 2>/dev/null
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tgz" bench/results/*.json bench/results/*.png "$logs" 2>/dev/null
  ls -la "$OUT"
fi
