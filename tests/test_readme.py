"""The README's Python example runs as written."""

import json
import re
from pathlib import Path

import torch

from tests.conftest import REPO


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text()
    example = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Accuracy matrix" in out
    assert (tmp_path / "runs" / "api-demo" / "metrics.json").is_file()


def test_quick_start_commands_are_the_ones_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert 'pip install -e ".[test]" && pytest' in readme
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith("pytest")


def test_the_readme_user_strategy_runs_from_the_command_line(tmp_path):
    """The README's own-strategy example, exactly as written, from its own folder through the
    installed `afmbench` script (whose sys.path does not hold the current folder)."""
    import os
    import shutil
    import subprocess
    import sys

    section = re.search(
        r"### Your own strategy\n(.*?)\n## ", (REPO / "README.md").read_text(), re.S
    )
    blocks = re.findall(r"```(\w+)\n(.*?)```", section.group(1), re.S)
    files = {
        body.splitlines()[0].lstrip("# "): body
        for lang, body in blocks
        if lang in ("python", "yaml")
    }
    assert set(files) == {"my_strategies.py", "my_configs/strategy/l2.yaml"}
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    (command,) = [body.strip() for lang, body in blocks if lang == "bash"]
    script = shutil.which("afmbench", path=str(Path(sys.executable).parent)) or "afmbench"
    args = [*command.split()[1:], "trainer.max_epochs=1", "logger=none", "run_dir=out",
            "trainer.enable_progress_bar=false", "leaderboard.record=false"]  # fmt: skip
    done = subprocess.run([script, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["strategy"] == "l2" and metrics["status"] == "finished"
    ckpt = torch.load(next((tmp_path / "out" / "checkpoints").glob("*.ckpt")), weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("L2Anchor")]
    assert state["anchor"]  # the anchors of the last experience, in the checkpoint
    assert "strength: 0.5" in (tmp_path / "out" / "config.yaml").read_text()
