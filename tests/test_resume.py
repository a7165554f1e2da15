"""Kill a run with SIGKILL, resume it, and get exactly the matrix of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import afmbench
from afmbench.errors import CheckpointError
from tests.conftest import REPO, run_cli

ARGS = (
    "scenario=permuted_digits", "scenario.n_experiences=4", "trainer.max_epochs=6",
    "optimizer.reset_between_experiences=false", "trainer.enable_progress_bar=false",
)  # fmt: skip


def _matrix(folder):
    return np.array(json.loads((folder / "metrics.json").read_text())["accuracy_matrix"])


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    full = run_cli("run", *ARGS, f"run_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-2000:]

    folder = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "afmbench", "run", *ARGS, f"run_dir={folder}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # metrics.json comes after the experience's checkpoint: waiting for the checkpoint alone
    # could kill the run between the two
    first = folder / "metrics.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads((folder / "metrics.json").read_text())["experiences_done"]
    assert done < 4, "the run finished before it could be killed"

    # resume=PATH alone: the run continues with the overrides it was started with.
    resumed = run_cli("run", f"resume={folder}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "with its overrides: " + " ".join(ARGS) in resumed.stdout
    assert "resuming after experience" in resumed.stdout
    assert np.array_equal(_matrix(folder), _matrix(tmp_path / "full"))
    assert json.loads((folder / "metrics.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_ctrl_c_records_an_interrupted_run_that_resumes(tmp_path):
    """SIGINT (Ctrl-C) mid-experience: one line with the resume command, exit code 130,
    status ``interrupted`` with the finished experiences kept; resuming completes the run."""
    folder = tmp_path / "stopped"
    # 20 epochs an experience: the second one outlasts the signal's way in on a fast machine
    args = [*ARGS, "scenario.n_experiences=2", "trainer.max_epochs=20", "logger=none"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "afmbench", "run", *args, f"run_dir={folder}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stdout:  # the first experience is done, the second under way
        if line.startswith("after experience 1/2"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "afmbench: error: interrupted during experience 2/2; the 1 finished are kept; "
        f"fix: continue with: afmbench run resume={folder}"
    )
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["experiences_done"] == 1

    resumed = run_cli("run", f"resume={folder}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after experience 1/2" in resumed.stdout
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "finished" and len(metrics["accuracy_matrix"]) == 2


def _tiny_run(folder, **kwargs):
    scenario = afmbench.build_scenario("split_digits", n_experiences=2)
    afmbench.seed_everything(0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
    return afmbench.run(scenario, model, max_epochs=1, run_dir=folder, verbose=False, **kwargs)


def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    _tiny_run(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "experience_1.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _tiny_run(tmp_path / "run", resume=True)
    out = run_cli("run", "scenario.n_experiences=2", f"run_dir={tmp_path / 'run'}", "resume=true")
    assert out.returncode == 2
    assert [line for line in out.stderr.splitlines() if line.startswith("afmbench: error:")][
        0
    ].count("truncated or corrupt") == 1


def test_resume_without_checkpoints_never_starts_afresh(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints/experience_"):
        _tiny_run(tmp_path / "empty", resume=True)


def test_resume_refuses_a_different_configuration(tmp_path):
    _tiny_run(tmp_path / "run", keep_checkpoints=True)
    ckpt = tmp_path / "run" / "checkpoints" / "experience_0.ckpt"
    with pytest.raises(CheckpointError, match="different configuration"):
        _tiny_run(tmp_path / "run", resume=ckpt, batch_size=16)


def test_resume_from_python_refuses_another_optimizer_or_model(tmp_path):
    """The Python API's config hash covers the optimizer and the model, as the CLI's does
    (it used to cover only the scenario and the plugins, so these resumed silently)."""
    _tiny_run(tmp_path / "run", keep_checkpoints=True)
    ckpt = tmp_path / "run" / "checkpoints" / "experience_0.ckpt"
    with pytest.raises(CheckpointError, match="different configuration"):
        _tiny_run(tmp_path / "run", resume=ckpt, optimizer=afmbench.OptimizerConfig(lr=0.5))
    with pytest.raises(CheckpointError, match="different configuration"):
        _tiny_run(tmp_path / "run", resume=ckpt, trainer_kwargs={"gradient_clip_val": 1.0})
    resumed = _tiny_run(tmp_path / "run", resume=ckpt, optimizer=afmbench.OptimizerConfig())
    assert resumed.metrics["status"] == "finished"


def test_resume_in_bf16_true_with_a_kept_optimizer_equals_the_uninterrupted_run(tmp_path):
    """bf16-true converts the weights inside fit; the restored optimizer state must be loaded
    after that, in the weights' dtype (it was cast to float32, and the run drifted)."""
    from afmbench.strategies import EWC

    def run(folder, **kwargs):
        scenario = afmbench.build_scenario("split_digits", n_experiences=5)
        afmbench.seed_everything(0)
        model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
        result = afmbench.run(
            scenario, model, [EWC(lambda_=10)], max_epochs=2, run_dir=folder, verbose=False,
            optimizer=afmbench.OptimizerConfig(reset_between_experiences=False),
            trainer_kwargs={"precision": "bf16-true"}, keep_checkpoints=True, **kwargs,
        )  # fmt: skip
        return result.module

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=tmp_path / "full/checkpoints/experience_0.ckpt")
    momentum = next(iter(resumed._optimizer.state.values()))["momentum_buffer"]
    assert momentum.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items()
    ):
        assert torch.equal(a, b), name
    assert torch.equal(full.accuracy.compute(), resumed.accuracy.compute())


def test_checkpoint_holds_the_loop_state(tmp_path):
    _tiny_run(tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "experience_1.ckpt", weights_only=False)
    loop = ckpt["afmbench"]
    assert loop["step"] == 1 and len(loop["train_s"]) == 2 and len(loop["baseline"]) == 2


def test_resume_under_other_overrides_fails_before_touching_the_run(tmp_path):
    folder = tmp_path / "run"
    args = ("scenario.n_experiences=2", "trainer.max_epochs=1", "logger=none")
    assert run_cli("run", *args, f"run_dir={folder}").returncode == 0
    kept = ("config.yaml", "metrics.json", ".hydra/overrides.yaml", ".hydra/config.yaml")
    before = {folder / name: (folder / name).read_bytes() for name in kept}
    out = run_cli("run", f"resume={folder}", "strategy=ewc", "optimizer.lr=0.05")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"afmbench: error: {folder} was written by a different configuration: optimizer.lr "
        "was 0.01, now 0.05; strategy was naive, now ewc; fix: drop the overrides that change "
        "this (resume=PATH alone reuses the run's own), or give the run's values: "
        "optimizer.lr=0.01 strategy=naive"
    )
    # Hydra's record of the run's overrides too: a refused resume used to rewrite it, and the
    # next `resume=PATH` then reused the refused overrides
    assert all(path.read_bytes() == data for path, data in before.items())
    again = run_cli("run", f"resume={folder}")
    assert again.returncode == 0, again.stderr[-2000:]


def _digits_api_run(cache, run_dir, plugins=(), resume=False):
    scenario = afmbench.build_scenario("split_digits", n_experiences=5, cache=str(cache))
    afmbench.seed_everything(0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
    return afmbench.run(scenario, model, list(plugins), max_epochs=1, run_dir=run_dir,
                        resume=resume, verbose=False)  # fmt: skip


def test_a_damaged_cache_file_fails_the_run_in_one_line_and_it_resumes(tmp_path):
    from afmbench.errors import DataNotFoundError

    whole = _digits_api_run(tmp_path / "cache", None)
    (folder,) = (tmp_path / "cache" / "scenarios").glob("split_digits-*[!k]")
    damaged = folder / "train_2.pt"
    damaged.write_bytes(damaged.read_bytes()[:500])

    with pytest.raises(DataNotFoundError) as caught:
        _digits_api_run(tmp_path / "cache", tmp_path / "run")
    assert str(caught.value) == (
        f"the scenario cache file {damaged} is damaged (PytorchStreamReader failed reading zip "
        f"archive: failed finding central directory); fix: delete {folder}; the next run "
        "rebuilds it from the data"
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["experiences_done"] == 2
    assert metrics["error"] == str(caught.value)

    import shutil

    shutil.rmtree(folder)  # the fix it names
    resumed = _digits_api_run(tmp_path / "cache", tmp_path / "run", resume=True)
    np.testing.assert_array_equal(resumed.accuracy_matrix, whole.accuracy_matrix)


def test_an_unexpected_exception_still_records_the_run_as_failed(tmp_path):
    class Broken(afmbench.ContinualPlugin):
        name = "broken"

        def on_train_start(self, trainer, pl_module):
            if pl_module.experience == 1:
                raise RuntimeError("a bug in a user's plugin")

    with pytest.raises(RuntimeError, match="a bug in a user's plugin"):  # the traceback stays
        _digits_api_run(tmp_path / "cache", tmp_path / "run", plugins=[Broken()])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["experiences_done"] == 1
    assert metrics["error"] == "RuntimeError: a bug in a user's plugin"
    assert len(metrics["accuracy_matrix"]) == 1


class _CreatesAFile:
    """An object whose unpickling creates a file: what a malicious checkpoint would carry."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_none(tmp_path):
    import torch

    _tiny_run(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "experience_1.ckpt"
    assert (
        torch.load(ckpt, weights_only=True)["afmbench"]["step"] == 1
    )  # afmbench writes plain data
    planted = tmp_path / "pwned"
    state = torch.load(ckpt, weights_only=True)
    state["afmbench"]["payload"] = _CreatesAFile(planted)
    torch.save(state, ckpt)
    import pickle

    pickle.loads(pickle.dumps(_CreatesAFile(tmp_path / "works")))  # the payload is real:
    assert (tmp_path / "works").exists()  # unpickling it creates its file
    with pytest.raises(CheckpointError, match="holds objects other than tensors") as caught:
        _tiny_run(tmp_path / "run", resume=True)
    assert "(io.open)" in str(caught.value)  # the type it refused, named
    from afmbench.checkpoint import load_model_weights  # what `afmbench probe` reads with

    with pytest.raises(CheckpointError, match="loading it could run code"):
        load_model_weights(torch.nn.Linear(1, 1), ckpt)
    assert not planted.exists()


def test_resume_auto_starts_continues_or_keeps_a_run(tmp_path, capsys):
    """``resume=auto`` is what a sweep spread over several sittings needs: a fresh start in an
    empty folder, the rest of an interrupted run, and a finished run left as it is."""

    whole = _digits_api_run(tmp_path / "cache", None)
    fresh = afmbench.run(*_digits_api_parts(tmp_path / "cache"), max_epochs=1, verbose=False,
                         run_dir=tmp_path / "run", resume="auto", keep_checkpoints=True)  # fmt: skip
    np.testing.assert_array_equal(fresh.accuracy_matrix, whole.accuracy_matrix)
    # as a run killed after its second experience leaves its folder
    for k in (2, 3, 4):
        (tmp_path / "run" / "checkpoints" / f"experience_{k}.ckpt").unlink()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    metrics.update(status="running", experiences_done=2)
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(metrics))
    continued = _digits_api_run(tmp_path / "cache", tmp_path / "run", resume="auto")
    np.testing.assert_array_equal(continued.accuracy_matrix, whole.accuracy_matrix)
    assert continued.metrics["status"] == "finished"
    # continued, not rerun: the first two experiences' timings come from the checkpoint
    train_s = continued.metrics["timings"]["train_s"]
    assert train_s[:2] == fresh.metrics["timings"]["train_s"][:2] and len(train_s) == 5

    record = (tmp_path / "run" / "metrics.json").read_text()
    capsys.readouterr()
    kept = afmbench.run(*_digits_api_parts(tmp_path / "cache"), max_epochs=1,
                        run_dir=tmp_path / "run", resume="auto")  # fmt: skip
    assert "has finished already: kept (resume=auto)" in capsys.readouterr().out
    np.testing.assert_array_equal(kept.accuracy_matrix, whole.accuracy_matrix)
    assert (tmp_path / "run" / "metrics.json").read_text() == record  # not rerun

    with pytest.raises(CheckpointError, match="holds a finished run of another configuration"):
        afmbench.run(*_digits_api_parts(tmp_path / "cache"), max_epochs=2,
                     run_dir=tmp_path / "run", resume="auto", verbose=False)  # fmt: skip
    assert (tmp_path / "run" / "metrics.json").read_text() == record


def _digits_api_parts(cache):
    scenario = afmbench.build_scenario("split_digits", n_experiences=5, cache=str(cache))
    afmbench.seed_everything(0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
    return scenario, model


def test_a_sweep_run_again_with_resume_auto_keeps_its_finished_jobs(tmp_path):
    args = ("run", "-m", "scenario.n_experiences=2", "trainer.max_epochs=1", "seed=0,1",
            "logger=none", "resume=auto", f"run_dir={tmp_path / 'sweep'}",
            f"leaderboard.db={tmp_path / 'board.sqlite'}", "trainer.enable_progress_bar=false")  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    records = {p: p.read_text() for p in (tmp_path / "sweep").glob("*/metrics.json")}
    assert len(records) == 2
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("has finished already: kept (resume=auto)") == 2
    assert {p: p.read_text() for p in records} == records
