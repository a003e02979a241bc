from distributed_muon.launch.regression import best_loss, make_problem


def test_muon_beats_sgd_on_ill_conditioned_regression():
    # Equal steps, each optimizer at the best lr of its own grid, several seeds.
    for seed in (0, 1, 2):
        problem = make_problem(seed)
        muon, _ = best_loss(problem, "muon", steps=100)
        sgd, _ = best_loss(problem, "sgd", steps=100)
        assert muon < 0.5 * sgd, (seed, muon, sgd)


def test_problem_has_the_chosen_condition_number():
    import torch

    problem = make_problem(0, condition=300.0)
    s = torch.linalg.svdvals(problem.X)
    assert abs(float(s.max() / s.min()) - 300.0) < 1e-2
