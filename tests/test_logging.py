"""W&B offline runs read back from their files, and the same figures in the run folder."""

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import afmbench
from afmbench.cli import main
from afmbench.loggers import make_logger, wandb_mode
from afmbench.plugin import ContinualPlugin
from tests.conftest import run_cli
from tests.wandb_records import complete, history, summary


class KnownImportance(ContinualPlugin):
    """Reports importance = |weight| of the first layer, so the histogram is predictable."""

    name = "known"

    def on_train_start(self, trainer, pl_module):
        self.model = pl_module.model

    def importance(self):
        return {"body.1.weight": self.model.body[1].weight.detach().abs()}


def _run_file(folder: Path) -> Path:
    return next(folder.glob("wandb/offline-run-*/run-*.wandb"))


def test_offline_run_holds_table_heatmap_histograms_and_summary(tmp_path):
    scenario = afmbench.build_scenario("split_digits", n_experiences=2, validation=0.2)
    afmbench.seed_everything(0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
    plugin = KnownImportance()
    logger = make_logger({"name": "wandb", "mode": "offline"}, tmp_path)
    result = afmbench.run(
        scenario, model, [plugin], max_epochs=2, run_dir=tmp_path, logger=logger, verbose=False
    )

    run_file = _run_file(tmp_path)
    media = run_file.parent / "files"
    rows = history(run_file)
    evals = [r for r in rows if "eval/tasks_learned" in r]
    assert [r["eval/tasks_learned"] for r in evals] == [1, 2]
    # experience-level charts are drawn against the tasks learned, validation curves too
    defined = {
        r.metric.glob_name or r.metric.name: r.metric.step_metric
        for r in complete(run_file)
        if r.WhichOneof("record_type") == "metric"
    }
    for family in ("eval/*", "importance/*", "gates/*", "sparsity/*"):
        assert defined[family] == "eval/tasks_learned", defined
    held_out = result.metrics["val_accuracy_matrix"]
    for i, r in enumerate(evals):
        assert r["eval/val_avg_acc"] == pytest.approx(np.mean(held_out[i][: i + 1]))
        assert r["eval/val_acc_task_1"] == pytest.approx(held_out[i][1])
    # the accuracy matrix as a wandb.Table: the last one holds the final matrix
    table = json.loads((media / evals[-1]["eval/accuracy_matrix/path"]).read_text())
    assert table["columns"] == ["after", "task_0", "task_1"]
    assert np.allclose([row[1:] for row in table["data"]], result.accuracy_matrix)
    # the heatmap image
    image = Image.open(media / evals[-1]["eval/accuracy_heatmap/path"])
    assert image.size[0] > 100 and image.size[1] > 100
    # importance histogram: |w| / max|w| in 20 bins
    key = "importance/known/body.1.weight"
    expected, _ = np.histogram(
        scaled := (w := model.body[1].weight.detach().abs().flatten().numpy()) / w.max(),
        bins=20,
        range=(0, 1),
    )
    assert evals[-1][f"{key}/_type"] == "histogram"
    assert evals[-1][f"{key}/values"] == expected.tolist() and len(scaled) == expected.sum()
    # per-step losses and the final summary
    assert any("train/loss" in r for r in rows)
    final = summary(run_file)
    assert (
        abs(final["acc"] - result.metrics["acc"]) < 1e-9
        and "bwt" in final
        and "train_time_s" in final
    )


def test_strategy_and_forgetting_layer_histograms_through_the_cli(tmp_path):
    out = run_cli("run", "strategy=ewc", "forgetting=on", "scenario.n_experiences=2", "trainer.max_epochs=1",
                  f"run_dir={tmp_path}", "trainer.enable_progress_bar=false", "figures=true")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = history(_run_file(tmp_path))
    # EWC's penalty enters training through its closed-form gradient, yet is logged as a
    # value, and the logged total is the task loss plus every penalty
    steps = [r for r in rows if "train/penalty/ewc" in r]
    assert steps and all(r["train/penalty/ewc"] > 0 for r in steps)
    for r in steps:
        parts = r["train/task_loss"] + r["train/penalty/ewc"] + r["train/penalty/forgetting"]
        assert r["train/loss"] == pytest.approx(parts, rel=1e-5)
    final = [r for r in rows if "eval/tasks_learned" in r][-1]
    importance = {
        k.split("/")[2] for k in final if k.startswith("importance/ewc/") and k.endswith("/_type")
    }
    assert {"body.1.weight", "body.3.weight", "body.2.1.weight"} <= importance  # gate weights too
    assert final["gates/body.2/_type"] == "histogram" and sum(final["gates/body.2/values"]) > 0
    assert 0.0 <= final["sparsity/body.2"] <= 1.0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["layer_sparsity"]) == {"body.2", "body.4"}
    assert (tmp_path / "plots" / "importance_ewc.png").is_file() and (
        tmp_path / "plots" / "gates.png"
    ).is_file()


def test_short_epochs_log_once_each_without_lightning_warning(tmp_path):
    # the digits' experiences are ~250 samples: 4 batches of 64, fewer than
    # log_every_n_steps=10, so Lightning would warn every experience and log no epoch
    scenario = afmbench.build_scenario("split_digits", n_experiences=5)
    afmbench.seed_everything(0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
    logger = make_logger({"name": "csv"}, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        afmbench.run(scenario, model, max_epochs=2, batch_size=64, run_dir=tmp_path,
                     logger=logger, trainer_kwargs={"log_every_n_steps": 10}, verbose=False)  # fmt: skip
    assert not [w for w in caught if "logging interval" in str(w.message)]
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        logged = [row for row in csv.DictReader(handle) if row["train/loss"]]
    batches = [-(-len(scenario.train(e)[0]) // 64) for e in range(5)]
    assert batches == [4] * 5
    # one loss per epoch, at each epoch's last step, through all five experiences
    assert [int(row["step"]) for row in logged] == [4 * k + 3 for k in range(10)]

    # after each experience, its row of the accuracy matrix at the steps trained so far
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        evaluated = [row for row in csv.DictReader(handle) if row["eval/avg_acc"]]
    matrix = json.loads((tmp_path / "metrics.json").read_text())["accuracy_matrix"]
    assert [int(row["step"]) for row in evaluated] == [8 * (i + 1) for i in range(5)]
    for i, row in enumerate(evaluated):
        assert int(row["eval/tasks_learned"]) == i + 1
        assert [float(row[f"eval/acc_task_{j}"]) for j in range(5)] == pytest.approx(matrix[i])
        assert float(row["eval/avg_acc"]) == pytest.approx(np.mean(matrix[i][: i + 1]))


def test_a_joint_runs_logged_average_accuracy_covers_every_task(tmp_path):
    scenario = afmbench.build_scenario("split_digits", n_experiences=5)
    afmbench.seed_everything(0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
    logger = make_logger({"name": "csv"}, tmp_path)
    afmbench.run(scenario, model, joint=True, run_dir=tmp_path, logger=logger, verbose=False)
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        (row,) = [row for row in csv.DictReader(handle) if row["eval/avg_acc"]]
    (accuracies,) = json.loads((tmp_path / "metrics.json").read_text())["accuracy_matrix"]
    assert float(row["eval/avg_acc"]) == pytest.approx(np.mean(accuracies))
    assert np.ptp(accuracies) > 0.01  # task 0 alone would differ from the mean


def test_figures_are_drawn_on_request_or_later_by_afmbench_plot(tmp_path, capsys):
    out = run_cli("run", "logger=none", f"run_dir={tmp_path}", "trainer.enable_progress_bar=false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert not (tmp_path / "plots").exists()  # off by default: a short run stays short
    drawn = run_cli("plot", str(tmp_path))
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    names = ("accuracy_matrix.png", "avg_accuracy.png")
    assert f"{tmp_path}: {', '.join(names)}" in drawn.stdout
    for name in names:
        with Image.open(tmp_path / "plots" / name) as image:
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.std() > 10, f"{name} looks blank"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(empty)]) == 2  # as the command line runs it, in this process
    refused = capsys.readouterr().err
    assert refused.count("\n") == 1
    assert "has no readable metrics.json" in refused and "fix:" in refused


def test_online_without_credentials_falls_back_to_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    import pytest

    with pytest.warns(UserWarning, match="no API key.*logging offline instead"):
        assert wandb_mode("online") == "offline"


def test_online_without_network_falls_back_quickly(monkeypatch):
    import time

    import pytest

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://10.255.255.1:9")  # unroutable
    started = time.time()
    with pytest.warns(UserWarning, match="cannot reach"):
        assert wandb_mode("online") == "offline"
    assert time.time() - started < 10


def test_a_resumed_run_continues_its_csv_log(tmp_path):
    """Resuming after experience 1 of 5 keeps the log of experience 1 (Lightning's CSV logger
    deleted it), drops the rows of the interrupted experiences, and logs them again at the same
    steps: the file ends as the uninterrupted run's."""
    scenario = afmbench.build_scenario("split_digits", n_experiences=5)

    def run(**kwargs):
        afmbench.seed_everything(0)
        model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
        afmbench.run(scenario, model, max_epochs=2, batch_size=64, run_dir=tmp_path,
                     logger=make_logger({"name": "csv"}, tmp_path), keep_checkpoints=True,
                     verbose=False, **kwargs)  # fmt: skip
        return (tmp_path / "csv" / "metrics.csv").read_text()

    uninterrupted = run()
    assert len(uninterrupted.splitlines()) > 5 * 3  # header, losses and evaluations
    assert run(resume=tmp_path / "checkpoints" / "experience_0.ckpt") == uninterrupted
