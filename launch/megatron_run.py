"""`dmuon megatron SCRIPT ARGS...`: run a Megatron-LM training script, unchanged, with
``--optimizer dmuon`` registered.

The script runs as ``python SCRIPT ARGS...`` would run it: its folder first on ``sys.path``
(so Megatron-LM's ``megatron/training`` and helpers such as ``gpt_builders.py`` next to it are
found), ``sys.argv = [SCRIPT, *ARGS]``, ``__name__ == "__main__"``. Before it starts,
`distributed_muon.integrations.megatron_optimizer` patches Megatron (optimizer builder,
argument parser, validation), which is what the one import line in the script would do.

Under torchrun every rank runs this module: ``torchrun ... -m distributed_muon.launch.megatron_run
pretrain_gpt.py ARGS...`` (or ``torchrun ... $(which dmuon) megatron pretrain_gpt.py ...``).
"""

from __future__ import annotations

import runpy
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path


def _check_script(script: str) -> Path:
    path = Path(script)
    if not path.is_file():
        where = "is a folder" if path.is_dir() else "does not exist"
        raise ValueError(f"{script} {where}: name the Megatron-LM training script to run, e.g. "
                         "pretrain_gpt.py in a Megatron-LM checkout")
    return path


def skip_dataset_helper_build() -> bool:
    """Megatron's training calls ``make`` in ``megatron/core/datasets`` to build its C++ dataset
    helpers, but the megatron-core wheel ships them built and without the ``Makefile``, so
    ``make`` fails and training exits. Where the built helpers import and no Makefile exists,
    the build step is replaced by a no-op. Returns whether it was."""
    try:
        from megatron.core.datasets import (
            helpers_cpp,  # noqa: F401  (built and importable)
            utils,
        )
    except ImportError:
        return False
    if (Path(utils.__file__).parent / "Makefile").exists():
        return False

    def compile_helpers() -> None:  # already built: nothing to compile
        return None

    utils.compile_helpers = compile_helpers
    return True


def run(script: str, args: Sequence[str]) -> None:
    """Run ``script`` as ``__main__`` with ``args``, ``dmuon`` registered first."""
    path = _check_script(script)
    sys.argv = [script, *args]
    sys.path.insert(0, str(path.resolve().parent))  # as `python script.py` puts it
    try:
        import distributed_muon.integrations.megatron_optimizer  # noqa: F401  (registers dmuon)
    except ImportError as err:
        raise ValueError(f"--optimizer dmuon needs megatron-core: pip install "
                         f"'distributed-muon[megatron]' ({err})") from None
    skip_dataset_helper_build()
    try:
        runpy.run_path(str(path), run_name="__main__")
    except Exception:  # the script's own failure: its traceback, not a one-line error
        traceback.print_exc()
        raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m distributed_muon.launch.megatron_run SCRIPT [ARGS...]\n"
              "Run a Megatron-LM training script (e.g. pretrain_gpt.py) with --optimizer dmuon "
              "registered.")
        return 0 if argv else 2
    try:
        run(argv[0], argv[1:])
    except ValueError as err:
        print(f"dmuon megatron: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
