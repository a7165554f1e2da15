"""The validation split: held out of training, stratified, fixed by the seed, evaluated after
every experience, and what ``afmbench leaderboard --select val_acc`` picks from it."""

import csv
import io
import json
import statistics

import numpy as np
import pytest
import torch

import afmbench
from afmbench.cli import main
from afmbench.strategies import EWC
from tests.conftest import run_cli


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


def test_held_out_split_is_disjoint_stratified_and_fixed_by_the_seed():
    plain = afmbench.build_scenario("split_digits", n_experiences=5, seed=3)
    held = afmbench.build_scenario("split_digits", n_experiences=5, seed=3, validation=0.2)
    again = afmbench.build_scenario("split_digits", n_experiences=5, seed=3, validation=0.2)
    other = afmbench.build_scenario("split_digits", n_experiences=5, seed=4, validation=0.2)
    for e in range(5):
        (x, y, _), (xt, _yt, _), (xv, yv, _) = plain.train(e), held.train(e), held.validation(e)
        assert len(xt) + len(xv) == len(x)
        assert not _rows(xt) & _rows(xv)  # nothing validated on is trained on
        assert _rows(xt) | _rows(xv) == _rows(x)
        for label in y.unique():  # round(0.2 x n) of every class
            assert int((yv == label).sum()) == round(0.2 * int((y == label).sum()))
        assert torch.equal(xv, again.validation(e)[0])
        assert torch.equal(held.test(e)[0], plain.test(e)[0])
    assert not torch.equal(held.validation(0)[0], other.validation(0)[0])
    joint = held.joint_train()[0]
    assert len(joint) == sum(len(held.train(e)[0]) for e in range(5))
    assert not _rows(joint) & _rows(torch.cat([held.validation(e)[0] for e in range(5)]))


def _accuracy(model, split) -> float:
    x, y, t = split
    model.eval()
    with torch.no_grad():
        return float((model(x, t).argmax(1) == y).float().mean())


@pytest.mark.parametrize("joint", [False, True])
def test_every_validation_split_is_evaluated_after_every_experience(joint):
    scenario = afmbench.build_scenario("permuted_digits", n_experiences=3, validation=0.25)
    afmbench.seed_everything(0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
    result = afmbench.run(scenario, model, joint=joint, max_epochs=2, verbose=False)
    metrics = result.metrics
    held_out = np.asarray(metrics["val_accuracy_matrix"])
    assert held_out.shape == result.accuracy_matrix.shape == ((1, 3) if joint else (3, 3))
    # the last row is the final model's accuracy on each validation split, measured by hand
    final = [_accuracy(result.module.model, scenario.validation(j)) for j in range(3)]
    assert held_out[-1] == pytest.approx(final, abs=1e-6)
    assert metrics["val_acc"] == pytest.approx(float(np.mean(held_out[-1])))
    if joint:
        assert metrics["val_bwt"] is None
    else:
        bwt = np.mean([held_out[-1, j] - held_out[j, j] for j in range(2)])
        assert metrics["val_bwt"] == pytest.approx(float(bwt))
    # the test matrix is the test sets' alone
    tests = [_accuracy(result.module.model, scenario.test(j)) for j in range(3)]
    assert result.accuracy_matrix[-1] == pytest.approx(tests, abs=1e-6)


def test_a_run_without_validation_has_no_validation_fields():
    scenario = afmbench.build_scenario("split_digits", n_experiences=2)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[8])
    metrics = afmbench.run(scenario, model, verbose=False).metrics
    assert not {"val_accuracy_matrix", "val_acc", "val_bwt"} & set(metrics)


def test_a_fraction_outside_zero_to_one_is_one_line():
    out = run_cli("run", "scenario.validation=1.5", "logger=none")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "scenario.validation must be a fraction in [0, 1), got 1.5" in out.stderr


def test_select_reports_the_test_metrics_of_the_best_validated_configuration(tmp_path, capsys):
    db = tmp_path / "board.sqlite"
    scenario = afmbench.build_scenario("permuted_digits", n_experiences=3, validation=0.2)
    runs = []
    for strength in (0.1, 1000.0):
        for seed in (0, 1):
            afmbench.seed_everything(seed)
            model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes,
                                         hidden=[16])  # fmt: skip
            result = afmbench.run(scenario, model, [EWC(lambda_=strength)], seed=seed,
                                  run_dir=tmp_path / f"ewc{strength}_{seed}", leaderboard=db,
                                  verbose=False)  # fmt: skip
            runs.append(result.metrics)
    afmbench.seed_everything(0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
    runs.append(afmbench.run(scenario, model, run_dir=tmp_path / "naive", leaderboard=db,
                             verbose=False).metrics)  # fmt: skip

    # by hand: per strategy, the config hash with the best mean val_acc, and its mean test ACC
    by_hash: dict[str, list[dict]] = {}
    for metrics in runs:
        by_hash.setdefault(metrics["config_hash"], []).append(metrics)
    best: dict[str, tuple[float, float]] = {}
    for members in by_hash.values():
        strategy = members[0]["strategy"]
        score = statistics.fmean(m["val_acc"] for m in members)
        if strategy not in best or score > best[strategy][0]:
            best[strategy] = (score, statistics.fmean(m["acc"] for m in members))

    assert main(["leaderboard", "--db", str(db), "--select", "val_acc", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted(r["strategy"] for r in rows) == ["ewc", "naive"]
    for row in rows:
        val, acc = best[row["strategy"]]
        assert float(row["val_acc_mean"]) == pytest.approx(val)
        assert float(row["acc_mean"]) == pytest.approx(acc)
    assert main(["leaderboard", "--db", str(db), "--rank-by", "val_acc"]) == 0
    assert "val ACC" in capsys.readouterr().out


def test_select_without_validation_runs_is_one_line(tmp_path, capsys):
    db = tmp_path / "board.sqlite"
    scenario = afmbench.build_scenario("split_digits", n_experiences=2)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[8])
    afmbench.run(scenario, model, run_dir=tmp_path / "run", leaderboard=db, verbose=False)
    assert main(["leaderboard", "--db", str(db), "--select", "val_acc"]) == 2
    assert "has a validation ACC to select by" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "finished"
