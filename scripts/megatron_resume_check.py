"""Does a ``pretrain_gpt.py`` run saved and resumed repeat the logged losses of one run?

For each ``--optimizer`` (adam, dmuon, ...): one run of ``--iters`` iterations, one cut at
``--save-at`` (saved, exits), one resumed from that save; prints each iteration's loss of the
whole run and of the resumed one and where they differ. The model and flags are
`tests/test_gpu_pretrain_gpt.py`'s; needs ``$MEGATRON_LM`` and a GPU:

    python scripts/megatron_resume_check.py --optimizer adam dmuon --out /tmp/resume
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from distributed_muon.launch import megatron_pretrain as mp


def check(optimizer: str, iters: int, save_at: int, out: Path) -> dict:
    model = dataclasses.replace(mp.Model(), layers=2, hidden=128, heads=4, groups=2, ffn=256,
                                seq=128, micro_batch=4)
    folder = mp.find_megatron_lm()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / f"{optimizer}-ckpt"

    def run(name: str, **kw) -> dict[int, float]:
        return mp.run(folder, mp.pretrain_args(optimizer, iters, model, **kw),
                      log=out / f"{optimizer}-{name}.log", cwd=out)

    whole = run("whole")
    run("first", save=ckpt, save_interval=save_at, exit_interval=save_at)
    resumed = run("resumed", load=ckpt)
    differ = [i for i in sorted(resumed) if resumed[i] != whole.get(i)]
    for i in sorted(resumed):
        print(f"{optimizer} iteration {i}: whole {whole.get(i):.6f} resumed {resumed[i]:.6f}"
              + ("  DIFFERS" if i in differ else ""))
    return {"whole": whole, "resumed": resumed, "differ": differ}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", nargs="+", default=["adam", "dmuon"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--save-at", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("/tmp/megatron-resume"))
    args = p.parse_args()
    results = {o: check(o, args.iters, args.save_at, args.out) for o in args.optimizer}
    (args.out / "resume-check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
