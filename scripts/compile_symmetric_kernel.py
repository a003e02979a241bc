"""Compile the symmetric-product kernel for a GPU target on a machine without a GPU.

Every autotune config of `distributed_muon.symmetric` is compiled ahead of time for the
target (default sm_90: H100/H200), specialized as the Triton JIT specializes the NS calls
(unit strides as constants, the rest 16-divisible), and its shared memory, async copies and
tensor-core instructions are printed: a compile error or an unpipelined loop shows here
before a GPU is involved. Needs Triton installed (any machine):

    pip install --target /tmp/trsite triton
    PYTHONPATH=/tmp/trsite python scripts/compile_symmetric_kernel.py [--arch 90]
"""

from __future__ import annotations

import argparse

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from distributed_muon import symmetric

# The products NS runs: X X^T (B = X.mT: unit stride along k; for a tall matrix NS works on
# its transposed view, unit stride along m), b A + c A A (+ a I) of a contiguous symmetric A;
# D and C are contiguous.
CASES = {
    "X X^T": (("s_ak", "s_bk", "s_dn", "s_cn"), False, False),
    "X X^T, tall X": (("s_am", "s_bn", "s_dn", "s_cn"), False, False),
    "bA + cAA": (("s_ak", "s_bn", "s_dn", "s_cn"), True, False),
    "aI + bA + cAA": (("s_ak", "s_bn", "s_dn", "s_cn"), True, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    args = p.parse_args()
    fn = symmetric._upper_tiles_kernel.fn
    names = fn.arg_names
    divisible = [["tt.divisibility", 16]]
    print(f"# triton {triton.__version__}, sm_{args.arch}, {args.dtype}")
    for case, (unit_strides, has_d, has_diag) in CASES.items():
        for cfg in symmetric._CONFIGS:
            consts = {"HAS_D": has_d, "HAS_DIAG": has_diag, **cfg.kwargs,
                      **dict.fromkeys(unit_strides, 1)}
            signature, attrs = {}, {}
            for i, name in enumerate(names):
                if name in consts:
                    signature[name] = "constexpr"
                elif name in ("alpha", "beta", "diag"):
                    signature[name] = "fp32"
                else:
                    signature[name] = f"*{args.dtype}" if name.endswith("_ptr") else "i32"
                    attrs[(i,)] = divisible
            src = ASTSource(fn, signature, attrs=attrs,
                            constexprs={(names.index(k),): v for k, v in consts.items()})
            kernel = triton.compile(src, target=GPUTarget("cuda", args.arch, 32),
                                    options={"num_warps": cfg.num_warps,
                                             "num_stages": cfg.num_stages})
            ptx = kernel.asm["ptx"]
            print(f"{case:>14} BLOCK {cfg.kwargs['BLOCK']:>3} BLOCK_K {cfg.kwargs['BLOCK_K']:>3} "
                  f"warps {cfg.num_warps} stages {cfg.num_stages}: shared "
                  f"{kernel.metadata.shared // 1024} KiB, cp.async {ptx.count('cp.async')}, "
                  f"wgmma {ptx.count('wgmma.mma_async')}, mma.sync {ptx.count('mma.sync')}",
                  flush=True)


if __name__ == "__main__":
    main()
