#!/usr/bin/env bash
# Per-head Newton-Schulz against whole matrices on the main job, on one GPU (docs/muon.md,
# "Per-head Newton-Schulz"), from the repo root:
#
#   bash scripts/gpu_main_job_per_head.sh        # writes its outputs under $OUT
#
# Needs .whl/distributed_muon-*.whl (for its entry points; this checkout's code is copied over
# it) and, where the GPU machine has no matplotlib, its wheels and theirs in .whl/extra/ (cp312).
# 3 seeds x (whole, per head) at the defaults (Gram Newton-Schulz in fp16), one run at a time.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/per-head-out}
SITE=/tmp/site-per-head
mkdir -p "$OUT" "$SITE" /tmp/bin

python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
    --no-compile --target "$SITE" .whl/extra/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
    .whl/distributed_muon-*.whl || exit 1
rm -rf "$SITE/distributed_muon"
cp -r distributed_muon "$SITE/" && cp -r integrations launch "$SITE/distributed_muon/"
printf '#!/bin/sh\nexec python3 -m distributed_muon.launch.cli "$@"\n' > /tmp/bin/dmuon
chmod +x /tmp/bin/dmuon
export PYTHONPATH=$SITE PATH=/tmp/bin:$PATH

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__)"
    git log --oneline -1 2>/dev/null
} > "$OUT/env.txt" 2>&1

REPO=$PWD
cd /tmp || exit 1  # so that the installed package is imported, not the source tree
python3 "$REPO/scripts/main_job_seeds.py" --device cuda --out /tmp/runs/per-head --seeds "${SEEDS:-3}" \
    --variant whole= --variant per_head=--per-head --json "$OUT/per-head-quality-gpu.json" \
    > "$OUT/per-head-stdout.txt" 2>&1
echo "exit code: $?" >> "$OUT/per-head-stdout.txt"
tail -12 "$OUT/per-head-stdout.txt"
