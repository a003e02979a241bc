"""Framework adapters: each turns one framework's sharding into a `Sharding` for the core.

`replicated` and `fsdp2` register their recognizers through the ``distributed_muon.shardings``
entry points (pyproject.toml), so `distributed_muon.sharding.infer_sharding` finds them without
the core importing this package.
"""
