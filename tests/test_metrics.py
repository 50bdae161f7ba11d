from bnsweep.training.convergence import epochs_to_converge


def test_first_epoch_reaching_the_target_is_reported_1_based() -> None:
    assert epochs_to_converge([0.5, 0.89, 0.9, 0.95], 0.9, budget=10) == (3, 1)
    assert epochs_to_converge([0.91], 0.9, budget=10) == (1, 1)


def test_never_reached_is_censored_at_budget_plus_one() -> None:
    assert epochs_to_converge([0.5, 0.6, 0.7], 0.9, budget=10) == (11, 0)
    assert epochs_to_converge([], 0.9, budget=5) == (6, 0)


def test_a_dip_after_reaching_the_target_does_not_move_it() -> None:
    assert epochs_to_converge([0.8, 0.93, 0.7, 0.95], 0.92, budget=4) == (2, 1)
