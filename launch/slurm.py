"""`dmuon slurm`: render an sbatch script for a multi-node job.

Launch styles (templates in ``launch/templates/``):

- ``torchrun``: one ``srun`` task per node runs ``torchrun`` with a c10d rendezvous on the
  first node; torchrun starts one rank per GPU (fsdp2 / ddp backends).
- ``srun``: one ``srun`` task per rank; `dmuon train` reads ``SLURM_PROCID``, ``SLURM_NTASKS``
  and ``SLURM_LOCALID`` itself (CPU clusters, or where torchrun is not wanted).
- ``deepspeed``: one ``srun`` task per rank with DeepSpeed's environment (``--backend
  deepspeed``).
- ``megatron``: as ``torchrun``, running ``dmuon train --backend megatron`` (GPU nodes only).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from importlib import resources

STYLES = ("torchrun", "srun", "deepspeed", "megatron")


@dataclass
class SlurmConfig:
    nodes: int = 2
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # default: one per GPU, or 1 without GPUs
    style: str = "torchrun"
    job_name: str = "dmuon-train"
    partition: str | None = None
    time: str = "01:00:00"
    cpus_per_task: int | None = None
    port: int = 29500
    python: str = "python3"
    train_args: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"--style {self.style!r}: use one of {STYLES}")
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError("--nodes must be >= 1 and --gpus-per-node >= 0")
        if self.style == "torchrun" and self.gpus_per_node == 0 and not self.tasks_per_node:
            raise ValueError("--style torchrun needs --gpus-per-node or --tasks-per-node")
        if self.style == "megatron" and self.gpus_per_node == 0:
            raise ValueError("--backend megatron runs on GPU nodes only: set --gpus-per-node")


def render(cfg: SlurmConfig) -> str:
    """The sbatch script text."""
    cfg.validate()
    per_node = cfg.tasks_per_node or max(cfg.gpus_per_node, 1)
    headers = [f"#SBATCH --job-name={cfg.job_name}", f"#SBATCH --nodes={cfg.nodes}",
               f"#SBATCH --time={cfg.time}", "#SBATCH --output=%x-%j.out"]
    if cfg.style in ("torchrun", "megatron"):  # one torchrun per node
        headers.append("#SBATCH --ntasks-per-node=1")
    else:
        headers.append(f"#SBATCH --ntasks-per-node={per_node}")
    if cfg.gpus_per_node:
        headers.append(f"#SBATCH --gpus-per-node={cfg.gpus_per_node}")
    if cfg.partition:
        headers.append(f"#SBATCH --partition={cfg.partition}")
    if cfg.cpus_per_task:
        headers.append(f"#SBATCH --cpus-per-task={cfg.cpus_per_task}")
    template = resources.files("distributed_muon.launch").joinpath(
        f"templates/{cfg.style}.sbatch").read_text()
    return template.format(
        headers="\n".join(headers),
        nodes=cfg.nodes,
        per_node=per_node,
        port=cfg.port,
        python=cfg.python,
        train_args=" ".join(shlex.quote(a) for a in cfg.train_args),
    )
