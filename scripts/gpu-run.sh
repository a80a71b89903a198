#!/usr/bin/env bash
# Build, test and benchmark fluxq on the lent GPU machine in one run, writing
# logs and result tables under $OUT (at most 8 files).
#
#   scripts/gpu-run.sh [all|build|test|bench|multi]     (default: all)
#     build  unpack .deps/*.deb (cJSON is not installed there) and build for sm_90
#     test   build, then every test (the CUDA ones run on each GPU)
#     bench  build, then bench_quant on the CPU and every GPU (table + JSON)
#     all    build + test + bench
#     perf   build, then the CUDA tests of the FLUX and linear work (test_flux_cuda,
#            test_cuda_attention, test_cuda_linear, run side by side) and the FLUX step
#            benchmark (NF4 + double quant, also as a CUDA graph; again with --exact-gelu,
#            with the previous AdaLN kernel, and with dense bf16 weights; the SM clock
#            and power drawn during the NF4 step loop, and the driver's clock event reasons,
#            go to the summary)
#     multi-flux  for the 2-GPU machine: build, test_flux_cuda (cuda:0 vs cuda:1 and moves),
#            test_multi_gpu, and a FLUX.1-dev NF4 step benchmark on cuda:1 with nvidia-smi
#            asked meanwhile which GPUs hold the process (GPU 0 must not)
#     multi  for the 2-GPU machine: build, test_multi_gpu (with its
#            --only-cuda1 NVML / context check), test_cuda_quant --quick on both
#            GPUs, bench_quant on each GPU
#
# Files: build.log, test.log (the suite), cuda_tests.log (test_cuda_quant and
# test_multi_gpu in full), bench_quant.txt, bench_quant.json, multi.log, summary.txt. Exit status: 0 when every step that ran succeeded.
set -u
cd "$(dirname "$0")/.." || exit 2
WHAT="${1:-all}"
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
JOBS="$(nproc 2>/dev/null || echo 8)"
DEPS=/tmp/deps
SUMMARY="$OUT/summary.txt"
STATUS=0

note() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }

case "$WHAT" in all|build|test|bench|perf|multi|multi-flux) ;; *) echo "usage: $0 [all|build|test|bench|perf|multi|multi-flux]" >&2; exit 2 ;; esac

: > "$SUMMARY"
# The device's copy of the tree may carry an older .git: the sources' own hash
# (the same command on the development machine) says which tree was built.
src_hash() { find Makefile include src tests/*.c tests/*.h tests/support bench/*.c scripts -type f 2>/dev/null | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -c1-12; }
note "fluxq gpu-run: $WHAT, $(date -u +%Y-%m-%dT%H:%M:%SZ), git HEAD here $(git rev-parse --short HEAD 2>/dev/null || echo '?'), sources $(src_hash)"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,pci.bus_id,driver_version,memory.used,memory.total --format=csv 2>&1 | tee -a "$SUMMARY"
else
    note "nvidia-smi: not available"
fi

# ---- dependencies carried as .deb files: unpack under /tmp, never into / ----
if ls .deps/*.deb >/dev/null 2>&1; then
    mkdir -p "$DEPS"
    for d in .deps/*.deb; do dpkg -x "$d" "$DEPS" || note "dpkg -x $d failed"; done
fi
LIBDIR="$DEPS/usr/lib/x86_64-linux-gnu"
export LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
MAKEVARS=(CUDA_ARCHS=90 "EXTRA_CFLAGS=-I$DEPS/usr/include" "EXTRA_LDFLAGS=-L$LIBDIR -Wl,-rpath,$LIBDIR")

# ---- build ----
start=$(date +%s)
if make -j"$JOBS" "${MAKEVARS[@]}" > "$OUT/build.log" 2>&1; then
    note "build: ok ($(( $(date +%s) - start )) s)"
else
    note "build: FAILED (see build.log):"
    grep -E 'error:|undefined reference' "$OUT/build.log" | head -n 20 | tee -a "$SUMMARY"
    exit 1
fi
[ "$WHAT" = build ] && exit 0

# ---- tests ----
# The suite runs through tests/run.sh like `make test`, except the two GPU
# programs of this script's subject, which run directly so that their result
# lines (golden counts, CPU == CUDA, rcp table, 2^31 elements, NVML) are kept.
if [ "$WHAT" = all ] || [ "$WHAT" = test ]; then
    start=$(date +%s)
    SUITE=()
    for t in build/tests/test_*; do
        [ -f "$t" ] && [ -x "$t" ] || continue
        case "$(basename "$t")" in test_cuda_quant|test_multi_gpu) ;; *) SUITE+=("$t") ;; esac
    done
    if BUILD=build FLUXQ=build/fluxq tests/run.sh "${SUITE[@]}" > "$OUT/test.log" 2>&1; then r=ok; else r=FAILED; STATUS=1; fi
    note "test suite (${#SUITE[@]} programs): $r ($(( $(date +%s) - start )) s): $(tail -n 1 "$OUT/test.log")"
    grep -E '^(FAIL|CRASH)' "$OUT/test.log" | head -n 20 | tee -a "$SUMMARY"
    start=$(date +%s)
    {
        echo "== test_cuda_quant"; build/tests/test_cuda_quant; echo "exit $?"
        echo "== test_multi_gpu"; build/tests/test_multi_gpu; echo "exit $?"
    } > "$OUT/cuda_tests.log" 2>&1
    grep -q '^test_cuda_quant: .* 0 failed' "$OUT/cuda_tests.log" && grep -q '^test_multi_gpu: .* 0 failed' "$OUT/cuda_tests.log" \
        && r=ok || { r=FAILED; STATUS=1; }
    note "GPU quantization tests: $r ($(( $(date +%s) - start )) s)"
    grep -E '^(cuda:[0-9]+:|multi-gpu|only-cuda1|test_cuda_quant:|test_multi_gpu:|FAIL|skip)' "$OUT/cuda_tests.log" \
        | head -n 60 | tee -a "$SUMMARY"
fi

# ---- benchmarks ----
if [ "$WHAT" = all ] || [ "$WHAT" = bench ]; then
    if build/bench/bench_quant --json "$OUT/bench_quant.json" > "$OUT/bench_quant.txt" 2>&1; then r=ok; else r=FAILED; STATUS=1; fi
    note "bench_quant: $r"
    cat "$OUT/bench_quant.txt" >> "$SUMMARY"
fi

# ---- FLUX and linear work: its CUDA tests, then the step benchmark on an idle GPU ----
if [ "$WHAT" = perf ]; then
    start=$(date +%s)
    gpu_test() { # name, then the command; log in $OUT/<name>.log, last line "exit N"
        local name="$1"; shift
        { timeout 240 "$@"; echo "exit $?"; } > "$OUT/$name.log" 2>&1
    }
    gpu_test test_flux_cuda build/tests/test_flux_cuda &
    gpu_test test_cuda_linear build/tests/test_cuda_linear &
    { gpu_test test_cuda_attention build/tests/test_cuda_attention
      build/tests/test_cuda_quant --quick >> "$OUT/test_cuda_attention.log" 2>&1
      echo "test_cuda_quant --quick exit $?" >> "$OUT/test_cuda_attention.log"; } &
    wait
    note "CUDA tests ($(( $(date +%s) - start )) s):"
    for f in test_flux_cuda test_cuda_linear test_cuda_attention; do
        grep -E '^(test_[a-z_]+:|FAIL|CRASH|exit|test_cuda_quant)' "$OUT/$f.log" | tail -n 6 | tee -a "$SUMMARY"
        grep -q '0 failed' "$OUT/$f.log" && grep -q '^exit 0' "$OUT/$f.log" || STATUS=1
    done
    BF=(build/bench/bench_flux --config dev --random-weights --quantize nf4 --double-quant --profile)
    # the card's clock and power while the step benchmark runs (is it power-limited?)
    smi_log=/tmp/fluxq_smi_flux.csv
    nvidia-smi --query-gpu=clocks.sm,power.draw,power.limit,temperature.gpu,clocks.max.sm \
        --format=csv,noheader,nounits -lms 200 > "$smi_log" 2>/dev/null &
    smi_pid=$!
    # why the clock is below its maximum: the driver's clock event reasons (older drivers
    # call them throttle reasons), sampled the same way
    why_log=/tmp/fluxq_smi_why.csv why_q=""
    for pre in clocks_event_reasons clocks_throttle_reasons; do
        q="power.draw,power.limit,$pre.sw_power_cap,$pre.hw_slowdown,$pre.hw_power_brake_slowdown,$pre.sw_thermal_slowdown,$pre.hw_thermal_slowdown"
        if nvidia-smi --query-gpu="$q" --format=csv,noheader,nounits > /dev/null 2>&1; then why_q=$q; break; fi
    done
    why_pid=
    if [ -n "$why_q" ]; then
        nvidia-smi --query-gpu="$why_q" --format=csv,noheader,nounits -lms 200 > "$why_log" 2>/dev/null &
        why_pid=$!
    fi
    timeout 150 "${BF[@]}" --iters 10 --graph > "$OUT/bench_flux.txt" 2>&1 || STATUS=1
    kill "$smi_pid" $why_pid 2>/dev/null; wait "$smi_pid" $why_pid 2>/dev/null
    timeout 120 "${BF[@]}" --iters 5 --exact-gelu > "$OUT/bench_flux_exact_gelu.txt" 2>&1 || STATUS=1
    # baselines in the same call: the previous AdaLN kernel, and dense bf16 weights (no dequantization)
    FQ_ADALN=row timeout 120 "${BF[@]}" --iters 5 > "$OUT/bench_flux_adaln_row.txt" 2>&1 || STATUS=1
    timeout 150 build/bench/bench_flux --config dev --random-weights --profile --iters 5 \
        > "$OUT/bench_flux_bf16.txt" 2>&1 || STATUS=1
    note "bench_flux (NF4 + dq):"
    grep -E '^step|plan|peak|linears|attention|rest|by op|TFLOP' "$OUT/bench_flux.txt" | tee -a "$SUMMARY"
    # samples drawing > 60 % of the power limit = the step loop, not the model build
    awk -F', *' '$3 > 0 && $2 > 0.6 * $3' "$smi_log" > "$smi_log.busy"
    if [ -s "$smi_log.busy" ]; then
        n=$(wc -l < "$smi_log.busy")
        clk=$(cut -d, -f1 "$smi_log.busy" | sort -n | awk '{ c[NR] = $1 } END { printf "min %d / median %d / max %d", c[1], c[int((NR + 1) / 2)], c[NR] }')
        pw=$(awk -F', *' '{ p += $2; l = $3; m = $5; if ($4 > t) t = $4 } END { printf "(max %d), mean power %.0f W of a %.0f W limit, up to %d C", m, p / NR, l, t }' "$smi_log.busy")
        note "card during bench_flux ($n busy samples of 200 ms): SM clock $clk MHz, $pw"
    else
        note "card during bench_flux: no busy samples (nvidia-smi -lms gave nothing)"
    fi
    if [ -n "$why_q" ] && [ -s "$why_log" ]; then
        # busy samples (> 60 % of the power limit) in which each reason was active
        awk -F', *' '$2 > 0 && $1 > 0.6 * $2 { n++; for (i = 3; i <= 7; i++) if ($i ~ /^Active/) a[i]++ }
            END { if (n) printf "%d busy samples; active in them: SW power cap %d, HW slowdown %d, HW power brake %d, SW thermal %d, HW thermal %d\n",
                  n, a[3], a[4], a[5], a[6], a[7] }' "$why_log" > "$why_log.sum"
        note "clock event reasons during bench_flux: $(cat "$why_log.sum")"
    else
        note "clock event reasons during bench_flux: not available from nvidia-smi"
    fi
    note "bench_flux --exact-gelu:"
    grep -E '^step|linears|attention|rest' "$OUT/bench_flux_exact_gelu.txt" | tee -a "$SUMMARY"
    note "bench_flux with FQ_ADALN=row (the AdaLN kernel before 13fd0c5):"
    grep -E '^step|linears|attention|rest' "$OUT/bench_flux_adaln_row.txt" | tee -a "$SUMMARY"
    note "bench_flux, dense bf16 weights:"
    grep -E '^step|^weights|peak|linears|attention|rest' "$OUT/bench_flux_bf16.txt" | tee -a "$SUMMARY"
fi

# ---- two GPUs: the FLUX forward on cuda:1 leaves GPU 0 alone ----
if [ "$WHAT" = multi-flux ]; then
    { timeout 240 build/tests/test_flux_cuda; echo "exit $?"; } > "$OUT/test_flux_cuda.log" 2>&1 &
    { timeout 120 build/tests/test_multi_gpu; echo "exit $?"; } > "$OUT/multi.log" 2>&1 &
    wait
    for f in test_flux_cuda multi; do
        grep -E '^(test_[a-z_]+:|FAIL|CRASH|exit|only-cuda1)' "$OUT/$f.log" | tail -n 8 | tee -a "$SUMMARY"
        grep -q '0 failed' "$OUT/$f.log" && grep -q '^exit 0' "$OUT/$f.log" || STATUS=1
    done
    grep -E 'identical|cuda:1' "$OUT/test_flux_cuda.log" | head -n 12 | tee -a "$SUMMARY"
    build/bench/bench_flux --config dev --random-weights --quantize nf4 --double-quant --device cuda:1 --iters 200 \
        > "$OUT/bench_flux_cuda1.txt" 2>&1 &
    pid=$!
    sleep 8
    note "nvidia-smi while pid $pid runs a FLUX step loop on cuda:1 only:"
    nvidia-smi --query-gpu=index,pci.bus_id,memory.used --format=csv 2>&1 | tee -a "$SUMMARY"
    nvidia-smi --query-compute-apps=pid,gpu_bus_id,used_memory --format=csv 2>&1 | tee -a "$SUMMARY"
    bus0=$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader -i 0 2>/dev/null)
    if nvidia-smi --query-compute-apps=pid,gpu_bus_id --format=csv,noheader 2>/dev/null | grep "^$pid," | grep -qi "$bus0"; then
        note "GPU 0 ($bus0) lists pid $pid: FAILED"; STATUS=1
    else
        note "GPU 0 ($bus0) does not list pid $pid: ok"
    fi
    wait $pid || STATUS=1
    grep -E '^(device|step|plan|device memory)' "$OUT/bench_flux_cuda1.txt" | tee -a "$SUMMARY"
fi

# ---- two GPUs ----
if [ "$WHAT" = multi ]; then
    {
        echo "== test_multi_gpu"
        build/tests/test_multi_gpu; echo "exit $?"
        echo "== nvidia-smi after the run (nothing of ours should remain)"
        nvidia-smi --query-compute-apps=pid,gpu_bus_id,used_memory --format=csv 2>&1
        echo "== test_cuda_quant --quick (every GPU)"
        build/tests/test_cuda_quant --quick; echo "exit $?"
    } > "$OUT/multi.log" 2>&1
    grep -q '^test_multi_gpu: .* 0 failed' "$OUT/multi.log" && grep -q '^test_cuda_quant: .* 0 failed' "$OUT/multi.log" \
        && r=ok || { r=FAILED; STATUS=1; }
    note "multi: $r"
    grep -E '^(only-cuda1|multi-gpu|cuda:[0-9]+:|test_multi_gpu|test_cuda_quant|FAIL|CRASH|skip)' "$OUT/multi.log" | tee -a "$SUMMARY"
    if build/bench/bench_quant --device cuda --json "$OUT/bench_quant.json" > "$OUT/bench_quant.txt" 2>&1; then r=ok; else r=FAILED; STATUS=1; fi
    note "bench_quant (every GPU): $r"
    cat "$OUT/bench_quant.txt" >> "$SUMMARY"
fi
exit $STATUS
