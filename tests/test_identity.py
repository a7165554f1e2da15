"""One identity rule: a run's config hash is the same from the command line and from Python,
and a user's own plugin hashes the same in every process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import afmbench
from afmbench.identity import config_hash, run_identity
from afmbench.leaderboard import load_groups
from afmbench.strategies import EWC
from tests.conftest import REPO, run_cli


def _readme_python_example() -> str:
    readme = (REPO / "README.md").read_text()
    return re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)


def _cli_hash_and_matrix(folder, *overrides: str) -> tuple[str, list]:
    out = run_cli(
        "run", "strategy=ewc", "model.hidden=[64,64]", "trainer.max_epochs=3", "logger=none",
        "trainer.enable_progress_bar=false", f"run_dir={folder}", "leaderboard.record=false",
        *overrides,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    metrics = json.loads((folder / "metrics.json").read_text())
    return metrics["config_hash"], metrics["accuracy_matrix"]


def test_the_readme_example_and_the_equivalent_command_are_one_configuration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_python_example(), "README.md", "exec"), {})
    python = json.loads((tmp_path / "runs" / "api-demo" / "metrics.json").read_text())
    cli_hash, cli_matrix = _cli_hash_and_matrix(tmp_path / "cli", "strategy.lambda_=100")
    assert cli_hash == python["config_hash"]
    assert cli_matrix == python["accuracy_matrix"]  # the same experiment indeed
    other_hash, _ = _cli_hash_and_matrix(tmp_path / "other", "strategy.lambda_=10")
    assert other_hash != python["config_hash"]


def test_the_hash_leaves_out_the_seed_and_placement_but_not_what_is_computed():
    scenario = afmbench.build_scenario("split_digits", n_experiences=5, seed=3)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[8])
    optimizer = afmbench.OptimizerConfig()

    def digest(**changes) -> str:
        parts = {"plugins": [EWC(lambda_=1)], "batch_size": 32, "trainer": {"max_epochs": 1}}
        parts.update(changes)
        return config_hash(run_identity(scenario, model, parts["plugins"], False, optimizer,
                                        parts["batch_size"], parts["trainer"]))  # fmt: skip

    base = digest()
    assert digest(plugins=[EWC(lambda_=1.0)]) == base  # 1 and 1.0 are one setting
    assert digest(trainer={"max_epochs": 1, "accelerator": "cpu", "log_every_n_steps": 3}) == base
    assert digest(trainer={"max_epochs": 1, "precision": "32-true"}) == base  # the default
    assert digest(plugins=[EWC(lambda_=2)]) != base
    assert digest(batch_size=16) != base
    assert digest(trainer={"max_epochs": 2}) != base
    reseeded = afmbench.build_scenario("split_digits", n_experiences=5, seed=4)
    assert config_hash(run_identity(reseeded, model, [EWC(lambda_=1)], False, optimizer, 32,
                                    {"max_epochs": 1})) == base  # fmt: skip


USER_SCRIPT = textwrap.dedent(
    """
    import sys

    import afmbench


    class Nudge(afmbench.ContinualPlugin):  # no __init__, no __repr__
        name = "nudge"


    class Scaled(afmbench.ContinualPlugin):
        name = "scaled"

        def __init__(self, weight: float = 1.0) -> None:
            self.weight = weight


    board, jobs = sys.argv[1], sys.argv[2:]  # each job: FOLDER:SEED:new|resume
    for job in jobs:
        folder, seed, how = job.split(":")
        scenario = afmbench.build_scenario("split_digits", n_experiences=2)
        afmbench.seed_everything(int(seed))
        model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[8])
        result = afmbench.run(scenario, model, [Nudge(), Scaled(weight=2)], seed=int(seed),
                              run_dir=folder, leaderboard=board, resume=how == "resume",
                              verbose=False)
        print(result.metrics["config_hash"])
    """
)


def test_a_user_plugin_hashes_the_same_in_every_process(tmp_path):
    script = tmp_path / "user_run.py"
    script.write_text(USER_SCRIPT)
    board = tmp_path / "board.sqlite"

    def process(*jobs: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, str(script), str(board), *(f"{tmp_path}/{job}" for job in jobs)],
            capture_output=True, text=True, timeout=300, cwd=REPO,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-len(jobs) :]

    (first,) = process("a:0:new")
    second, resumed = process("b:1:new", "a:0:resume")  # another process
    assert first == second
    assert resumed == first  # the run resumes (a memory address in the hash refused it)
    (group,) = load_groups(board)
    assert group.config_hash == first and len(group.runs) == 2  # the seeds form one group
