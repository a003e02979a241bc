"""distributed_muon: Muon for sharded training, one Newton-Schulz per matrix per step."""

from distributed_muon.heads import AttentionHeads
from distributed_muon.optimizer import DistributedMuon
from distributed_muon.orthogonalize import orthogonalize, schedule_band
from distributed_muon.params import MatrixSpec, muon_param_groups
from distributed_muon.scale import shape_scale

__version__ = "0.1.0"

__all__ = [
    "AttentionHeads",
    "DistributedMuon",
    "MatrixSpec",
    "muon_param_groups",
    "orthogonalize",
    "schedule_band",
    "shape_scale",
    "__version__",
]
