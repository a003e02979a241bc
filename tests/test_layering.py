"""Import direction (DESIGN 2, 6): the core never imports `integrations` or `launch`; adapters
are found through the `distributed_muon.sharding` registry instead."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import distributed_muon
from distributed_muon import DistributedMuon, sharding

CORE = Path(distributed_muon.__file__).parent
UPWARD = ("distributed_muon.integrations", "distributed_muon.launch")


def _imported_names(tree: ast.Module, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import anywhere in the module (function bodies included),
    relative imports resolved against ``module``, plus ``importlib.import_module("...")`` and
    ``__import__("...")`` calls with a literal name."""
    package = module.rsplit(".", 1)[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from distributed_muon import integrations` imports the subpackage too.
            names += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if called in ("import_module", "__import__") and isinstance(arg, ast.Constant) \
                    and isinstance(arg.value, str):
                names.append((node.lineno, arg.value))
    return names


def _offences(upward: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(CORE.parent).with_suffix("")
        module = ".".join(rel.parts)  # a package's __init__ keeps its name: same package
        source = path.read_text()
        lines = source.splitlines()
        bad = sorted({line for line, name in _imported_names(ast.parse(source), module)
                      if any(name == up or name.startswith(up + ".") for up in upward)})
        out += [f"{module}, line {line}: {lines[line - 1].strip()}" for line in bad]
    return out


def test_core_never_imports_integrations_or_launch():
    offences = _offences(UPWARD)
    assert not offences, (
        "the core (distributed_muon/) must not import adapters or launchers; move the code to "
        "integrations/ or launch/, or reach it through a registry:\n  " + "\n  ".join(offences)
    )


def test_the_checker_sees_function_level_and_relative_imports():
    tree = ast.parse(
        "def f():\n"
        "    from distributed_muon.integrations import fsdp2\n"
        "    from .launch.local import spawn\n"
        "    from . import integrations\n"
        "    import importlib\n"
        "    importlib.import_module('distributed_muon.launch.train')\n"
    )
    names = [n for _, n in _imported_names(tree, "distributed_muon.optimizer")]
    assert names == ["distributed_muon.integrations.fsdp2", "distributed_muon.launch.local.spawn",
                     "distributed_muon.integrations", "importlib",
                     "distributed_muon.launch.train"]


def test_adapters_are_found_through_entry_points():
    from distributed_muon.integrations.fsdp2 import recognize as dtensor
    from distributed_muon.integrations.replicated import ReplicatedSharding
    from distributed_muon.integrations.replicated import recognize as replicated

    order = sharding._ordered()
    assert order.index(dtensor) < order.index(replicated)  # the fallback is asked last
    assert isinstance(sharding.infer_sharding([torch.zeros(2, 3)]), ReplicatedSharding)


@pytest.fixture
def empty_registry(monkeypatch):
    monkeypatch.setattr(sharding, "_recognizers", [])
    monkeypatch.setattr(sharding, "_entry_points_loaded", True)


def test_runtime_registration_and_priority(empty_registry):
    from distributed_muon.integrations.replicated import ReplicatedSharding

    mine = ReplicatedSharding(None)
    sharding.register_sharding(lambda params, group: None, name="declines")
    sharding.register_sharding(lambda params, group: "fallback", priority=-5, name="fallback")
    sharding.register_sharding(lambda params, group: mine, priority=5, name="mine")
    assert sharding.infer_sharding([torch.zeros(2, 2)]) is mine
    opt = DistributedMuon([torch.zeros(2, 2, requires_grad=True)])
    assert opt.sharding is mine


def test_no_recognizer_is_a_clear_error(empty_registry):
    with pytest.raises(ValueError, match="sharding="):
        DistributedMuon([torch.zeros(2, 2, requires_grad=True)])
