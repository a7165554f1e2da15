"""Continual-learning metrics on hand-made accuracy matrices, and the torchmetrics counts."""

import numpy as np
import pytest
import torch

from afmbench.metrics import AccuracyMatrix, summarize

R = np.array(
    [
        [0.90, 0.10, 0.20],
        [0.60, 0.80, 0.30],
        [0.50, 0.70, 0.95],
    ]
)
BASELINE = np.array([0.10, 0.15, 0.05])


def test_acc_is_the_mean_of_the_last_row():
    assert summarize(R)["acc"] == pytest.approx((0.50 + 0.70 + 0.95) / 3)


def test_bwt_compares_final_with_just_learned_accuracy():
    # (0.50 - 0.90) and (0.70 - 0.80), averaged over the first T-1 tasks
    assert summarize(R)["bwt"] == pytest.approx(((0.50 - 0.90) + (0.70 - 0.80)) / 2)


def test_forgetting_uses_the_best_earlier_accuracy():
    metrics = summarize(R)
    # task 0: best of rows 0..1 is 0.90, final 0.50; task 1: best 0.80, final 0.70
    assert metrics["forgetting_per_task"] == pytest.approx([0.40, 0.10])
    assert metrics["forgetting"] == pytest.approx(0.25)


def test_forgetting_can_peak_after_the_task_was_learned():
    peaked = R.copy()
    peaked[1, 0] = 0.97  # task 0 improved while learning task 1, then dropped
    assert summarize(peaked)["forgetting_per_task"][0] == pytest.approx(0.97 - 0.50)


def test_fwt_measures_zero_shot_gain_over_the_untrained_model():
    # R[0,1] - b_1 = 0.10 - 0.15; R[1,2] - b_2 = 0.30 - 0.05
    assert summarize(R, BASELINE)["fwt"] == pytest.approx(((0.10 - 0.15) + (0.30 - 0.05)) / 2)
    assert summarize(R)["fwt"] is None


def test_average_accuracy_after_each_task_uses_tasks_seen_so_far():
    assert summarize(R)["avg_acc_per_task"] == pytest.approx([0.90, 0.70, (0.50 + 0.70 + 0.95) / 3])


def test_joint_has_one_row_and_no_sequence_metrics():
    metrics = summarize(np.array([[0.9, 0.8, 0.7]]))
    assert metrics["acc"] == pytest.approx(0.8)
    assert metrics["avg_acc_per_task"] == pytest.approx([0.9, 0.85, 0.8])
    assert metrics["bwt"] is None and metrics["forgetting"] is None and metrics["fwt"] is None


def test_no_forgetting_gives_zero_bwt_and_forgetting():
    perfect = np.ones((4, 4))
    metrics = summarize(perfect, np.zeros(4))
    assert metrics["bwt"] == 0 and metrics["forgetting"] == 0 and metrics["fwt"] == 1


def test_accuracy_matrix_counts_per_row_and_task():
    metric = AccuracyMatrix(n_rows=2, n_tasks=2)
    metric.update(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 0, 1]), row=1, task=0)
    metric.update(torch.tensor([2, 2]), torch.tensor([2, 1]), row=1, task=1)
    metric.update(torch.tensor([0]), torch.tensor([0]), row=1, task=1)
    matrix = metric.compute()
    assert matrix[1, 0].item() == pytest.approx(3 / 4)
    assert matrix[1, 1].item() == pytest.approx(2 / 3)
    assert torch.isnan(matrix[0]).all()  # nothing evaluated in row 0


def test_accuracy_matrix_state_round_trips_through_a_state_dict():
    metric = AccuracyMatrix(n_rows=2, n_tasks=1)
    metric.update(torch.tensor([1, 1]), torch.tensor([1, 0]), row=0, task=0)
    restored = AccuracyMatrix(n_rows=2, n_tasks=1)
    restored.load_state_dict(metric.state_dict())
    assert restored.compute()[0, 0].item() == pytest.approx(0.5)
