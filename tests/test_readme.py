"""The README's Python example runs as written."""

import re

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
