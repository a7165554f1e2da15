"""Two CPU processes with gloo: identical state on every rank, accuracy close to one process."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "tests" / "scripts" / "ddp_run.py"
CONFIGS = ["naive", "ewc", "si", "mas", "anpyc", "ewc+fl", "si+fl", "er", "agem"]
REPLAY = {"er", "agem"}  # no importance; each rank keeps its own share of the buffer


def _launch(out, devices, batch_size):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(devices), str(batch_size), *CONFIGS],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every configuration once with two processes (batch 16 each) and once alone (batch 32)."""
    root = tmp_path_factory.mktemp("ddp")
    _launch(root / "ddp", 2, 16)
    _launch(root / "single", 1, 32)
    return root


def _load(root, config, rank):
    return torch.load(root / config / f"rank{rank}.pt", weights_only=False)


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_two_processes_agree_and_match_one_process(runs, config):
    rank0, rank1 = _load(runs / "ddp", config, 0), _load(runs / "ddp", config, 1)
    _assert_identical(rank0["params"], rank1["params"])
    assert rank0["importance"].keys() == rank1["importance"].keys()
    for name in rank0["importance"]:
        assert rank0["importance"][name] or name in REPLAY, f"{name} reported no importance"
        _assert_identical(rank0["importance"][name], rank1["importance"][name])
    assert (rank0["matrix"] == rank1["matrix"]).all()
    single = _load(runs / "single", config, 0)  # same global batch size
    for name, gates in single["gates"].items():  # the layer's gate sample: every rank's, whole
        _assert_identical(rank0["gates"][name], rank1["gates"][name])
        for key, sample in gates.items():
            assert rank0["gates"][name][key].shape == sample.shape, key
    assert abs(single["acc"] - rank0["acc"]) < 0.05, (single["acc"], rank0["acc"])


@pytest.mark.slow
def test_several_devices_without_a_strategy_run_ddp_on_a_multi_head_model(tmp_path):
    """``trainer.devices=2`` alone: Lightning picks DDP itself, and the task protocol's unused
    heads must be declared to it as they are for ``trainer.strategy=ddp`` (this used to end
    in DDP's unused-parameters traceback, once per process)."""
    import json

    from tests.conftest import run_cli

    folder = tmp_path / "run"
    out = run_cli(
        "run", "trainer.devices=2", "trainer.accelerator=cpu", "scenario.n_experiences=2",
        "trainer.max_epochs=1", "logger=none", "leaderboard.record=false", f"run_dir={folder}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["protocol"] == "task"


@pytest.mark.slow
def test_a_resumed_ddp_run_equals_the_uninterrupted_one(tmp_path):
    """Each process counts its share of the test sets; a checkpoint must hold the sum, and a
    resumed run must count it once. It held rank 0's share, which every rank then loaded, so
    the finished experiences' rows changed on resume."""
    import json

    script = REPO / "tests" / "scripts" / "ddp_resume.py"
    checkpoint = tmp_path / "full" / "checkpoints" / "experience_0.ckpt"
    for args in ([tmp_path / "full"], [tmp_path / "resumed", checkpoint]):
        proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    full, resumed = (
        json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("full", "resumed")
    )
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["val_accuracy_matrix"] == full["val_accuracy_matrix"]
    assert resumed["bwt"] == full["bwt"] and resumed["status"] == "finished"
    # the validation splits, evaluated in shards by two processes, are counted whole, once:
    # the last row equals the final weights' accuracy measured here in one process
    import afmbench
    from afmbench.checkpoint import load_model_weights

    scenario = afmbench.build_scenario("permuted_digits", n_experiences=3, seed=0, validation=0.2)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[32])
    load_model_weights(model, tmp_path / "full" / "checkpoints" / "experience_2.ckpt")
    model.eval()
    with torch.no_grad():
        final = [float((model(x, t).argmax(1) == y).float().mean())
                 for x, y, t in map(scenario.validation, range(3))]  # fmt: skip
    assert full["val_accuracy_matrix"][-1] == pytest.approx(final, abs=1e-6)


@pytest.mark.slow
def test_a_loss_that_diverges_on_one_process_stops_them_all(tmp_path):
    """A rank that raised alone left the others in the gradients' all-reduce: under gloo rank 0
    then failed with "Connection closed by peer", which the run recorded as its error; NCCL
    waits for its timeout. Every rank now stops at that step and the run records why."""
    import json

    script = REPO / "tests" / "scripts" / "ddp_nan.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "loss became non-finite on another process in experience 2/2" in proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["experiences_done"] == 1
    assert metrics["error"].startswith("loss became non-finite on another process")
