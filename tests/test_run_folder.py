"""A run owns its folder: a second run or resume into a folder in use is refused in one line
naming the process that holds it, and a lock left by a dead process does not block."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

import afmbench
from afmbench.errors import ConfigError, FolderInUseError
from afmbench.run_folder import LOCK, owned, prepare_run_dir
from tests.conftest import REPO

QUIET = ("logger=none", "trainer.enable_progress_bar=false", "leaderboard.record=false")


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "afmbench", *args], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_two_runs_started_at_once_into_one_folder_exactly_one_runs(tmp_path):
    folder = tmp_path / "shared"
    args = ("run", f"run_dir={folder}", "trainer.max_epochs=10", *QUIET)
    first, second = _start(*args), _start(*args)
    outcomes = [(p.wait(timeout=300), *p.communicate()) for p in (first, second)]
    codes = sorted(code for code, _, _ in outcomes)
    assert codes[0] == 0 and codes[1] != 0, outcomes
    ((_, _, refused),) = [o for o in outcomes if o[0] != 0]
    (line,) = [x for x in refused.splitlines() if x.startswith("afmbench: error:")]
    survivor = first if first.returncode == 0 else second
    # It was refused by the live run's lock (naming it), or, had the other already finished,
    # because the folder holds that run.
    assert f"in use by process {survivor.pid}" in line or "already holds a run" in line, line
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "finished" and len(metrics["accuracy_matrix"]) == 5
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["experience_4.ckpt"]


def test_a_folder_in_use_is_refused_before_anything_is_written(tmp_path):
    folder = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from afmbench.run_folder import owned\n"
         "with owned(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(folder)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in folder.iterdir())
        out = subprocess.run(
            [sys.executable, "-m", "afmbench", "run", f"run_dir={folder}", *QUIET],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 2
        assert (
            out.stderr.strip()
            .splitlines()[-1]
            .startswith(
                f"afmbench: error: run_dir {folder.resolve()} is in use by process {holder.pid} ("
            )
        )
        assert sorted(p.name for p in folder.iterdir()) == before  # no .hydra, no config.yaml
        scenario = afmbench.build_scenario("split_digits", n_experiences=2)
        model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[8])
        with pytest.raises(FolderInUseError, match=f"in use by process {holder.pid}"):
            afmbench.run(scenario, model, run_dir=folder, verbose=False)
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead: its lock went with it, though its lock file stays.
    assert (folder / LOCK).is_file()
    with owned(folder) as path:
        assert (path / LOCK).read_text().startswith(f"process {os.getpid()} ")


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with owned(tmp_path / "x"), owned(tmp_path / "x") as path:
        assert path == (tmp_path / "x").resolve()
    with owned(tmp_path / "x"):  # released: it can be taken again
        pass


def test_two_jobs_of_a_sweep_that_resolve_to_one_folder(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "afmbench", "run", "-m", "seed=0,1", f"run_dir={sweep}",
         "hydra.sweep.subdir=same", "trainer.max_epochs=1", *QUIET],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert f"1 job(s) of the sweep failed: {sweep / 'same'}" in out.stderr
    metrics = json.loads((sweep / "same" / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["seed"] == 0  # the first job's, intact


def test_folders_probed_by_many_runs_at_once_are_all_writable(tmp_path):
    """Every run proves its folder writable before it starts; probes made at the same moment
    into one folder must not remove each other's files (a false "not writable")."""
    start, errors = threading.Barrier(4), []

    def probe() -> None:
        start.wait()
        try:
            for _ in range(500):
                prepare_run_dir(tmp_path / "one")
        except ConfigError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=probe) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert list((tmp_path / "one").iterdir()) == []
