#!/usr/bin/env bash
# The GPU check, for a lent GPU machine: in under 9 minutes on one H100 it runs
#   1. the test suite's CUDA-marked tests (bf16 autocast, torch.compile of the student and of dtm_loss,
#      fused AdamW, dtm_loss without host synchronisation; the segmentation test alone takes 97 s on an H100);
#   2. the offline demo's teacher (one epoch) and 30 steps of the demo pre-training distilling it, on CUDA;
#   3. bench.py at ViT-B/16 (batch 128, bf16 autocast, compiled) with a randomly initialised ViT-B/16 CLIP
#      teacher: step time, images/s, peak memory, MFU, DTM overhead, dtm_loss vs the dense formulation,
#      the compile time and graph count of torch.compile(dtm_loss, fullgraph=True);
#      then our ViT-B/16 against timm's BEiT (bf16, eager and compiled);
#   4. bench.py --parts=data: the CPU cost per image of every training pipeline and the cores per GPU each needs
#      at the images/s the step benchmark printed above;
# printing every figure. It installs and downloads nothing, and uses `python` as found (or $PYTHON).
# Every stage has a time limit (together 580 s), so the whole check ends within 10 minutes even if one hangs.
# With $OUT set, a copy of all output goes to $OUT/gpu_check.log.
#
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
START=$(date +%s)
FAILED=()
stage() { echo; echo "=== $1   [$(( $(date +%s) - START )) s]"; }
run() {  # run LIMIT_SECONDS NAME COMMAND...: a failure or timeout is reported and the check goes on
  local limit=$1 name=$2; shift 2
  timeout --kill-after=5 "$limit" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then
    [ $rc -eq 124 ] && echo "!!! $name: stopped after its limit of $limit s" || echo "!!! $name: exit code $rc"
    FAILED+=("$name")
  fi
}

# A GPU machine without open_clip (or ftfy, wcwidth) can be given their wheels in .whl/ (pip download them
# elsewhere): they are installed into a temporary folder first, nothing is fetched.
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl \
    && export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi

stage "versions"
$PY - <<'PYEOF'
import os, sys
import torch, torchvision
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"torchvision {torchvision.__version__}")
for name in ("open_clip", "timm", "numpy", "pytest"):
    try:
        print(f"{name} {getattr(__import__(name), '__version__', '?')}")
    except Exception as e:
        print(f"{name}: NOT IMPORTABLE ({e})")
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", f"| CPU cores: {os.cpu_count()}")
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "(no nvidia-smi)"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "!!! no CUDA GPU visible to torch: nothing to check"
  exit 1
fi

stage "1/5 CUDA-marked tests"
run 220 "cuda tests" $PY -m pytest -q -m cuda tests -p no:cacheprovider -rs

stage "2/5 the demo's teacher (one epoch), then 30 steps of the demo pre-training on CUDA"
TMP=$(mktemp -d)
run 25 "demo teacher" $PY eval_transfer.py config/transfer_demo_teacher.py --device=cuda --epochs=1 \
  --demo_data="$TMP/demo" --out_dir="$TMP/teacher"
run 40 "demo pre-training" $PY pretrain.py config/pretrain_demo.py --device=cuda --max_steps=30 \
  --demo_data="$TMP/demo" --data_dir="$TMP/demo/train" --out_dir="$TMP/pretrain" --log_interval=5 \
  --teacher="$TMP/teacher/demo_coarse/ckpt.pt"
[ -f "$TMP/pretrain/log.jsonl" ] && { echo "log.jsonl (one line per epoch):"; cat "$TMP/pretrain/log.jsonl"; }

stage "3/5 bench.py: ViT-B/16 student, random ViT-B/16 CLIP teacher, 224 px, batch 128, bf16, compiled"
run 160 "bench step+loss" $PY bench.py --parts=step,loss --model=base --batch_size=128 --compile \
  --device=cuda --warmup=3 --iters=10 > >(tee /tmp/gpu_check_step.log)  # (not a pipe: run's FAILED stays here)
sleep 1  # tee's last lines
IMAGES_PER_S=$(grep -m1 "DTM step" /tmp/gpu_check_step.log | grep -o "[0-9.]* images/s" | cut -d" " -f1)

stage "4/5 bench.py: our ViT-B/16 vs timm's BEiT, forward + backward, batch 128, bf16, eager and compiled"
run 70 "bench vit" $PY bench.py --parts=vit --model=base --batch_size=128 --device=cuda --compile --warmup=3 \
  --iters=10

stage "5/5 bench.py: the data pipelines' CPU time per image, and the cores per GPU at ${IMAGES_PER_S:-1343} images/s"
run 45 "bench data" $PY bench.py --parts=data --gpu_images_per_s="${IMAGES_PER_S:-1343}"

rm -rf "$TMP"
stage "done"
if [ ${#FAILED[@]} -eq 0 ]; then
  echo "GPU CHECK PASSED in $(( $(date +%s) - START )) s"
else
  echo "GPU CHECK FAILED in $(( $(date +%s) - START )) s: ${FAILED[*]}"
  exit 1
fi
