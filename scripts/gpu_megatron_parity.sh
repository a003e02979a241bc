#!/usr/bin/env bash
# Megatron parity and pretrain_gpt.py runner checks on one GPU (issue 25), from the repo root:
#
#   bash scripts/gpu_megatron_parity.sh          # writes its outputs under $OUT
#
# Needs, next to the checkout (both git-ignored, built where the network is reachable):
#   .whl/           megatron-core 0.19.2, emerging-optimizers 0.3.0, absl-py and distributed_muon
#                   wheels (pip download --no-deps ... for cp312; see docs/megatron.md)
#   .megatron_lm/   Megatron-LM's training code of tag core_v0.19.0 (git archive core_v0.19.0
#                   megatron/training pretrain_gpt.py gpt_builders.py model_provider.py)
# Runs the GPU tests (parity with Megatron's Muon, pretrain_gpt.py through `dmuon megatron`,
# and the existing Megatron GPU tests) while the 40-iteration adam/muon/dmuon curve runs
# alongside; about 6 minutes on one H100.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/megatron-parity-out}
mkdir -p "$OUT"
REPO=$PWD
SITE=/tmp/site

# Only the wheels this needs (.whl may hold others' wheels, e.g. DeepSpeed's dependencies).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/megatron_core-0.19.2-*.whl .whl/emerging_optimizers-0.3.0-*.whl \
    .whl/absl_py-*.whl .whl/distributed_muon-*.whl || exit 1
# This checkout's code over the installed package (the wheel in .whl may be older): the same
# layout the build makes (integrations/ and launch/ inside distributed_muon/).
rm -rf "$SITE/distributed_muon"
cp -r distributed_muon "$SITE/" && cp -r integrations launch "$SITE/distributed_muon/"
export PYTHONPATH=$SITE MEGATRON_LM=$REPO/.megatron_lm

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, importlib.metadata as m; print('torch', torch.__version__); \
print(*[f'{p} {m.version(p)}' for p in ('megatron-core', 'emerging-optimizers', 'absl-py')])"
    git -C "$REPO" log --oneline -1 2>/dev/null
} > "$OUT/env.txt" 2>&1

# The tests run from a copy, so that the installed package is imported, not the source tree.
rm -rf /tmp/tests /tmp/scripts /tmp/pt /tmp/curve
cp -r tests /tmp/tests && cp -r scripts /tmp/scripts
cd /tmp || exit 1

python3 /tmp/scripts/megatron_curve.py --out /tmp/curve > "$OUT/curve-stdout.txt" 2>&1 &
CURVE=$!

timeout "${PYTEST_TIMEOUT:-430}" python3 -m pytest -q -s -p no:cacheprovider --basetemp=/tmp/pt \
    /tmp/tests/test_gpu_megatron_parity.py /tmp/tests/test_gpu_pretrain_gpt.py \
    /tmp/tests/test_gpu_megatron.py > "$OUT/gpu-megatron-parity-tests.txt" 2>&1
echo "pytest exit code: $?" >> "$OUT/gpu-megatron-parity-tests.txt"

timeout "${CURVE_EXTRA:-120}" tail --pid=$CURVE -f /dev/null  # give the curve at most 2 more minutes
kill $CURVE 2>/dev/null && echo "curve stopped: out of time" >> "$OUT/curve-stdout.txt"
wait $CURVE; echo "curve exit code: $?" >> "$OUT/curve-stdout.txt"
cp /tmp/curve/megatron-pretrain-gpt-curve.md /tmp/curve/megatron-pretrain-gpt-curve.json \
    "$OUT/" 2>/dev/null
# Every pretrain_gpt.py log (the curve's and the tests'), in one file.
find /tmp/curve /tmp/pt -name '*.log' 2>/dev/null | tar czf "$OUT/pretrain-logs.tar.gz" -T -
ls -la "$OUT"
tail -5 "$OUT/gpu-megatron-parity-tests.txt"
