#!/usr/bin/env bash
# The GPU check: the first thing to run on a machine with a GPU (written for one H200), from anywhere:
#
#     bash .ci/gpu_check.sh            # each step's full output in $OUT (default /tmp/gpu-check)
#     bash .ci/gpu_check.sh 00 07      # only the steps named (their number prefixes)
#
# Steps, most informative first, each with its own timeout (00-06 add up to under 10 minutes, one
# device call; 07 and 08 need a second call or a shorter list; no GPU has run this yet: trim the timeouts
# once one has):
#   00 environment and versions          03 the fused op at the Qwen2.5-VL-3B head shape, bf16,
#   01 the GPU-only tests                   N = 32,768 and 6,144: time / floor, memory, f64 check
#   02 full-vocabulary bf16 vs float64   04 2 training steps at the 3B shape: --preset paper, bf16,
#                                           FSDP2, the fused op, CUDA memory capped at 80 GB
#   05 the rollout at the 3B shape: transformers' generate (the rollout before the engine) against the engine,
#      eager and with a CUDA graph: tokens/s, peak memory (80 GB cap), identical tokens
#   06 packed (prompts shared; rows) vs padded pi_old pass and update at the 3B shape (data/bench_packing.py): positions,
#      time, peak memory, and the update's memory for two budgets x two longest rows, capped at 80 GB
#   07 2 training steps on a random model of InternVL3-2B's shape (InternViT-300M + Qwen2.5-1.5B, 448 px
#      tiles of 256 features): --preset paper, bf16, FSDP2, the fused op, CUDA memory capped at 80 GB
#   08 the long-prompt mix at the 3B shape (prompts of ~1,000 tokens, G = 8, responses of ~100): prompts
#      shared against rows packed as before, and padded
# A step that fails or times out is reported and the next one runs. Later checks add steps here.
set -u
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/gpu-check}
mkdir -p "$O"
export PYTHONUNBUFFERED=1
ONLY=" $* "
step() {  # step NAME TIMEOUT_S COMMAND...: full output in $O/NAME.txt, its tail here
    local name=$1 t=$2 t0=$SECONDS rc
    shift 2
    if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" ${name%%_*} "* ]]; then return; fi
    echo "=== $name (timeout ${t}s)"
    timeout "$t" "$@" > "$O/$name.txt" 2>&1
    rc=$?
    tail -n 25 "$O/$name.txt"
    echo "=== $name rc=$rc $((SECONDS - t0))s"
}
step 00_env 20 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python -c "
import importlib.metadata as m, torch, triton, transformers
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__,
      \"transformers\", transformers.__version__, torch.cuda.get_device_name())
a = torch.randn(64, 64, device=\"cuda\", dtype=torch.bfloat16)
print(\"torch.mm out_dtype:\", torch.mm(a, a, out_dtype=torch.float32).dtype)
for d in (\"liger-kernel\", \"flash-attn\", \"kernels\", \"math-verify\"):
    try:
        print(d, m.version(d))
    except m.PackageNotFoundError:
        print(d, \"not installed\")"'
step 01_gpu_tests 60 python -m pytest -q -x -p no:cacheprovider test_calibrl.py -k "logprobs or policy_loss \
    or group_advantages or grid_order or readable_one or uniform_group or samplers_distribution \
    or fused_training_step or rollout_cuda_graph"
step 02_full_vocab 40 python kernels/sweep.py check          # N 2048 x V 151,936, bf16 vs float64
step 03_bench_head 90 python kernels/bench.py --n 32768 6144 --h 2048 --v 151936 --dtype bfloat16
step 04_train_3b 150 bash -c 'python data/make_demo.py --random-3b /tmp/qwen2.5-vl-3b-random &&
    torchrun --standalone --nproc_per_node=1 .ci/gpu_train.py --preset paper --model /tmp/qwen2.5-vl-3b-random \
      --data data/demo/train.jsonl --eval-data data/demo/val.jsonl --eval-max-prompts 16 --eval-every 2 \
      --steps 2 --prompts-per-step 16 --mini-batch-prompts 8 --max-response-length 256 --fused on \
      --dtype bfloat16 --output-dir /tmp/gpu-check-run --overwrite'
step 05_bench_rollout 110 python data/bench_rollout.py --gpu-3b \
    --only "today;engine, 1 call;engine, 1 call, CUDA graph"
step 06_bench_packing 110 bash -c '{ test -d /tmp/qwen2.5-vl-3b-random ||
      python data/make_demo.py --random-3b /tmp/qwen2.5-vl-3b-random; } &&
    python data/bench_packing.py --model /tmp/qwen2.5-vl-3b-random --device cuda --dtype bfloat16 --fused \
      --gradient-checkpointing --prompts 8 --image-size 448 --resp-mean 600 --resp-cap 4096 \
      --max-tokens 32768 --micro-batch-size 8 --memory-cap-gb 80'
step 07_train_internvl3_2b 150 bash -c 'python data/make_demo.py --random-internvl3-2b /tmp/internvl3-2b-random &&
    torchrun --standalone --nproc_per_node=1 .ci/gpu_train.py --preset paper --model /tmp/internvl3-2b-random \
      --data data/demo/train.jsonl --eval-data data/demo/val.jsonl --eval-max-prompts 16 --eval-every 2 \
      --steps 2 --prompts-per-step 16 --mini-batch-prompts 8 --max-response-length 256 --fused on \
      --dtype bfloat16 --output-dir /tmp/gpu-check-internvl --overwrite'
step 08_bench_long_prompts 110 bash -c '{ test -d /tmp/qwen2.5-vl-3b-random ||
      python data/make_demo.py --random-3b /tmp/qwen2.5-vl-3b-random; } &&
    python data/bench_packing.py --model /tmp/qwen2.5-vl-3b-random --device cuda --dtype bfloat16 --fused \
      --gradient-checkpointing --quick --prompt-tokens 1000 --resp-mean 100 --resp-cap 200 --max-tokens 32768 \
      --memory-cap-gb 80'
# With time left over: python kernels/sweep.py compile && python kernels/sweep.py sweep  (~4 min)
