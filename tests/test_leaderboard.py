"""The leaderboard: aggregation checked by hand, atomic rows, concurrent writers, the HTML report."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from afmbench.cli import main
from afmbench.leaderboard import load_groups, record_run, render
from tests.conftest import REPO


def leaderboard_command(args: list[str]) -> int:
    """``afmbench leaderboard ARGS`` as the command line runs it."""
    return main(["leaderboard", *args])


def _metrics(
    strategy, seed, acc, bwt, forgetting, config_hash, layer=False, scenario="split_digits"
):
    matrix = [[acc + 0.1, 0.5], [acc - 0.05, acc + 0.05]]
    return {
        "status": "finished", "scenario": scenario, "protocol": "task", "strategy": strategy,
        "forgetting_layer": layer, "seed": seed, "model": "mlp", "config_hash": config_hash,
        "acc": acc, "bwt": bwt, "fwt": 0.0, "forgetting": forgetting, "train_time_s": 1.0,
        "accuracy_matrix": matrix, "avg_acc_per_task": [acc + 0.1, acc],
        "importance_histograms": {strategy: {"body.1.weight": [5, 3, 2] + [0] * 17}},
        "config": {"seed": seed},
    }  # fmt: skip


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "board.sqlite"
    rows = [
        ("ewc", 0, 0.90, -0.05, 0.06, "h-ewc"), ("ewc", 1, 0.80, -0.15, 0.16, "h-ewc"),
        ("ewc", 2, 0.85, -0.10, 0.11, "h-ewc"), ("naive", 0, 0.60, -0.40, 0.41, "h-naive"),
        ("naive", 1, 0.70, -0.30, 0.31, "h-naive"),
    ]  # fmt: skip
    for i, (strategy, seed, acc, bwt, forgetting, config_hash) in enumerate(rows):
        record_run(
            path, _metrics(strategy, seed, acc, bwt, forgetting, config_hash), tmp_path / f"run{i}"
        )
    record_run(
        path, _metrics("ewc", 0, 0.95, -0.02, 0.03, "h-ewc-f", layer=True), tmp_path / "run-f"
    )
    return path


def test_groups_are_ranked_by_mean_acc_with_sample_std(db):
    groups = load_groups(db)
    assert [(g.strategy, g.forgetting_layer) for g in groups] == [
        ("ewc", True),
        ("ewc", False),
        ("naive", False),
    ]
    ewc = groups[1]
    mean, std = ewc.stat("acc")
    assert mean == pytest.approx((0.90 + 0.80 + 0.85) / 3)
    # sample std of 0.90, 0.80, 0.85: sqrt(((0.05)^2 + (0.05)^2 + 0) / 2) = 0.05
    assert std == pytest.approx(0.05)
    assert ewc.stat("bwt") == pytest.approx((-0.10, 0.05))
    naive = groups[2]
    assert naive.stat("acc") == pytest.approx((0.65, np.sqrt(0.005)))
    assert groups[0].stat("acc") == (0.95, None)  # a single seed has no spread


def test_a_rerun_of_a_seed_replaces_it_and_n_counts_seeds(db, tmp_path):
    record_run(db, _metrics("ewc", 0, 0.70, -0.2, 0.2, "h-ewc"), tmp_path / "rerun")
    ewc = load_groups(db)[1]
    assert sorted(r["seed"] for r in ewc.runs) == [0, 1, 2]
    assert ewc.stat("acc")[0] == pytest.approx((0.70 + 0.80 + 0.85) / 3)


def test_configurations_sharing_a_label_get_their_hash_in_the_figures(db, tmp_path):
    from afmbench.leaderboard import distinct_labels

    record_run(db, _metrics("ewc", 0, 0.5, -0.1, 0.1, "h-ewc-lr"), tmp_path / "other-lr")
    labels = distinct_labels(load_groups(db))
    assert labels == {
        "h-ewc-f": "ewc + forgetting layer",
        "h-ewc": "ewc [h-ewc]",
        "h-ewc-lr": "ewc [h-ewc-lr]",
        "h-naive": "naive",
    }


def test_renderings_carry_the_same_numbers(db):
    text = render(load_groups(db), "table")
    assert "0.8500 ± 0.0500" in text and "0.6500 ± 0.0707" in text
    markdown = render(load_groups(db), "markdown").splitlines()
    assert (
        markdown[0].startswith("| scenario | protocol | rank | strategy") and len(markdown) == 2 + 3
    )
    assert "0.9500 ±" not in text and "0.9500" in text  # one seed: no spread shown
    header, *lines = render(load_groups(db), "csv").splitlines()
    assert header == (
        "scenario,protocol,rank,strategy,forgetting_layer,acc_mean,acc_std,bwt_mean,bwt_std,"
        "forgetting_mean,forgetting_std,n,config_hash"
    )
    rows = [line.split(",") for line in lines]
    assert [(r[2], r[3], r[4], r[11]) for r in rows] == [
        ("1", "ewc", "1", "1"),
        ("2", "ewc", "0", "3"),
        ("3", "naive", "0", "2"),
    ]
    assert float(rows[1][5]) == pytest.approx(0.85) and float(rows[1][6]) == pytest.approx(0.05)
    assert rows[0][6] == ""  # no std of a single seed


def test_scenario_filter(db, tmp_path):
    record_run(
        db,
        _metrics("naive", 0, 0.5, -0.1, 0.1, "other", scenario="permuted_mnist"),
        tmp_path / "pm",
    )
    assert {g.scenario for g in load_groups(db)} == {"split_digits", "permuted_mnist"}
    assert {g.scenario for g in load_groups(db, "permuted_mnist")} == {"permuted_mnist"}


def test_unfinished_runs_are_refused_and_a_resumed_run_replaces_its_row(db, tmp_path):
    with pytest.raises(ValueError):
        record_run(
            db, {**_metrics("ewc", 9, 0.1, 0, 0, "x"), "status": "failed"}, tmp_path / "failed"
        )
    record_run(
        db, _metrics("naive", 1, 0.75, -0.3, 0.3, "h-naive"), tmp_path / "run4"
    )  # same folder as before
    assert load_groups(db)[2].stat("acc")[0] == pytest.approx(0.675)


WRITER = """
import json, sys, time
from afmbench.leaderboard import record_run
metrics = json.loads(sys.argv[2])
while time.time() < float(sys.argv[3]):  # start together
    time.sleep(0.001)
record_run(sys.argv[1], metrics, sys.argv[4])
"""


def test_twenty_processes_writing_at_once_lose_no_row(tmp_path):
    path = tmp_path / "concurrent.sqlite"
    start = time.time() + 3
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path),
                          json.dumps(_metrics("naive", i, 0.5, -0.1, 0.1, "h")), str(start), str(tmp_path / f"r{i}")])
        for i in range(20)
    ]  # fmt: skip
    assert [p.wait(timeout=120) for p in procs] == [0] * 20
    assert len(load_groups(path)[0].runs) == 20


def test_a_killed_run_leaves_no_row(tmp_path):
    board = tmp_path / "board.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "afmbench", "run", "scenario=permuted_digits", "trainer.max_epochs=20",
         f"run_dir={tmp_path / 'run'}", f"leaderboard.db={board}", "logger=none", "trainer.enable_progress_bar=false"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300
    while (
        not (tmp_path / "run" / "metrics.json").exists()
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "running"
    assert load_groups(board) == []


def test_cli_prints_and_writes(db, tmp_path, capsys):
    assert leaderboard_command(["--db", str(db), "--format", "markdown"]) == 0
    assert "| split_digits | task | 1 | ewc | on |" in capsys.readouterr().out
    assert leaderboard_command(["--db", str(tmp_path / "missing.sqlite")]) == 2
    assert "no leaderboard at" in capsys.readouterr().err
    assert leaderboard_command(["--db", str(db), "--scenario", "split_mnst"]) == 2
    assert "no runs of scenario 'split_mnst'" in (err := capsys.readouterr().err)
    assert err.rstrip().endswith("fix: use one of split_digits")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert leaderboard_command(["--db", str(db), "-o", str(blocker / "r.md")]) == 2
    assert f"cannot write {blocker / 'r.md'}" in capsys.readouterr().err


def test_html_report_embeds_the_figures(db, tmp_path):
    page = render(load_groups(db), "html")
    # curves, one heatmap per group, importance: ewc with vs without the layer, and naive's
    assert page.count("<img") == 1 + 3 + 2
    assert "parameter importance with and without the forgetting layer" in page
    report = tmp_path / "report.html"
    report.write_text(page)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed: the HTML was checked structurally only")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400",
         report.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.std() > 20, "the screenshot is blank"
    colourful = (
        pixels.max(axis=2) - pixels.min(axis=2)
    ) > 60  # plots, not just black text on white
    assert colourful.mean() > 0.01


def _row(db, run_dir):
    import sqlite3

    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        row = dict(con.execute("SELECT * FROM runs WHERE run_dir = ?", (str(run_dir),)).fetchone())
    finally:
        con.close()
    return {k: v for k, v in row.items() if k not in ("id", "finished_at")}


def test_a_refused_leaderboard_keeps_the_run_and_add_records_it_later(tmp_path, capsys):
    """A leaderboard that stops working during a run fails the run in one line that says the
    results are kept, and ``--add`` then records exactly the row the live run would have."""
    import afmbench
    from afmbench.errors import LeaderboardError

    scenario = afmbench.build_scenario("split_digits", n_experiences=2, protocol="task")

    def run(folder, board):
        afmbench.seed_everything(0)
        model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
        return afmbench.run(scenario, model, [], max_epochs=1, run_dir=folder,
                            leaderboard=board, verbose=False)  # fmt: skip

    live = tmp_path / "live.sqlite"
    run(tmp_path / "a", live)
    broken = tmp_path / "broken.sqlite"
    broken.write_text("not a database")
    with pytest.raises(LeaderboardError) as caught:
        run(tmp_path / "b", broken)
    message = str(caught.value)
    assert "file is not a database" in message and "results are kept" in message
    assert f"afmbench leaderboard --add {tmp_path / 'b'}" in message
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["status"] == "finished"

    later = tmp_path / "later.sqlite"
    argv = ["--add", str(tmp_path / "a"), str(tmp_path / "b"), "--db", str(later)]
    assert leaderboard_command(argv) == 0
    assert _row(later, tmp_path / "a") == _row(live, tmp_path / "a")
    b = _row(later, tmp_path / "b")
    assert b["acc"] == pytest.approx(_row(live, tmp_path / "a")["acc"])  # same seed, same run
    (group,) = load_groups(later)
    assert [r["run_dir"] for r in group.runs] == [str(tmp_path / "b")]  # the seed's latest run


def test_add_refuses_an_unfinished_run(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"status": "failed"}))
    assert leaderboard_command(["--add", str(folder), "--db", str(tmp_path / "b.sqlite")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "status is 'failed'" in err and f"resume={folder}" in err
    assert not (tmp_path / "b.sqlite").exists() or load_groups(tmp_path / "b.sqlite") == []
    assert leaderboard_command(["--add", str(tmp_path / "nowhere")]) == 2
    assert "no readable metrics.json" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["text", "other-table"])
def test_an_unusable_leaderboard_is_one_line_before_anything_runs(tmp_path, content, capsys):
    import sqlite3

    from tests.conftest import run_cli

    board = tmp_path / "board.sqlite"
    if content == "text":
        board.write_text("not a database")
    else:  # an SQLite file of something else, with a table of the same name
        con = sqlite3.connect(board)
        con.execute("CREATE TABLE runs (name TEXT)")
        con.commit()
        con.close()
    assert leaderboard_command(["--db", str(board)]) == 2
    shown = capsys.readouterr().err
    proc = run_cli("run", f"leaderboard.db={board}", f"run_dir={tmp_path / 'run'}", "logger=none")
    assert proc.returncode == 2, proc.stderr
    for stderr in (shown, proc.stderr):
        assert stderr.count("\n") == 1 and "Traceback" not in stderr
        assert f"cannot use the leaderboard {board}" in stderr
    assert not (tmp_path / "run").exists()


def test_python_runs_group_by_what_they_compute_not_by_seed(tmp_path):
    """Python-API runs share a leaderboard row group only when the configuration matches:
    another seed joins the group; another learning rate, batch size or width does not."""
    import afmbench
    from afmbench.strategies import EWC

    scenario = afmbench.build_scenario("split_digits", n_experiences=2, protocol="task")
    board = tmp_path / "board.sqlite"

    def run(seed=0, hidden=(16,), data=scenario, **kwargs):
        afmbench.seed_everything(seed)
        model = afmbench.build_model("mlp", data.input_shape, data.head_sizes,
                                     hidden=list(hidden))  # fmt: skip
        return afmbench.run(data, model, [EWC(lambda_=10)], seed=seed,
                            leaderboard=board, verbose=False, **kwargs).metrics["config_hash"]  # fmt: skip

    base = run()
    assert run(seed=1) == base
    # a shuffled class order is another scenario, the same one whatever its seed (the CLI ties
    # scenario.seed to the run's seed and leaves it out of the hash)
    shuffled = [
        afmbench.build_scenario(
            "split_digits", n_experiences=2, protocol="task", class_order="shuffled", seed=seed
        )
        for seed in (2, 3)
    ]
    assert run(seed=2, data=shuffled[0]) == run(seed=3, data=shuffled[1]) != base
    others = [
        run(optimizer=afmbench.OptimizerConfig(lr=0.05)),
        run(batch_size=16),
        run(hidden=(8,)),
        run(max_epochs=2),
    ]
    assert len({base, *others}) == 5
    groups = load_groups(board)
    assert sorted(len(g.runs) for g in groups) == [1, 1, 1, 1, 2, 2]


def test_an_unusable_wandb_mode_fails_before_the_table(db, capsys, monkeypatch):
    with pytest.raises(SystemExit) as caught:
        leaderboard_command(["--db", str(db), "--wandb", "--wandb-mode", "bogus"])
    assert caught.value.code == 2 and "argument --wandb-mode: invalid choice" in (
        capsys.readouterr().err
    )
    monkeypatch.setenv("WANDB_MODE", "bogus")
    assert leaderboard_command(["--db", str(db), "--wandb"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == (
        "afmbench: error: the environment's WANDB_MODE=bogus is not a W&B mode; "
        "fix: use one of offline, online, disabled"
    )
