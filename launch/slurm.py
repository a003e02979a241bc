"""`dmuon slurm`: render an sbatch script for a multi-node job.

Launch styles (templates in ``launch/templates/``):

- ``torchrun``: one ``srun`` task per node runs ``torchrun`` with a c10d rendezvous on the
  first node; torchrun starts one rank per GPU (fsdp2 / ddp backends).
- ``srun``: one ``srun`` task per rank; `dmuon train` reads ``SLURM_PROCID``, ``SLURM_NTASKS``
  and ``SLURM_LOCALID`` itself (CPU clusters, or where torchrun is not wanted).
- ``deepspeed``: one ``srun`` task per rank with DeepSpeed's environment (``--backend
  deepspeed``).
- ``megatron``: as ``torchrun``, running ``dmuon train --backend megatron``, or with
  ``--script`` a Megatron-LM training script through `distributed_muon.launch.megatron_run`
  (GPU nodes only).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from importlib import resources

STYLES = ("torchrun", "srun", "deepspeed", "megatron")
# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds, or no limit.
TIME = re.compile(r"\d+(:\d\d){0,2}|\d+-\d+(:\d\d){0,2}|UNLIMITED|INFINITE", re.IGNORECASE)
# The flags each template passes to `dmuon train` itself, before the user's.
TRAIN_FLAGS = {"deepspeed": ["--backend", "deepspeed"],
               "megatron": ["--backend", "megatron", "--device", "cuda"]}


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
    script: str | None = None  # megatron: a Megatron-LM script run by `dmuon megatron`

    def validate(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"--style {self.style!r}: use one of {STYLES}")
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError("--nodes must be >= 1 and --gpus-per-node >= 0")
        if self.style == "torchrun" and self.gpus_per_node == 0 and not self.tasks_per_node:
            raise ValueError("--style torchrun needs --gpus-per-node or --tasks-per-node")
        if self.script is not None and self.style != "megatron":
            raise ValueError("--script runs a Megatron-LM training script: use it with "
                             "--backend megatron")
        if self.style == "megatron" and self.gpus_per_node == 0:
            raise ValueError("--backend megatron runs on GPU nodes only: set --gpus-per-node")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ValueError(f"--tasks-per-node {self.tasks_per_node}: must be at least 1")
        if not TIME.fullmatch(self.time):
            raise ValueError(f"--time {self.time}: use Slurm's format, minutes or [D-]HH:MM:SS "
                             "(e.g. 90, 01:30:00, 2-00:00:00)")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port {self.port}: use a TCP port, 1-65535 (default 29500)")

    @property
    def per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def world(self) -> int:
        """The job's ranks: what `dmuon train` will see as its world size."""
        return self.nodes * self.per_node


def render(cfg: SlurmConfig) -> str:
    """The sbatch script text."""
    cfg.validate()
    per_node = cfg.per_node
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
        program=_program(cfg),
    )


def _program(cfg: SlurmConfig) -> str:
    """What each megatron rank runs: `dmuon train`, or the user's script through the runner."""
    if cfg.script is not None:
        return f"-m distributed_muon.launch.megatron_run {shlex.quote(cfg.script)}"
    return "-m distributed_muon.launch.cli train --backend megatron --device cuda"
