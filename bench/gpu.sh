#!/usr/bin/env bash
# The one command for a lent GPU machine (one H100/H200, 16 cores, its own Python, torch and triton,
# no network): build, test, benchmark, and leave every log and table under $OUT, in under 8 minutes.
#
#   bash bench/gpu.sh              # on the GPU machine; OUT defaults to bench/results/gpu-run
#   bash bench/gpu.sh --dry-run    # the same steps on CPU at toy sizes (TRITON_INTERPRET=1), about a
#                                  # minute; OUT defaults to a fresh temp dir. `make test` runs it.
#   PY=.venv/bin/python bash bench/gpu.sh --dry-run    # the Python to use (default: python3)
#
# Steps, in order; each one's failure is logged and recorded, and none stops a later one (except a
# failed build: nothing can run without alignops._C). Each runs under `timeout` (SIGINT first, so
# pytest and the benchmarks still print what they measured) with its own cap, and no step starts
# past the run's deadline (GPU_SH_BUDGET seconds, default 450):
#   env          nvidia-smi, Python/torch/triton/transformers versions, peers present -> env.txt;
#                wheels carried in .whl/ are installed to /tmp/site (PYTHONPATH) first
#   build        pip install --no-build-isolation --no-deps -e . (MAX_JOBS=16) -> build.log, then
#                python -m alignops.env -> env.txt (dry run: skipped when alignops._C is current)
#   tests-gpu    the op test files, GPU tests included, backends cpu,triton,cuda required
#                (ALIGNOPS_REQUIRE_BACKENDS), pytest-xdist -n 8 when present, no -x -> tests-gpu.log
#   bench:*      token_logprobs and fused GRPO (policy_loss) with the copy floor (dst.copy_(logits)
#                in the same process: %_of_copy), fused lm_head against the bare GEMMs, its bf16 tile
#                (fp32 accumulator against rounded: time, error vs float64), the distillation losses
#                against Liger's and TRL's (alternated rounds); Liger and TRL rows where they
#                import -> bench.log, tables
#   ddp          2 ranks of the reference trainer under torchrun (nccl), only with 2+ GPUs (dry run:
#                gloo on CPU) -> tests-rest.log
#   ddp:trl      TRL's GRPOTrainer at 2 ranks (nccl, one GPU each): stock, use_alignops() and
#                AlignopsGRPOTrainer equal step by step (tests/test_integration_trl_distributed.py with
#                ALIGNOPS_TRL_DIST_DEVICE=cuda), only with 2+ GPUs (dry run: collected, not run; make
#                test runs it on CPU with gloo) -> tests-rest.log
#   rest:*       every other test file, by group (integrations, then the rest): trainer and
#                integration tests may fail on the machine's transformers; that is recorded as a
#                failure of a rest:* step, after the op tests and benchmarks are done -> tests-rest.log
# Under $OUT (at most 8 files come back from the machine): summary.txt (each step, exit code,
# seconds; the headline numbers), env.txt, build.log, tests-gpu.log, bench.log, tests-rest.log,
# tables.md (every benchmark table) and results.tgz (the tables as csv/md/png).
# Exit status: 0 when every step passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$arg' (--dry-run, --help)" >&2; exit 2 ;;
  esac
done

PY=${PY:-python3}
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/alignops-gpu-dry.XXXXXX")}
else
  OUT=${OUT:-bench/results/gpu-run}
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "gpu.sh: cannot create OUT=$OUT" >&2; exit 2; }
TABLES=$OUT/tables
rm -rf "$TABLES" && rm -f "$OUT"/{summary.txt,env.txt,build.log,tests-gpu.log,bench.log,tests-rest.log,tables.md,results.tgz}
mkdir -p "$TABLES"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/alignops-gpu-work.XXXXXX")

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
unset ALIGNOPS_REQUIRE_INTEGRATIONS ALIGNOPS_BACKEND ALIGNOPS_CPU_ISA ATEN_CPU_CAPABILITY
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 ALIGNOPS_BENCH_MACHINE=${ALIGNOPS_BENCH_MACHINE:-dryrun}
  unset ALIGNOPS_TEST_GPU
  BUDGET=${GPU_SH_BUDGET:-240}
  REQUIRE=cpu,triton
  JOBS=$(nproc 2>/dev/null || echo 2)
  WORKERS=1                                        # 2 shared cores: xdist's start-up costs more than it saves
  # caps in seconds
  CAP_ENV=60 CAP_BUILD=900 CAP_GPU_TESTS=90 CAP_BENCH=60 CAP_DDP=60 CAP_REST=60
  BENCH_ARGS=(--device cpu --isa here --reps 1)   # in this process, as on the GPU
  SIZE_LP=N=64,V=1000 SIZE_PL=N=64,V=1000,T=32 SIZE_FL=N=64,H=64,V=1000 SIZE_TILE=N=64,H=64,V=1000
  SIZE_DIST=N=64,H=64,V=1000 DIST_ARGS=(--rounds 1)
  SKIP_LP=compile SKIP_FL='*compiled*'
  TEST_SELECT=(-k test_value_loss)                 # collect every op file, run one small one
  DDP_DEVICE=cpu BENCH_DEVICE=cpu
else
  unset TRITON_INTERPRET
  export ALIGNOPS_TEST_GPU=1
  BUDGET=${GPU_SH_BUDGET:-450}
  REQUIRE=cpu,triton,cuda
  JOBS=16
  WORKERS=8
  CAP_ENV=60 CAP_BUILD=150 CAP_GPU_TESTS=150 CAP_BENCH=90 CAP_DDP=60 CAP_REST=180
  BENCH_ARGS=(--device cuda)
  # the headline shapes: N=8192 tokens (32 x 256), Qwen's vocabulary, H=4096; bf16
  SIZE_LP=N=8192,V=151936 SIZE_PL=N=8192,V=151936,T=256 SIZE_FL=N=8192,H=4096,V=151936
  SIZE_TILE=N=4096,H=896,V=151936
  SIZE_DIST=N=4096,H=4096,V=151936 DIST_ARGS=(--rounds 3 --dtype bfloat16)
  # torch.compile of the eager paths costs a minute of compiling: left out; Liger's compiled loss stays
  SKIP_LP=compile SKIP_FL=''
  TEST_SELECT=()
  DDP_DEVICE=cuda BENCH_DEVICE=cuda
fi
DEADLINE=$((SECONDS + BUDGET))

# the op test files (tests-gpu); every other tests/test_*.py belongs to rest
OP_TESTS=(test_token_logprobs.py test_policy_loss.py test_policy_epilogue.py test_mask_semantics.py
          test_fused_linear.py test_advantages.py test_cuda_kernels.py test_triton_kernels.py test_value_loss.py
          test_sft.py test_preference.py test_vocab_parallel.py test_no_silent_fallback.py test_distill.py)

SUMMARY_ROWS=()
FAILED=0
say() { echo "[gpu.sh $(date +%T) +$((SECONDS))s] $*"; }

record() {  # record NAME RC SECONDS NOTE
  local status=ok
  if [ "$2" = skip ]; then status=skipped; elif [ "$2" != 0 ]; then status=FAILED; FAILED=1; fi
  [ "$2" = 124 ] && status="FAILED (timed out)"
  SUMMARY_ROWS+=("$(printf '%-22s %-20s rc=%-4s %4ss  %s' "$1" "$status" "$2" "$3" "$4")")
  say "$1: $status (rc=$2, $3 s) $4"
}

# run_step NAME CAP LOG CMD...: CMD under `timeout` (the smaller of CAP and the time to the deadline),
# output appended to LOG; records the exit code (124: timed out) and the duration.
run_step() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$((DEADLINE - SECONDS))
  local t=$((cap < left ? cap : left))
  if [ "$t" -lt 10 ]; then
    record "$name" 124 0 "not started: ${left}s left before the ${BUDGET}s deadline"
    return 124
  fi
  say "$name: start (timeout ${t}s) -> $(basename "$log")"
  printf '\n===== %s (timeout %ss): %s\n' "$name" "$t" "$*" >> "$log"
  local t0=$SECONDS rc
  # in the background, so that a signal to this script is handled at once (on_signal), not after the step
  timeout -s INT -k 20 "$t" "$@" >> "$log" 2>&1 &
  CHILD=$! CHILD_STEP=$name CHILD_T0=$t0
  wait "$CHILD"
  rc=$?
  CHILD=
  printf '===== %s: exit %s after %ss\n' "$name" "$rc" "$((SECONDS - t0))" >> "$log"
  record "$name" "$rc" "$((SECONDS - t0))" "(cap ${cap}s)"
  if [ "$rc" != 0 ]; then tail -n 25 "$log" | sed 's/^/    | /'; fi
  return "$rc"
}

pytest_args() {  # the options every pytest step shares
  PYTEST_COMMON=(-p no:cacheprovider -ra --tb=short --continue-on-collection-errors --durations=15)  # -q: pyproject
  if [ "$WORKERS" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then PYTEST_COMMON+=(-n "$WORKERS"); fi
}

finish() {
  trap - EXIT INT TERM
  {
    echo "bash bench/gpu.sh $([ "$DRY" = 1 ] && echo --dry-run)  (PY=$PY, OUT=$OUT, budget ${BUDGET}s, took ${SECONDS}s)"
    echo
    printf '%s\n' "${SUMMARY_ROWS[@]}"
    echo
    if [ "$FAILED" = 0 ]; then echo "RESULT: every step passed"; else
      echo "RESULT: FAILED: $(printf '%s\n' "${SUMMARY_ROWS[@]}" | awk '$2 ~ /FAILED/ {print $1}' | paste -sd ' ')"
      echo "        (rest:* = trainer/integration tests, after the op tests and benchmarks)"
    fi
    echo
    if ls "$TABLES"/*.csv >/dev/null 2>&1; then
      "$PY" -m bench.harness headline "$TABLES" 2>&1 || echo "(headline not written)"
    fi
  } > "$OUT/summary.txt"
  if ls "$TABLES"/* >/dev/null 2>&1; then
    for f in "$TABLES"/*.md; do [ -e "$f" ] && { cat "$f"; echo; }; done > "$OUT/tables.md"
    tar czf "$OUT/results.tgz" -C "$OUT" tables
  fi
  rm -rf "$TABLES" "$WORK"
  echo
  cat "$OUT/summary.txt"
  echo
  say "files under $OUT: $(cd "$OUT" && ls | paste -sd ' ')"
  exit "$FAILED"
}
CHILD=
on_signal() {  # the running step gets SIGINT (pytest and the benchmarks then write what they have)
  trap - INT TERM
  say "interrupted"
  if [ -n "$CHILD" ]; then
    kill -INT "$CHILD" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$CHILD" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$CHILD" 2>/dev/null  # timeout leads its own process group
    record "$CHILD_STEP" 130 $((SECONDS - CHILD_T0)) "interrupted (gpu.sh got a signal)"
  fi
  FAILED=1
  exit 1
}
trap finish EXIT
trap on_signal INT TERM

say "$([ "$DRY" = 1 ] && echo 'DRY RUN (CPU, toy sizes)' || echo 'GPU run'): PY=$PY OUT=$OUT budget ${BUDGET}s"

# ---------------------------------------------------------------------------------------- env
t0=$SECONDS
{
  echo "# bench/gpu.sh $([ "$DRY" = 1 ] && echo --dry-run) $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  if [ "$DRY" = 0 ]; then
    timeout 30 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
    timeout 30 nvidia-smi -L
  fi
  echo "nproc $(nproc 2>/dev/null); ninja: $(command -v ninja || echo none); nvcc: $(command -v nvcc || echo none)"
} >> "$OUT/env.txt" 2>&1
if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1 && [[ ":${PYTHONPATH:-}:" != *":/tmp/site:"* ]]; then
  echo "installing the carried wheels: $(ls .whl/*.whl | xargs -n1 basename | paste -sd ' ')" >> "$OUT/env.txt"
  if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target /tmp/site .whl/*.whl >> "$OUT/env.txt" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "the carried wheels did not install (peers left out)" >> "$OUT/env.txt"
  fi
fi
timeout "$CAP_ENV" "$PY" - >> "$OUT/env.txt" 2>&1 <<'EOF'
import importlib, importlib.metadata as md, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for dist in ("triton", "transformers", "numpy", "pytest", "pytest-xdist", "hypothesis", "accelerate",
             "trl", "verl", "liger-kernel", "openrlhf", "setuptools", "pip", "ninja"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} -")
EOF
rc=$?
record env "$rc" $((SECONDS - t0)) "-> env.txt"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

# ---------------------------------------------------------------------------------------- build
C_CURRENT="import sys; from alignops import _backend as b; c = b.load_c(); print(b.build_info()); sys.exit(0 if c is not None and b.cpu_error() is None else 1)"
if [ "$DRY" = 1 ] && "$PY" -c "$C_CURRENT" >> "$OUT/build.log" 2>&1; then
  record build skip 0 "alignops._C imports and is current (dry run: not rebuilt)"
  build_rc=0
else
  # no isolated build env, no dependencies, no index: nothing is downloaded; PIP_BREAK_SYSTEM_PACKAGES
  # lets pip install into a system Python (PEP 668); older pips ignore it
  build_t0=$SECONDS
  MAX_JOBS=$JOBS PIP_BREAK_SYSTEM_PACKAGES=1 run_step build "$CAP_BUILD" "$OUT/build.log" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
  build_rc=$?
  [ "$DRY" = 1 ] && DEADLINE=$((DEADLINE + SECONDS - build_t0))  # a dry run's budget is for the toy steps
  if [ "$build_rc" = 0 ]; then
    "$PY" -c "$C_CURRENT" >> "$OUT/build.log" 2>&1 || { build_rc=1; record build-check 1 0 "alignops._C does not load after the build"; }
  fi
fi
echo "--- python -m alignops.env" >> "$OUT/env.txt"
timeout 60 "$PY" -m alignops.env >> "$OUT/env.txt" 2>&1
if [ "$build_rc" != 0 ]; then
  for s in tests-gpu bench ddp rest; do record "$s" skip 0 "not run: the build failed (build.log)"; done
  exit 1
fi

# ---------------------------------------------------------------------------------------- tests-gpu
pytest_args
ops=()
for f in "${OP_TESTS[@]}"; do
  if [ -e "tests/$f" ]; then ops+=("tests/$f"); else
    echo "gpu.sh: op test file tests/$f is gone: update OP_TESTS in bench/gpu.sh" >> "$OUT/tests-gpu.log"
    record "tests-gpu:$f" 1 0 "missing: update OP_TESTS in bench/gpu.sh"
  fi
done
ALIGNOPS_REQUIRE_BACKENDS=$REQUIRE HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci} \
  run_step tests-gpu "$CAP_GPU_TESTS" "$OUT/tests-gpu.log" \
  "$PY" -m pytest "${ops[@]}" "${PYTEST_COMMON[@]}" "${TEST_SELECT[@]}"

# ---------------------------------------------------------------------------------------- benchmarks
run_step bench:token_logprobs "$CAP_BENCH" "$OUT/bench.log" \
  "$PY" -m bench.bench_token_logprobs "${BENCH_ARGS[@]}" --size "$SIZE_LP" --skip-impls "$SKIP_LP" --out-dir "$TABLES"
run_step bench:policy_loss "$CAP_BENCH" "$OUT/bench.log" \
  "$PY" -m bench.bench_policy_loss "${BENCH_ARGS[@]}" --size "$SIZE_PL" --skip-impls "$SKIP_LP" --out-dir "$TABLES"
run_step bench:fused_linear "$CAP_BENCH" "$OUT/bench.log" \
  "$PY" -m bench.bench_fused_linear "${BENCH_ARGS[@]}" --size "$SIZE_FL" --skip-impls "$SKIP_FL" --out-dir "$TABLES"
run_step bench:tile_precision "$CAP_BENCH" "$OUT/bench.log" \
  "$PY" -m bench.bench_tile_precision --device "$BENCH_DEVICE" --size "$SIZE_TILE" --rounds 3 \
  --out "$TABLES/fused_linear-bf16-tile.md"
run_step bench:distill "$CAP_BENCH" "$OUT/bench.log" \
  "$PY" -m bench.bench_distill --device "$BENCH_DEVICE" --size "$SIZE_DIST" "${DIST_ARGS[@]}" --out "$TABLES/distill.md"

# ---------------------------------------------------------------------------------------- ddp
# the reference trainer's micro config of tests/test_trainer_ddp.py, 2 ranks, 2 steps
DDP_ARGS=(--method grpo --device "$DDP_DEVICE" --hidden_size 32 --num_layers 1 --num_prompts 4 --num_generations 4
          --max_completion_length 3 --eval_size 8 --eval_every 100 --init_from none --progress false
          --max_steps 2 --output_dir "$WORK/ddp")
if [ "$DRY" = 1 ] || [ "$GPUS" -ge 2 ]; then
  OMP_NUM_THREADS=1 run_step ddp "$CAP_DDP" "$OUT/tests-rest.log" \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m alignops.train "${DDP_ARGS[@]}"
else
  record ddp skip 0 "one GPU here ($GPUS): the 2-rank nccl run needs two"
fi
TRL_DDP=(tests/test_integration_trl_distributed.py -k test_trl_ddp_two_ranks "${PYTEST_COMMON[@]}")
if [ "$GPUS" -ge 2 ] && [ "$DRY" != 1 ]; then
  ALIGNOPS_TRL_DIST_DEVICE=cuda run_step ddp:trl "$CAP_DDP" "$OUT/tests-rest.log" "$PY" -m pytest "${TRL_DDP[@]}"
elif [ "$DRY" = 1 ]; then
  ALIGNOPS_TRL_DIST_DEVICE=cuda run_step ddp:trl "$CAP_DDP" "$OUT/tests-rest.log" "$PY" -m pytest "${TRL_DDP[@]}" --co
else
  record ddp:trl skip 0 "one GPU here ($GPUS): TRL's 2-rank nccl run needs two"
fi

# ---------------------------------------------------------------------------------------- rest
rest_int=() rest_other=()
for f in tests/test_*.py; do
  b=$(basename "$f")
  [[ " ${OP_TESTS[*]} " == *" $b "* ]] && continue
  case "$b" in test_integration_*) rest_int+=("$f") ;; *) rest_other+=("$f") ;; esac
done
echo "rest: integrations: ${rest_int[*]}; other: ${rest_other[*]}" >> "$OUT/tests-rest.log"
if [ "$DRY" = 1 ]; then
  # one small file of the rest, through the same command
  tiny=()
  for f in "${rest_other[@]}"; do [ "$(basename "$f")" = test_tree.py ] && tiny=("$f"); done
  [ ${#tiny[@]} = 0 ] && tiny=("${rest_other[0]}" --co)
  run_step rest:sample "$CAP_REST" "$OUT/tests-rest.log" "$PY" -m pytest "${tiny[@]}" "${PYTEST_COMMON[@]}"
else
  [ ${#rest_int[@]} -gt 0 ] && run_step rest:integrations 60 "$OUT/tests-rest.log" \
    "$PY" -m pytest "${rest_int[@]}" "${PYTEST_COMMON[@]}"
  [ ${#rest_other[@]} -gt 0 ] && run_step rest:trainer+other "$CAP_REST" "$OUT/tests-rest.log" \
    "$PY" -m pytest "${rest_other[@]}" "${PYTEST_COMMON[@]}"
fi
exit 0  # finish (the EXIT trap) writes the summary and exits non-zero if a step failed
