"""Entry points and job templates: torchrun, deepspeed, Megatron, SLURM."""
