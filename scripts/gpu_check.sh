#!/usr/bin/env bash
# The GPU path checked and measured in one go (issue 16), in under 8 minutes on one H100/H200:
#
#   bash scripts/gpu_check.sh OUT_DIR          # from the repo root
#
# 0. CUDA first: no working nvidia-smi, or a torch that sees no GPU, exits 3 at once with one line.
# 1. setup: .venv if there is one; else python3 when it already holds torch (a GPU image: a new venv would
#    hide its CUDA torch); else a new .venv. Installs `.[gpu,serve,onnx]` + pytest/httpx with
#    constraints.txt from PyPI, or, where wheels were carried in .whl/, offline on top of the image's torch.
# 2. pytest -m gpu on the files that hold GPU tests; a skipped GPU test fails the step.
# 3. the demo with preset=gpu end to end, and the profiler report's GPU rules from its report/rules.json.
# 4. scripts/bench_train.py --device cuda: 224 px, 6,680 generated JPEGs, one row per added option.
# 5. scripts/bench_serve.py --device cuda: concurrency 1 and 16, dynamic batching on and off.
# OUT_DIR gets summary.md, env.log, one log per step and demo-rules.json: 8 files, no folders, because the
# device tool brings back at most 8 files from $OUT. Bulky outputs (run dirs, JPEGs, caches) go to
# $GPU_CHECK_WORK (default /tmp/dogbreed-gpu-check), kept so a rerun reuses the JPEGs. Every step runs under
# `timeout` within one overall budget ($GPU_CHECK_BUDGET_S, 460 s); a failed step is recorded and the next one
# runs; the exit status is 1 if any step failed. GPU_CHECK_COMPILE=1 adds bench_train's torch.compile row
# (about a minute more: over budget unless the others run fast).
#
# A machine with no package registry (the nvidia-h200 device machine has torch, lightning, onnxruntime,
# pytest and httpx, but not hydra or the server) needs the missing pure-Python wheels carried along. Here:
#   bash scripts/gpu_check.sh --fetch-wheels   # writes .whl/ (ignored by git); carry it: carry=[".whl"]
set -euo pipefail

WHEELS=(  # what the device image lacks; all pure Python, so wheels built here install on any CPython 3
    "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4" "antlr4-python3-runtime==4.9.*"  # the versions hydra 1.3 takes
    "starlette>=0.37" "uvicorn>=0.29" "nvidia-ml-py>=12"  # the server; NVML for the GPU utilisation figures
    "setuptools>=68"  # builds the editable install offline if the image's setuptools is older
)
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # pip wheel, not download: antlr4-python3-runtime 4.9 exists only as an sdist
    exec python3 -m pip wheel --no-deps -w .whl "${WHEELS[@]}"
fi
if [[ $# -ne 1 || "$1" == -* ]]; then
    echo "usage: bash scripts/gpu_check.sh OUT_DIR   (or --fetch-wheels, on a machine with PyPI)" >&2
    exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
WORK=${GPU_CHECK_WORK:-/tmp/dogbreed-gpu-check}
BUDGET=${GPU_CHECK_BUDGET_S:-460}  # seconds for everything; a step's timeout never runs past it
IMAGES=${GPU_CHECK_IMAGES:-6680}  # dogImages' training split; fewer only to try the script out
SUMMARY=$OUT/summary.md
ROWS=()      # the summary's step table
SECTIONS=()  # markdown that follows it
FAILED=0
FAIL_WHY=""  # set by a step that exited 0 but failed a check

no_cuda() {
    local msg="gpu_check: no CUDA GPU here ($1); nothing was run. Run it on a machine with an NVIDIA GPU."
    echo "$msg" >&2
    printf '# dogbreed GPU check\n\n%s\n' "$msg" >"$SUMMARY"
    exit 3
}

# --- 0. CUDA first -----------------------------------------------------------------------------------------
command -v nvidia-smi >/dev/null 2>&1 || no_cuda "nvidia-smi not found"
timeout 30 nvidia-smi >"$OUT/env.log" 2>&1 || no_cuda "nvidia-smi failed: $(tail -n 1 "$OUT/env.log")"

if [[ -x .venv/bin/python ]]; then
    PY=$PWD/.venv/bin/python
elif python3 -c "import torch" 2>/dev/null; then
    PY=$(command -v python3)
else
    python3 -m venv .venv || { echo "gpu_check: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 4; }
    PY=$PWD/.venv/bin/python
fi
cuda_check() {
    timeout 60 "$PY" -c "import torch; assert torch.cuda.is_available(), torch.__version__" >/dev/null 2>&1 ||
        no_cuda "$PY: torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing) sees no GPU"
}
if "$PY" -c "import torch" 2>/dev/null; then cuda_check; fi  # before spending time on the install

export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1 DOGBREED_CACHE=$WORK/cache
mkdir -p "$WORK"
(cd "$OUT" && rm -f summary.md setup.log pytest.log demo.log bench-train.log bench-serve.log demo-rules.json)

# run_step NAME LOG LIMIT_S COMMAND...: COMMAND under timeout (its group killed on expiry), output to LOG;
# sets RC and TOOK; never stops the script.
run_step() {
    local name=$1 log=$2 limit=$3
    shift 3
    local left=$((BUDGET - SECONDS))  # bash's SECONDS: since the script started
    ((limit <= left)) || limit=$left
    TOOK=0
    if ((limit < 15)); then
        RC=125
        echo "skipped: the overall budget of ${BUDGET} s was spent" >>"$OUT/$log"
        return 0
    fi
    echo "== $name (at most ${limit} s): $*" | tee -a "$OUT/$log" >&2
    local t0=$SECONDS
    RC=0
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1 || RC=$?
    TOOK=$((SECONDS - t0))
    echo "== $name: exit $RC after ${TOOK} s" >&2
}

last_line() {  # of a log, for a table cell: no blank lines, rules of '=' or pipes
    grep -v '^\s*$' "$1" | tail -n 1 | sed 's/^[= ]*//; s/[= ]*$//' | cut -c1-160 | tr '|' '/'
}

# record NAME LOG DETAIL: one row of the step table from RC (a non-empty FAIL_WHY fails a step that exited 0)
record() {
    local name=$1 log=$2 detail=$3 result
    if ((RC == 0)) && [[ -z "${FAIL_WHY:-}" ]]; then
        result="ok"
    else
        FAILED=1
        case $RC in
            0) result="**failed**: $FAIL_WHY" ;;
            124 | 137) result="**timed out** after ${TOOK} s" ;;
            125) result="**skipped**: out of time" ;;
            *)
                result="**failed** (exit $RC)"
                [[ "$(last_line "$OUT/$log")" == "$detail" ]] || result+=": $(last_line "$OUT/$log")"
                ;;
        esac
    fi
    ROWS+=("| $name | $result | $detail | ${TOOK} s | $log |")
    FAIL_WHY=""
}

# --- 1. setup ----------------------------------------------------------------------------------------------
# shellcheck disable=SC2317  # reached through bash -c
setup() {  # run by `bash -c` under timeout, which cannot run a function itself
    set -euxo pipefail
    if compgen -G ".whl/*.whl" >/dev/null; then
        # no registry: the carried wheels, then dogbreed itself, on top of what the environment holds
        "$PY" -m pip install -q --no-index --no-deps .whl/*.whl
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . ||
            "$PY" -m pip install -q --no-index --no-deps --find-links .whl -e .
    else
        "$PY" -m pip install -q --retries 2 --timeout 30 -e ".[gpu,serve,onnx]" pytest httpx -c constraints.txt
    fi
    set +x
    "$PY" - <<'EOF'
import importlib, platform, sys
import torch, torchvision
missing = []
for name in ("dogbreed.train", "hydra", "lightning", "pytest", "pynvml", "starlette", "uvicorn", "httpx", "onnxruntime"):
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - name each one that is missing, then fail
        missing.append(f"{name} ({type(err).__name__}: {err})")
print(f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"torchvision {torchvision.__version__}")
if missing:
    sys.exit("missing: " + "; ".join(missing))
EOF
}
export -f setup
export PY
run_step "setup" setup.log 150 bash -c setup
record "setup: install, imports" setup.log "$(grep -m1 '^Python ' "$OUT/setup.log" || echo "$PY")"
cuda_check  # the install may have replaced torch

{
    echo
    "$PY" - <<'EOF'
import torch, torchvision
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"torchvision {torchvision.__version__}")
print(f"{p.name}: {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
EOF
    echo "python: $PY ($("$PY" --version 2>&1))"
    echo "CPUs: $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    free -g | head -n 2
    git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -n 20
} >>"$OUT/env.log" 2>&1 || true
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
VERSIONS=$(grep -m1 '^torch ' "$OUT/env.log" || grep -m1 '^Python ' "$OUT/setup.log" || true)

# bench_train's JPEGs (6,680, about a minute on one core) are generated while the GPU tests run
BENCH=$WORK/bench-train
GEN_LOG=$WORK/generate.log
timeout 200 "$PY" -c "import sys; from pathlib import Path; sys.path.insert(0, 'scripts')
from bench_train import prepare_images; prepare_images(Path(sys.argv[1]), int(sys.argv[2]))" "$BENCH" "$IMAGES" >"$GEN_LOG" 2>&1 &
GEN_PID=$!

# --- 2. pytest -m gpu --------------------------------------------------------------------------------------
mapfile -t GPU_TESTS < <(grep -l "mark\.gpu" tests/test_*.py)  # only these: the others need the dev extras
run_step "pytest" pytest.log 120 "$PY" -m pytest -m gpu -rs -p no:cacheprovider "${GPU_TESTS[@]}"
TALLY=$(grep -E '^=+ .*(passed|failed|error|skipped|deselected).* in [0-9.]+s' "$OUT/pytest.log" | tail -n 1 | tr -d '=' |
    sed 's/^ *//; s/ *$//' || true)
if grep -qE '[0-9]+ skipped' <<<"$TALLY"; then
    FAIL_WHY="a GPU test was skipped (see SKIPPED in the log)"
elif ! grep -qE '[0-9]+ passed' <<<"$TALLY"; then
    FAIL_WHY="no GPU test passed"
fi
record "pytest -m gpu" pytest.log "${TALLY:-no tally}"

# the demo's CPU-side rules (CPUBottleneck, Dataloader) should not see the generator
wait "$GEN_PID" || echo "generating the JPEGs failed or timed out: bench_train generates them itself" >>"$GEN_LOG"

# --- 3. demo with preset=gpu -------------------------------------------------------------------------------
DEMO=$WORK/demo-gpu
rm -rf "$DEMO"
run_step "demo" demo.log 120 "$PY" -m dogbreed.train experiment=demo preset=gpu "hydra.run.dir=$DEMO"
RULES=$DEMO/report/rules.json
if [[ -f "$RULES" ]]; then
    cp "$RULES" "$OUT/demo-rules.json"
    SECTIONS+=("$("$PY" - "$RULES" "$DEMO/metrics.json" <<'EOF' || echo "(could not read $RULES)"
import json, sys
from pathlib import Path
rules = {r["name"]: r for r in json.loads(Path(sys.argv[1]).read_text())}
metrics = Path(sys.argv[2])
acc = json.loads(metrics.read_text()).get("test/acc") if metrics.is_file() else None
print("## Demo with preset=gpu: the profiler's GPU rules\n")
print(f"`python -m dogbreed.train experiment=demo preset=gpu`: test/acc {acc if acc is None else f'{acc:.3f}'}. "
      "Every rule is in demo-rules.json.\n")
print("| rule | status | message |\n| --- | --- | --- |")
for name in ("LowGPUUtilization", "Dataloader", "CPUBottleneck", "BatchSize", "GPUMemoryIncrease"):
    r = rules.get(name, {"status": "absent from rules.json", "message": ""})
    status = f"**{r['status']}**" if r["status"] == "IssuesFound" else r["status"]
    print(f"| {name} | {status} | {r['message'].replace('|', '/')} |")
EOF
)")
    DEMO_DETAIL=$(grep -o 'test/acc [0-9.]*' <<<"${SECTIONS[-1]}" || echo "see demo.log")
else
    [[ $RC -ne 0 ]] || FAIL_WHY="no report/rules.json was written"
    DEMO_DETAIL="no report"
fi
record "demo, preset=gpu" demo.log "$DEMO_DETAIL"

# --- 4. bench_train --device cuda --------------------------------------------------------------------------
TRAIN_ARGS=(--device cuda --image-size 224 --images "$IMAGES" --steps 150 --warmup 15 --out-dir "$BENCH" --markdown)
TRAIN_LIMIT=170
if [[ "${GPU_CHECK_COMPILE:-0}" == 1 ]]; then
    TRAIN_ARGS+=(--compile)
    TRAIN_LIMIT=260
fi
cat "$GEN_LOG" >>"$OUT/bench-train.log"
run_step "bench_train" bench-train.log "$TRAIN_LIMIT" "$PY" scripts/bench_train.py "${TRAIN_ARGS[@]}"
TABLE=$(awk '/^\| options \(cumulative\)/ { on = 1 } on && /^\|/ { print; next } on { exit }' "$OUT/bench-train.log")
if [[ -z "$TABLE" ]]; then  # timed out or failed part-way: the rows it finished
    TABLE=$(grep -E '^  .*: [0-9,]+ images/s$' "$OUT/bench-train.log" | sed 's/^  /- /' || true)
fi
SECTIONS+=("## Training throughput: \`bench_train.py ${TRAIN_ARGS[*]}\`

ResNet-18 at 224 px, batch 256, ${IMAGES} generated training JPEGs (about 500x375, quality 90), options added row by row;
the goal row (preset=gpu): >= 12,000 images/s, GPU utilisation >= 90 %, data wait < 5 %.

${TABLE:-no rows: see bench-train.log}

$(grep -E '; ResNet-18 at |^(goal:|decoded-image cache ready|GPU util: n/a)' "$OUT/bench-train.log" | sed 's/^/- /' || true)")
record "bench_train --device cuda" bench-train.log "$(grep -m1 -o 'goal: .*' "$OUT/bench-train.log" | grep -o '[0-9,]* images/s, .*met' || echo "see the table")"

# --- 5. bench_serve on the GPU -----------------------------------------------------------------------------
SERVE_JSON=$WORK/bench-serve.json
rm -f "$SERVE_JSON"
run_step "bench_serve" bench-serve.log 90 "$PY" scripts/bench_serve.py --device cuda --requests 600 --json "$SERVE_JSON"
if [[ -f "$SERVE_JSON" ]]; then
    SECTIONS+=("$("$PY" - "$SERVE_JSON" <<'EOF' || echo "(could not read $SERVE_JSON)"
import json, sys
r = json.load(open(sys.argv[1]))
print("## Serving on the GPU: `bench_serve.py --device cuda --requests 600`\n")
print(f"Random 133-class ResNet-18 at 224 px, eager on {r['device']}, one JPEG photo per request, "
      f"{r['threads']} threads on {r['cpus']} CPUs (ONNX Runtime on the CPU).\n")
print("| measure | result |\n| --- | --- |")
rows = [
    ("bare eager forward, batch 1", f"p50 {r['bare_eager_ms']:.2f} ms"),
    ("bare eager forward, batch 16", f"{r['bare_eager_b16_ms_per_image']:.2f} ms per image"),
    ("HTTP, concurrency 1, batching on", f"p50 {r['http_c1_p50_ms']:.1f} ms, p99 {r['http_c1_p99_ms']:.1f} ms"),
    ("HTTP, concurrency 1, batching off",
     f"p50 {r['http_c1_unbatched_p50_ms']:.1f} ms, p99 {r['http_c1_unbatched_p99_ms']:.1f} ms"),
    ("concurrency 16, batching off", f"{r['c16_unbatched_img_s']:.0f} images/s, p99 {r['c16_unbatched_p99_ms']:.1f} ms"),
    ("concurrency 16, batching on",
     f"{r['c16_batched_img_s']:.0f} images/s, p99 {r['c16_batched_p99_ms']:.1f} ms, mean batch {r['c16_mean_batch']:.1f}"),
    ("batched / unbatched at concurrency 16", f"**{r['ratio_batched_over_unbatched']:.2f}x** (goal >= 3x)"),
    ("HTTP p50 / bare forward (eager)", f"{r['ratio_http_p50_over_bare']:.2f}x"),
    ("bare ONNX Runtime (CPU), batch 1", f"p50 {r['bare_onnx_ms']:.1f} ms"),
]
for name, value in rows:
    print(f"| {name} | {value} |")
EOF
)")
    SERVE_DETAIL="batched/unbatched $(grep -o '\*\*[0-9.]*x\*\*' <<<"${SECTIONS[-1]}" | tr -d '*' || echo '?') at concurrency 16"
else
    SERVE_DETAIL="no figures"
fi
record "bench_serve --device cuda" bench-serve.log "$SERVE_DETAIL"

# --- summary -----------------------------------------------------------------------------------------------
{
    echo "# dogbreed GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'); GPU: ${GPU:-unknown}; CPU: $(nproc) x ${CPU:-unknown}; ${VERSIONS}."
    echo "It took ${SECONDS} s in all (budget ${BUDGET} s). Logs beside this file; env.log: nvidia-smi and versions."
    echo
    echo "| step | result | detail | time | log |"
    echo "| --- | --- | --- | ---: | --- |"
    printf '%s\n' "${ROWS[@]}"
    for section in "${SECTIONS[@]}"; do
        printf '\n%s\n' "$section"
    done
} >"$SUMMARY"
echo "gpu_check: $( ((FAILED)) && echo "a step failed" || echo "every step passed"); see $SUMMARY" >&2
exit "$FAILED"
