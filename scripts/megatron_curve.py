"""Megatron-LM's pretrain_gpt.py, 40 iterations each of ``--optimizer adam``, ``muon`` (Megatron's
own) and ``dmuon``, same flags and seed: the loss table of issue 25, written as Markdown + JSON.

    MEGATRON_LM=/path/to/megatron-lm-training-code python3 scripts/megatron_curve.py --out DIR

The three runs go at once on the one GPU (the model is small; the losses do not depend on it).
The flags are `distributed_muon.launch.megatron_pretrain.pretrain_args` (4-layer GPT-MoE, 4
experts top-2, bf16, distributed optimizer, mock data); every run goes through `dmuon megatron`.
"""

from __future__ import annotations

import argparse
import datetime
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from distributed_muon.launch import megatron_pretrain as mp

OPTIMIZERS = ("adam", "muon", "dmuon")
SHOWN = (1, 3, 10, 20, 30, 40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the table and logs")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    folder = mp.find_megatron_lm()
    if folder is None:
        raise SystemExit(f"set ${mp.ENV} to a Megatron-LM training-code folder")
    args.out.mkdir(parents=True, exist_ok=True)
    flags = {name: mp.pretrain_args(name, args.iters, lr=args.lr) for name in OPTIMIZERS}
    work = args.out / "work"
    work.mkdir(exist_ok=True)

    def one(name: str) -> dict[int, float]:
        return mp.run(folder, flags[name], log=args.out / f"pretrain-gpt-{name}.log",
                      timeout=420, cwd=work)

    with ThreadPoolExecutor(len(OPTIMIZERS)) as pool:
        curves = dict(zip(OPTIMIZERS, pool.map(one, OPTIMIZERS), strict=True))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    day = datetime.date.today().isoformat()
    shown = [i for i in SHOWN if i <= args.iters]
    lines = [f"# pretrain_gpt.py: adam vs Megatron's muon vs dmuon ({device}, {day})", "",
             "| iteration | " + " | ".join(map(str, shown)) + " |",
             "|---|" + "---|" * len(shown)]
    for name in OPTIMIZERS:
        lines.append(f"| {name} | " + " | ".join(f"{curves[name].get(i, float('nan')):.3f}"
                                                 for i in shown) + " |")
    gap = max(abs(curves["muon"][i] - curves["dmuon"][i]) for i in curves["muon"])
    lines += ["", f"Largest |muon - dmuon| over all {args.iters} iterations: {gap:.4f}.", "",
              "Command (per optimizer, OPT = adam, muon, dmuon):", "", "```bash",
              " ".join(mp.command(Path("$MEGATRON_LM"), flags["dmuon"]))
              .replace("dmuon --bf16", "OPT --bf16"), "```", ""]
    (args.out / "megatron-pretrain-gpt-curve.md").write_text("\n".join(lines))
    (args.out / "megatron-pretrain-gpt-curve.json").write_text(json.dumps(
        {"device": device, "date": day, "flags": flags,
         "losses": {k: {str(i): v for i, v in c.items()} for k, c in curves.items()}},
        indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
