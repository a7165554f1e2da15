"""The ``afmbench`` command end to end, and bad input: one clear line and a non-zero exit."""

import json
from pathlib import Path

import pytest

from afmbench.cli import main
from afmbench.config import config_dir
from tests.conftest import REPO, run_cli

QUIET = "trainer.enable_progress_bar=false"


def test_embedded_default_runs_end_to_end(tmp_path):
    out = run_cli("run", f"run_dir={tmp_path / 'default'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Accuracy matrix" in out.stdout and "ACC" in out.stdout and "BWT" in out.stdout
    folder = tmp_path / "default"
    for name in ("config.yaml", "metrics.json", "accuracy_matrix.csv", ".hydra/overrides.yaml"):
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["scenario"] == "split_digits" and metrics["status"] == "finished"
    assert len(metrics["accuracy_matrix"]) == 5
    assert f"{metrics['acc']:.4f}" in out.stdout


def test_sweep_runs_every_combination(tmp_path):
    out = run_cli("run", "-m", "strategy=naive,joint", "seed=0,1", "trainer.max_epochs=1",
                  "scenario.n_experiences=2", QUIET, f"run_dir={tmp_path / 'sweep'}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 4
    strategies = {
        json.loads((tmp_path / "sweep" / r / "metrics.json").read_text())["strategy"] for r in runs
    }
    assert strategies == {"naive", "joint"}


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_sweep_with_a_failed_job_finishes_the_others_and_exits_1(tmp_path, launcher):
    """Jobs of a parallel launcher run in other processes: their failures still decide the
    sweep's exit code, and their warnings keep afmbench's one-line form."""
    parallel = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    out = run_cli("run", "-m", *parallel, "optimizer.lr=1e12,1e-9", "optimizer.momentum=0",
                  "trainer.max_epochs=1", "scenario.n_experiences=2", QUIET, "logger=none",
                  f"run_dir={tmp_path / 'sweep'}")  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    (diverged,) = (tmp_path / "sweep").glob("0_*")
    assert json.loads((diverged / "metrics.json").read_text())["status"] == "failed"
    (stalled,) = (tmp_path / "sweep").glob("1_*")
    assert json.loads((stalled / "metrics.json").read_text())["status"] == "finished"
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == (
        f"afmbench: error: 1 job(s) of the sweep failed: {diverged}; fix: each run folder's "
        "metrics.json holds its error; afmbench run resume=PATH continues one"
    )
    assert "afmbench: warning: experience 1/2 learned nothing" in out.stderr
    assert "AfmbenchWarning" not in out.stderr
    assert not list(REPO.glob(".afmbench-sweep-failures-*"))


@pytest.mark.parametrize(
    "args, expected",
    [
        (["scenario=imagenet"], "unknown scenario 'imagenet'; fix: use one of "),
        (["strategy=magic"], "unknown strategy 'magic'; fix: use one of "),
        (["model=transformer"], "unknown model 'transformer'; fix: use one of "),
        (
            ["trainer.max_epochs=abc"],
            "trainer.max_epochs must be a whole number or null, got 'abc'",
        ),
        (["optimizer.lr=fast"], "optimizer.lr must be a number, got 'fast'"),
        (
            ["trainer.max_epoch=1"],
            "unknown option trainer.max_epoch; fix: did you mean trainer.max_epochs?",
        ),
        (["scenario.n_experiences=3"], "scenario.n_experiences=3 does not split the 10 classes"),
        (["optimizer.lr=-1"], "optimizer.lr=-1.0 must be positive"),
        (["strategy=ewc", "strategy.lambda_=-5"], "strategy.lambda_=-5.0 must be >= 0"),
        (["strategy=si", "strategy.c=-1"], "strategy.c=-1.0 must be >= 0"),
        (["forgetting=on", "forgetting.rho=0"], "forgetting.rho=0.0 must be positive"),
        (["forgetting=on", "forgetting.beta=-1"], "forgetting.beta=-1.0 must be >= 0"),
        (
            ["strategy=ewc", "strategy.fisher=magic"],
            "strategy.fisher must be one of empirical, sampled, exact",
        ),
        (["logger.mode=sometimes"], "logger.mode=sometimes is not a W&B mode"),
        (["-m", "seed=0,x"], "seed must be a non-negative whole number, got 'x'"),
        (["forgetting.rho=2"], "unknown option forgetting.rho; fix: add forgetting=on (forgetting"),
        (["strategy.c=2"], "fix: add strategy=si (strategy.c is one of its options)"),
        (["strategy.lambda_=2"], "fix: add one of strategy=anpyc, strategy=ewc, strategy=mas ("),
        (
            ["trainer.max_steps=3"],
            "fix: max_steps is a Lightning Trainer option outside afmbench's "
            "defaults: add it with +trainer.max_steps=...",
        ),
        (
            ["+trainer.logger=false"],
            "trainer.logger is afmbench's to set; fix: choose it with logger=",
        ),
        (
            ["+trainer.callbacks=null"],
            "trainer.callbacks is afmbench's to set; fix: pass callbacks",
        ),
        (
            ["+trainer.enable_checkpointing=true"],
            "trainer.enable_checkpointing is afmbench's to set",
        ),
        (["+trainer.default_root_dir=x"], "fix: choose the run folder with run_dir=PATH"),
        (["+trainer.limit_val_batches=0"], "trainer.limit_val_batches is afmbench's to set"),
        (["+trainer.barebones=true"], "trainer.barebones is afmbench's to set"),
        (
            ["trainer.logger=true"],
            "fix: trainer.logger is afmbench's to set: choose it with logger=",
        ),
        (
            ["trainer.strategy=ddp_spawn", "trainer.devices=2", "trainer.accelerator=cpu"],
            "fix: use trainer.strategy=ddp",
        ),
        (["trainer.strategy=fsdp"], "shards the model or takes over its gradients"),
        (["trainer.strategy=deepspeed_stage_2"], "fix: use trainer.strategy=ddp"),
        (
            ["-m", "hydra/launcher=nosuch_local", "seed=0,1"],
            "the Hydra launcher 'nosuch_local' is not installed; fix: pip install hydra-nosuch-launcher",
        ),
        (["trainer.max_epochs=0"], "trainer.max_epochs=0 must be a whole number >= 1"),
        (["+trainer.strategy=ddp"], "trainer.strategy already exists; fix: set it without the +"),
        (
            ["leaderbord"],
            "'leaderbord' is neither a command nor a key=value override; fix: did "
            "you mean afmbench leaderboard?",
        ),
        (["seed", "1"], "'seed' is neither a command nor a key=value override; fix: commands are"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, args, expected):
    code = main(["run", *args, f"run_dir={tmp_path / 'bad'}", QUIET])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("afmbench: error: "), err
    assert expected in lines[0]
    assert not (tmp_path / "bad").exists()  # nothing ran


def test_bad_input_through_the_real_command(tmp_path):
    out = run_cli("run", "strategy=magic", f"run_dir={tmp_path / 'bad'}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "afmbench: error: unknown strategy 'magic'; fix: use one of "
        + ", ".join(sorted(p.stem for p in (Path(config_dir()) / "strategy").glob("*.yaml")))
        + "; a strategy of your own: --config-dir DIR with DIR/strategy/<name>.yaml"
    ]


def test_trainer_options_lightning_rejects_are_one_line(tmp_path):
    """Checked where the job runs (a sweep's launcher may have no GPU), before afmbench writes
    to the run folder (Hydra has made it): Lightning's verdict in one line, not a traceback."""
    out = run_cli("run", "trainer.devices=0", f"run_dir={tmp_path / 'bad'}", QUIET)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("afmbench: error: ")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "the trainer options do not work here: `Trainer(devices=0)`" in lines[0]
    assert "fix: change or remove the trainer option it names" in lines[0]
    assert not (tmp_path / "bad").exists()  # nothing ran: no folder of Hydra's files is left


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("afmbench: error: "), lines
    return lines[0]


def test_a_folder_holding_a_run_is_not_run_into_again(tmp_path, capsys, monkeypatch):
    """A second run in a run's folder (or a sweep in a sweep's) is refused before Hydra writes
    into it: its figures and checkpoints used to mix with the new run's. Resuming is fine."""
    import afmbench

    folder = tmp_path / "run"
    scenario = afmbench.build_scenario("split_digits", n_experiences=2)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[8])
    afmbench.run(scenario, model, run_dir=folder, verbose=False)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    capsys.readouterr()  # the scenario's first build shows a bar

    assert main(["run", f"run_dir={folder}", "strategy=si", QUIET]) == 2
    assert f"run_dir {folder} already holds a run; fix: continue it with resume={folder}" in (
        _one_error_line(capsys)
    )
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # untouched
    with pytest.raises(afmbench.ConfigError, match="already holds a run"):
        afmbench.run(scenario, model, run_dir=folder, verbose=False)

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    folder.rename(sweep / "0_split_digits_naive_seed0")
    assert main(["run", "-m", "seed=0,1", f"run_dir={sweep}", QUIET]) == 2
    assert "the sweep folder" in _one_error_line(capsys)


def test_a_resume_with_nothing_to_resume_creates_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["resume=nothing/here"], ["resume=true"], ["resume=true", "run_dir=empty"]):
        assert main(["run", *args, QUIET]) == 2
        line = _one_error_line(capsys)
        assert "resume=true needs a run folder" in line or "no checkpoints/" in line, line
        assert list(tmp_path.iterdir()) == [], args  # no runs/<time> or run_dir folder


def test_unwritable_run_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["run", f"run_dir={blocker / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"afmbench: error: run_dir {blocker / 'run'} is not writable")
    assert "fix: pass a folder you can write to" in err and len(err.splitlines()) == 1


def test_online_wandb_without_credentials_runs_offline_with_a_warning(tmp_path):
    env = {"WANDB_API_KEY": "", "HOME": str(tmp_path), "NETRC": str(tmp_path / "none")}
    out = run_cli("run", "logger.mode=online", "scenario.n_experiences=2", "trainer.max_epochs=1",
                  f"run_dir={tmp_path / 'run'}", QUIET, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count("no API key") == 1 and "logging offline instead" in out.stderr
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_missing_data_names_the_files_and_exits_2(tmp_path):
    out = run_cli("run", "scenario=split_mnist", f"data.root={tmp_path / 'nowhere'}",
                  f"data.cache={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}", QUIET)  # fmt: skip
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("afmbench: error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert "MNIST data not found" in errors[0] and "train-images-idx3-ubyte.gz" in errors[0]
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in errors[0]
    assert not (tmp_path / "run").exists()  # no folder of Hydra's files is left behind
    kept = tmp_path / "mine"
    (kept / "notes.txt").parent.mkdir()
    (kept / "notes.txt").write_text("the user's own file")
    out = run_cli("run", "scenario=split_mnist", f"data.root={tmp_path / 'nowhere'}",
                  f"data.cache={tmp_path / 'cache'}", f"run_dir={kept}", QUIET)  # fmt: skip
    assert out.returncode == 2 and sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0 and "leaderboard" in out.stdout and "run" in out.stdout


def test_version_is_afmbench_s_not_hydra_s(capsys):
    from importlib.metadata import version

    for args in (["--version"], ["run", "--version"]):
        assert main(args) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"afmbench {version('afmbench')} (") and "Hydra" not in out
        assert f"torch {version('torch')}" in out and f"lightning {version('lightning')}" in out


def test_afm_fig5_experiment_sweeps_the_papers_arms(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from afmbench.config import CONFIG_NAME, config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(CONFIG_NAME, ["experiment=afm_fig5"], return_hydra_config=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    arms = {(s, f) for s in params["strategy"] for f in params["forgetting"]}
    for strategy in ("ewc", "mas", "anpyc"):
        assert {(strategy, "off"), (strategy, "on")} <= arms
    assert {("naive", "off"), ("joint", "off")} <= arms and len(params["seed"]) == 3
    assert (cfg.scenario.name, cfg.scenario.protocol, list(cfg.model.hidden)) == (
        "permuted_mnist", "task", [512, 256],
    )  # fmt: skip

    # The same experiment through the real command, shrunk by overrides (which win over its
    # sweep): every job lands on the leaderboard with the experiment's protocol and optimizer.
    db = tmp_path / "board.sqlite"
    out = run_cli("run", "-m", "experiment=afm_fig5", "scenario=permuted_digits",
                  "scenario.n_experiences=2", "model.hidden=[16]", "strategy=naive,ewc",
                  "forgetting=on", "seed=0", "logger=none", f"leaderboard.db={db}", QUIET,
                  f"run_dir={tmp_path / 'sweep'}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    capsys.readouterr()
    assert main(["leaderboard", "--db", str(db), "--format", "csv"]) == 0  # in this process
    rows = [line for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    assert len(rows) == 2 and all("permuted_digits" in r and ",task," in r for r in rows), rows
    metrics = [json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("metrics.json")]
    assert {m["strategy"] for m in metrics} == {"naive", "ewc"}
    assert all(m["forgetting_layer"] and m["protocol"] == "task" for m in metrics)
