"""Megatron-LM's own ``pretrain_gpt.py``, unchanged, with ``--optimizer dmuon`` through the runner.

``$MEGATRON_LM`` names a folder with Megatron-LM's training code of the tag matching the
installed megatron-core (``core_v0.19.0`` for 0.19.x; see `distributed_muon.launch.
megatron_pretrain`); the test skips cleanly without it, without CUDA or without megatron-core
>= 0.19. The model is a 2-layer GPT-MoE on mock data (`megatron_pretrain.Model`), bf16, the
distributed optimizer, one GPU, each run through ``torchrun -m distributed_muon.launch.
megatron_run pretrain_gpt.py ...``.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ITERS, SAVE_AT = 10, 5


@pytest.fixture(scope="module")
def megatron_lm():
    from distributed_muon.launch import megatron_pretrain

    folder = megatron_pretrain.find_megatron_lm()
    if folder is None:
        pytest.skip(f"${megatron_pretrain.ENV} is not set (a Megatron-LM training-code folder)")
    pytest.importorskip("megatron.core")
    from megatron.core import optimizer as core_optimizer

    if not hasattr(core_optimizer, "_get_megatron_emerging_optimizer"):
        pytest.skip("pretrain_gpt.py of core_v0.19.0 needs megatron-core >= 0.19")
    return folder


@pytest.fixture(scope="module")
def model():
    from distributed_muon.launch.megatron_pretrain import Model

    return dataclasses.replace(Model(), layers=2, hidden=128, heads=4, groups=2, ffn=256,
                               seq=128, micro_batch=4)


def _run(megatron_lm, tmp_path, name, *args, **kw):
    from distributed_muon.launch import megatron_pretrain as mp

    losses = mp.run(megatron_lm, mp.pretrain_args(*args, **kw), log=tmp_path / f"{name}.log",
                    cwd=tmp_path)
    print(f"\n{name}: " + " ".join(f"{i}:{v:.4f}" for i, v in sorted(losses.items())))
    return losses


def test_adam_and_dmuon_both_train(megatron_lm, model, tmp_path):
    adam = _run(megatron_lm, tmp_path, "adam", "adam", ITERS, model)
    dmuon = _run(megatron_lm, tmp_path, "dmuon", "dmuon", ITERS, model)
    for losses in (adam, dmuon):
        assert sorted(losses) == list(range(1, ITERS + 1))
        # From ~9.0 (log 8192) down. The first step runs at lr 0 (Megatron's warm-up starts
        # there), so compare the means of the first and last three: about 0.35 apart on one
        # H100 (2026-12-06; the last one alone fell 0.36 for adam).
        first, last = (sum(losses[i] for i in its) / 3 for its in ((1, 2, 3),
                                                                  (ITERS - 2, ITERS - 1, ITERS)))
        assert last < first - 0.2, losses
    # Megatron's argument dump: the runner passed the flag through and the parser took it.
    assert re.search(r"\boptimizer \.+ dmuon\b", (tmp_path / "dmuon.log").read_text())
    assert re.search(r"\boptimizer \.+ adam\b", (tmp_path / "adam.log").read_text())


def test_dmuon_resume_repeats_the_logged_losses(megatron_lm, model, tmp_path):
    ckpt = tmp_path / "ckpt"
    whole = _run(megatron_lm, tmp_path, "whole", "dmuon", ITERS, model)
    # Cut at SAVE_AT of an ITERS run (the mock data's order depends on the run's length).
    first = _run(megatron_lm, tmp_path, "first", "dmuon", ITERS, model, save=ckpt,
                 save_interval=SAVE_AT, exit_interval=SAVE_AT)
    assert sorted(first) == list(range(1, SAVE_AT + 1))
    assert [first[i] for i in sorted(first)] == [whole[i] for i in sorted(first)]
    resumed = _run(megatron_lm, tmp_path, "resumed", "dmuon", ITERS, model, load=ckpt)
    assert sorted(resumed) == list(range(SAVE_AT + 1, ITERS + 1))
    # Megatron's training_log does not reset its sums after a process's first iteration, so
    # the loss logged at a process's second iteration is the mean of its first two (0.19's
    # `should_reset = not is_first_iteration`; the whole run has it at iteration 2, compared
    # with itself above). Undone here, within the log's 7 significant digits.
    second = SAVE_AT + 2
    unaveraged = 2 * resumed[second] - resumed[second - 1]
    assert unaveraged == pytest.approx(whole[second], abs=2e-6), (resumed, whole)
    # Same data, same RNG (saved in the checkpoint), optimizer state restored: the same run.
    rest = [i for i in sorted(resumed) if i != second]
    assert [resumed[i] for i in rest] == [whole[i] for i in rest]
