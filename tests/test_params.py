import pytest
import torch
from torch import nn

from distributed_muon import DistributedMuon, MatrixSpec, muon_param_groups
from distributed_muon.params import is_embedding_or_head_name


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=16, tie=True):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(8, d)  # no "embed" in its name: found by module type
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.experts = nn.Parameter(torch.randn(4, 2 * d, d))
        self.conv = nn.Conv1d(d, d, 3)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.embed_tokens.weight


def names(group):
    return sorted(n for n, _ in group["params"])


def test_groups_split_muon_and_adamw():
    groups = muon_param_groups(TinyLM(), row_blocks={"qkv.weight": (16, 16, 16)}, lr=0.02)
    muon = [g for g in groups if g["use_muon"]]
    adamw = [g for g in groups if not g["use_muon"]]
    assert sorted(n for g in muon for n in names(g)) == ["conv.weight", "experts", "proj.weight",
                                                          "qkv.weight"]
    assert names(adamw[0]) == ["conv.bias", "embed_tokens.weight", "norm.bias", "norm.weight",
                               "pos.weight", "proj.bias"]
    qkv = next(g for g in muon if names(g) == ["qkv.weight"])
    assert qkv["row_blocks"] == (16, 16, 16) and qkv["lr"] == 0.02
    conv = next(g for g in muon if names(g) == ["conv.weight"])
    assert conv["matrix_view"] == "flatten"
    # The groups feed the optimizer directly; logical matrices as declared.
    opt = DistributedMuon(groups, lr=0.01)
    shapes = sorted((m.m, m.n) for m in opt.layout.matrices)
    assert shapes == sorted([(16, 16)] * 3 + [(16, 16)] + [(32, 16)] * 4 + [(16, 48)])


def test_untied_head_is_adamw_by_name():
    groups = muon_param_groups(TinyLM(tie=False))
    adamw = next(g for g in groups if not g["use_muon"])
    assert "head.weight" not in names(adamw)  # "head" alone is not a head name
    groups = muon_param_groups(TinyLM(tie=False), adamw=["head.weight"])
    adamw = next(g for g in groups if not g["use_muon"])
    assert "head.weight" in names(adamw)


@pytest.mark.parametrize("name,expected", [
    ("lm_head.weight", True), ("module.lm_head.weight", True), ("transformer.wte.weight", True),
    ("model.embed_tokens.weight", True), ("output.weight", True),
    ("_orig_mod.output.weight", True), ("output_layer.weight", True),
    ("bert.attention.output.dense.weight", False), ("layers.0.mlp.fc1.weight", False),
])
def test_head_names(name, expected):
    assert is_embedding_or_head_name(name) is expected


def test_named_parameters_apply_name_rules():
    model = TinyLM(tie=False)
    model.lm_head = nn.Linear(16, 50)
    opt = DistributedMuon(model.named_parameters(), lr=0.01)
    muon_names = {opt.param_groups[0]["param_names"][i]
                  for i, p in enumerate(opt.param_groups[0]["params"])
                  if any(p is q for q in opt.muon_params)}
    assert "lm_head.weight" not in muon_names and "embed_tokens.weight" not in muon_names
    assert "qkv.weight" in muon_names


def test_bare_parameters_use_ndim():
    a, b, c = torch.zeros(3, 4), torch.zeros(4), torch.zeros(2, 3, 4)
    opt = DistributedMuon([a, b, c])
    assert [p is q for p, q in zip(opt.muon_params, [a, c])] == [True, True]
    opt = DistributedMuon([{"params": [a, c], "use_muon": False}, {"params": [b]}])
    assert opt.muon_params == ()


def test_unknown_patterns_are_errors():
    with pytest.raises(ValueError, match="match no trainable"):
        muon_param_groups(TinyLM(), adamw=["*.router.weight"])


def test_matrix_spec():
    spec = MatrixSpec.of((3, 8, 5))
    assert (spec.experts, spec.rows, spec.cols) == (3, 8, 5)
    assert spec.matrices() == [(0, 8, 5), (8, 8, 5), (16, 8, 5)]
    spec = MatrixSpec.of((12, 4, 3, 3), row_blocks=(8, 4))
    assert spec.matrices() == [(0, 8, 36), (8, 4, 36)]
    assert MatrixSpec.of((6, 4, 3), view="flatten").matrices() == [(0, 6, 12)]
    with pytest.raises(ValueError, match="ndim < 2"):
        MatrixSpec.of((5,))
