#!/usr/bin/env bash
# One GPU, side by side (issue 24): AdamW, DeepSpeed's Muon and DistributedMuon at its
# defaults under DeepSpeed ZeRO-1/2/3 (world 1), at 16K and 262K tokens per step (micro-batch
# 4x1024, gradient accumulation 1 and 16), on the 0.94B model of scripts/bench_deepspeed.py;
# plus DistributedMuon's former defaults (standard Newton-Schulz in bf16) at ZeRO-1.
#
#   STAGES="1 2 3" OPTIMIZERS="adamw ds_muon distributed_muon" FORMER=1 \
#       bash scripts/bench_one_gpu.sh results.jsonl
#
# Each configuration is its own process (a fresh CUDA context, so each peak is its own); one
# JSON line per configuration is appended to the output (scripts/bench_deepspeed.py).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${1:-one_gpu.jsonl}
stages=${STAGES:-"1 2 3"}
optimizers=${OPTIMIZERS:-"adamw ds_muon distributed_muon"}
former=${FORMER:-1}  # also run the former defaults at ZeRO-1 (0: skip)

bench() {
  torchrun --standalone --nproc-per-node 1 scripts/bench_deepspeed.py --warmup 3 --steps 6 \
      --out "$out" "$@"
}

for s in $stages; do
  for gas in 1 16; do
    for o in $optimizers; do
      bench --stage "$s" --grad-accum "$gas" --optimizer "$o"
    done
    if [ "$former" = 1 ] && [ "$s" = 1 ]; then
      bench --stage 1 --grad-accum "$gas" --optimizer distributed_muon \
          --dmuon ns_method='"standard"' --dmuon ns_dtype='"bf16"'
    fi
  done
done
