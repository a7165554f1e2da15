"""The published-protocol suites: every arm of every suite's sweep composes into the run it
names, at the protocol the suite states."""

import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from afmbench.compose import load_config
from afmbench.config import config_dir
from afmbench.runner import plan
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import layer_families  # noqa: E402  (benchmarks/ scripts, importable once on the path)
import published  # noqa: E402

SUITES = sorted(
    path.stem
    for path in Path(config_dir(), "experiment").glob("*.yaml")
    if (Path(config_dir(), "arm") / path.stem).is_dir()
)


def _arms(suite: str) -> list[str]:
    sweep = OmegaConf.load(Path(config_dir(), "experiment", f"{suite}.yaml")).hydra.sweeper
    return str(sweep.params.arm).split(",")


@pytest.mark.parametrize("suite", SUITES)
def test_the_sweep_lists_every_arm_of_its_suite_once(suite):
    files = sorted(f"{suite}/{p.stem}" for p in Path(config_dir(), "arm", suite).glob("*.yaml"))
    assert sorted(_arms(suite)) == files


# the suites that follow van de Ven & Tolias's or Hsu et al.'s code: one Adam for the whole run
ADAM_SUITES = [s for s in SUITES if s.startswith(("vandeven", "hsu", "layer_families"))]
METHODS = {"none": "naive", "adam": "naive", "sgd": "naive", "offline": "joint",
           "online_ewc": "ewc"}  # fmt: skip


def _method(suite: str, arm: str) -> str:
    """The strategy an arm names: ``vandeven2019_split_mnist/task_online_ewc`` -> ``ewc``."""
    method = arm.split("/", 1)[1]
    if suite == "vandeven2019_split_mnist":
        method = method.split("_", 1)[1]
    return METHODS.get(method, method)


@pytest.mark.parametrize("suite", SUITES)
def test_every_arm_composes_into_its_method(suite):
    for arm in _arms(suite):
        cfg = load_config([f"experiment={suite}", f"arm={arm}"])
        plan(cfg)  # every option checked, the plugins built
        assert str(cfg.strategy.name) == _method(suite, arm), arm
        assert cfg.resume == "auto", arm
        if arm.endswith("online_ewc"):
            assert cfg.strategy.mode == "online", arm


@pytest.mark.parametrize("suite", ADAM_SUITES)
def test_adam_suites_keep_one_adam_for_the_whole_run(suite):
    for arm in _arms(suite):
        p = plan(load_config([f"experiment={suite}", f"arm={arm}"]))
        assert p.optimizer.reset_between_experiences is False, arm  # as the authors' code
        assert p.optimizer.name == ("sgd" if arm.endswith("/sgd") else "adam"), arm
        assert p.data.batch_size == 128, arm


def test_buzzega2020_is_mammoths_seq_mnist_with_its_best_args_converted():
    def config(arm):
        return load_config(["experiment=buzzega2020_seq_mnist", f"arm=buzzega2020_seq_mnist/{arm}"])

    base = config("sgd")
    assert base.scenario.protocol == "class" and list(base.model.hidden) == [100, 100]
    assert base.data.batch_size == 10 and base.trainer.max_epochs == 1
    assert base.optimizer.name == "sgd" and base.optimizer.momentum == 0.0
    assert base.optimizer.lr == 0.03
    # Mammoth's ER averages the loss over batch and replay stacked, lr 0.1: afmbench's sum of
    # the two means is twice that, so half the rate takes the same SGD steps
    er = config("er")
    assert er.optimizer.lr == 0.05 and er.strategy.replay_batch_size == 10
    derpp = config("derpp")
    assert (derpp.strategy.alpha, derpp.strategy.beta, derpp.optimizer.lr) == (1.0, 0.5, 0.03)
    agem = config("agem")
    assert agem.strategy.replay_batch_size == 128 and agem.optimizer.lr == 0.1
    assert {config(a).strategy.buffer_size for a in ("er", "agem", "derpp")} == {500}


def test_layer_families_choose_the_layer_on_validation_with_every_arm():
    for arm in _arms("layer_families"):
        for layer in (["forgetting=off"], ["forgetting=on", "forgetting.lambda_f=1.0"]):
            cfg = load_config(["experiment=layer_families", f"arm={arm}", *layer])
            plan(cfg)
            assert cfg.scenario.validation == 0.1 and cfg.scenario.protocol == "domain", arm
            assert cfg.forgetting.enabled == (layer[0] == "forgetting=on"), arm


def test_hsu2018_strengths_are_the_authors_converted():
    def strategy(arm):
        return load_config(["experiment=hsu2018_split_mnist_task", f"arm={arm}"]).strategy

    # no 1/2 in their EWC penalty: twice their reg_coef 100 (separate) and 400 (online)
    assert strategy("hsu2018_split_mnist_task/ewc").lambda_ == 200.0
    assert strategy("hsu2018_split_mnist_task/online_ewc").lambda_ == 800.0
    assert strategy("hsu2018_split_mnist_task/si").c == 300.0
    cfg = load_config(["experiment=hsu2018_split_mnist_task"])
    assert cfg.trainer.max_epochs == 4 and list(cfg.model.hidden) == [400, 400]


def test_vandeven2019_counts_iterations_per_task():
    cfg = load_config(["experiment=vandeven2019_split_mnist"])
    assert cfg.trainer.max_epochs == -1 and cfg.trainer.max_steps == 2000
    permuted = load_config(["experiment=vandeven2019_permuted_mnist"])
    assert permuted.trainer.max_steps == 5000 and permuted.optimizer.lr == 0.0001
    protocols = {
        str(load_config(["experiment=vandeven2019_split_mnist", f"arm={arm}"]).scenario.protocol)
        for arm in _arms("vandeven2019_split_mnist")
    }
    assert protocols == {"task", "domain", "class"}


def test_the_families_table_reports_the_layer_at_its_best_validated_lambda_f(tmp_path, monkeypatch):
    """benchmarks/layer_families.py: per strategy, the layer-on row is the lambda_f with the best
    mean validation ACC over seeds, reported with its test ACC (not the best test ACC)."""

    def row(name, seed, acc, val_acc):
        return {"arm": f"layer_families/{name}", "seed": seed, "acc": acc, "val_acc": val_acc,
                "bwt": -0.1}  # fmt: skip

    rows = [
        row("er_off_lf0", 0, 0.80, 0.79), row("er_off_lf0", 1, 0.82, 0.81),
        # lambda_f 0.1: best on test, worse on validation; 1.0: best mean validation ACC
        row("er_on_lf0.1", 0, 0.90, 0.70), row("er_on_lf0.1", 1, 0.90, 0.72),
        row("er_on_lf1.0", 0, 0.84, 0.83), row("er_on_lf1.0", 1, 0.86, 0.81),
    ]  # fmt: skip
    (tmp_path / "layer_families.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(layer_families, "RESULTS", tmp_path)
    (line,) = [
        x for x in layer_families.table("layer_families").splitlines() if x.startswith("| er")
    ]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "81.00 ± 1.41 (2)" and cells[3] == "85.00 ± 1.41 (2)"
    # the change's standard error: sqrt(2/2 + 2/2), both groups' sample variances being 2
    assert cells[4] == "1.0 (82.00)" and cells[5] == "+4.00 ± 1.41"


def test_strengths_two_ways_reports_the_best_validated_value_beside_the_authors(
    tmp_path, monkeypatch
):
    """benchmarks/published.py: the tuning table picks, per arm, the strength with the best mean
    validation ACC over seeds and names the authors' value from the arm's YAML."""

    def row(value, seed, acc, val_acc):
        arm = f"vandeven2019_split_mnist_tuning/task_si_s{value}"
        return {"arm": arm, "seed": seed, "acc": acc, "val_acc": val_acc}

    rows = [row(5, 0, 0.99, 0.95), row(5, 1, 0.99, 0.95),  # best test, worse validation
            row(50, 0, 0.97, 0.96), row(50, 1, 0.95, 0.96),  # the authors' c (arm YAML)
            row(500, 0, 0.90, 0.97), row(500, 1, 0.92, 0.97)]  # fmt: skip
    (tmp_path / "vandeven2019_split_mnist_tuning.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    monkeypatch.setattr(published, "RESULTS", tmp_path)
    (line,) = [x for x in published.strengths("vandeven2019_split_mnist_tuning").splitlines()
               if x.startswith("| task-IL SI")]  # fmt: skip
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:5] == ["50", "500", "97.00 / 96.00", "91.00 / 96.00"]
    assert cells[5] == "5, 50, 500 (2)"


def test_the_tuning_suite_is_its_suite_on_a_validation_split():
    tuned_arms = [a for a in _arms("vandeven2019_split_mnist") if a.endswith(("ewc", "si", "mas"))]
    for arm in tuned_arms:  # the arms with a strength to tune
        tuned = load_config(["experiment=vandeven2019_split_mnist_tuning", f"arm={arm}"])
        plain = load_config(["experiment=vandeven2019_split_mnist", f"arm={arm}"])
        assert tuned.scenario.validation == 0.1, arm
        tuned.scenario.validation = plain.scenario.validation
        assert OmegaConf.to_container(tuned) == OmegaConf.to_container(plain), arm


@pytest.mark.parametrize(
    "suite, normalize",
    [("vandeven2019_split_mnist", False), ("vandeven2019_permuted_mnist", False),
     ("buzzega2020_seq_mnist", False), ("hsu2018_split_mnist_task", True)],
)  # fmt: skip
def test_suites_feed_mnist_as_the_authors_code_does(suite, normalize):
    """van de Ven & Tolias's and Mammoth's code feed pixels in [0, 1]; Hsu et al. normalize.
    Only van de Ven & Tolias's Split MNIST draws its digit pairs anew for every seed."""
    scenario = load_config([f"experiment={suite}"]).scenario
    assert scenario.normalize is normalize
    shuffled = suite == "vandeven2019_split_mnist"
    assert scenario.get("class_order", "natural") == ("shuffled" if shuffled else "natural")


def test_collect_merges_finished_runs_and_writes_nothing_for_a_suite_under_way(
    tmp_path, monkeypatch
):
    """benchmarks/published.py collect: a finished run becomes a row with the command that
    reruns it (from Hydra's record); an unfinished one is skipped, and a suite with nothing
    finished yet gets no (empty) results file."""

    def job(suite, folder, status):
        path = tmp_path / "runs" / suite / folder
        (path / ".hydra").mkdir(parents=True)
        (path / ".hydra" / "overrides.yaml").write_text(
            f"- seed=1\n- experiment={suite}\n- arm={suite}/ewc\n"
        )
        metrics = {"status": status, "seed": 1, "acc": 0.9, "bwt": -0.1, "config_hash": "abc",
                   "accuracy_matrix": [[0.9, 0.1], [0.8, 1.0]], "train_time_s": 60.0,
                   "eval_time_s": 6.0}  # fmt: skip
        (path / "metrics.json").write_text(json.dumps(metrics))

    job("done_suite", "ewc_seed1", "finished")
    job("done_suite", "si_seed1", "running")
    job("new_suite", "ewc_seed1", "interrupted")
    monkeypatch.setattr(published, "RESULTS", tmp_path / "results")
    assert published.collect(tmp_path / "runs") == ["done_suite.jsonl: 1 runs"]
    assert not (tmp_path / "results" / "new_suite.jsonl").exists()
    (row,) = published.read(tmp_path / "results" / "done_suite.jsonl")
    assert row["arm"] == "done_suite/ewc" and row["final_accuracy_per_task"] == [0.8, 1.0]
    assert row["minutes"] == 1.1 and row["val_acc"] is None
    assert row["command"] == "afmbench run experiment=done_suite seed=1 arm=done_suite/ewc"
