"""The paper's probes: the sparsity measure by hand, probes on a plain model, and the whole path
`afmbench run forgetting=on` -> `afmbench probe RUN_DIR`."""

from __future__ import annotations

import json

import pytest
import torch

from afmbench.cli import main
from afmbench.models import build_model
from afmbench.probes import PROBES, Subject, run_probes, sparsity_index
from afmbench.runner import load_run
from afmbench.scenarios import build_scenario
from tests.conftest import run_cli
from tests.test_forgetting_layer import one_thread  # noqa: F401 (autouse fixture)


def test_sparsity_index_by_hand():
    assert sparsity_index(torch.full((8,), 0.3)) == pytest.approx(0.0)  # all fire equally
    assert sparsity_index(torch.tensor([0.7, 0, 0, 0])) == pytest.approx(1.0)  # one does it all
    rates = torch.tensor([0.5, 0.25, 0.0, 0.25])
    raw = 1 - (1.0 / 4) ** 2 / ((0.25 + 0.0625 * 2) / 4)
    assert sparsity_index(rates) == pytest.approx(raw / 0.75)
    assert sparsity_index(rates, "multiply") == pytest.approx(raw * 0.75)
    assert sparsity_index(torch.zeros(5)) is None and sparsity_index(torch.ones(1)) is None


def test_probes_run_on_a_plain_model(tmp_path):
    scenario = build_scenario("split_digits", n_experiences=1, protocol="class")
    torch.manual_seed(0)
    model = build_model(
        "lenet", scenario.input_shape, scenario.head_sizes, channels=(4, 6), hidden=(16,)
    )
    results = run_probes(Subject(model, scenario.test(0), scenario.train(0)), tmp_path, repeats=2)
    assert set(results) == set(PROBES)
    assert results["importance"]["importance_source"] == "activation"
    assert list(results["ablation"]["groups"]) == ["body.1", "body.4", "body.8", "all"]
    for name in PROBES:
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        assert json.loads((tmp_path / f"{name}.json").read_text()) == json.loads(
            json.dumps(results[name])
        )


def test_cli_run_with_forgetting_layer_then_probe(tmp_path, capsys):
    run_dir = tmp_path / "run"
    out = run_cli(
        "run",
        "forgetting=on",
        "forgetting.rho=2",
        "scenario.n_experiences=2",
        "trainer.max_epochs=1",
        "model.hidden=[24,16]",
        "trainer.enable_progress_bar=false",
        f"run_dir={run_dir}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["forgetting_layer"] is True

    subject = load_run(run_dir)
    assert [layer.rho for layer in subject.model.modules() if hasattr(layer, "rho")] == [2.0, 2.0]
    trained = build_scenario("split_digits", n_experiences=2)
    assert len(subject.test[0]) == sum(len(trained.test(e)[0]) for e in range(2))

    # through the console script's dispatch, as `afmbench probe RUN_DIR ...`
    assert main(["probe", str(run_dir), "--repeats", "2", "--max-samples", "300"]) == 0
    assert "written to" in capsys.readouterr().out
    folder = run_dir / "probes"
    for name in PROBES:
        assert (folder / f"{name}.png").is_file()
    ablation = json.loads((folder / "ablation.json").read_text())
    assert ablation["importance_source"] == "gate" and ablation["repeats"] == 2
    assert ablation["groups"]["all"]["ascending"][0] == pytest.approx(metrics["acc"], abs=0.15)
    sparsity = json.loads((folder / "sparsity.json").read_text())
    assert all(0 <= layer["sparsity"] <= 1 for layer in sparsity["layers"].values())
    assert json.loads((folder / "pruning.json").read_text())["fractions"][-1] == 0.99

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["probe", str(run_dir), "--probes", "sparsity", "--out", str(blocker / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"afmbench: error: --out {blocker / 'p'} is not writable")
    assert err.count("\n") == 1 and "fix: pass a folder you can write to" in err


def test_probe_command_reports_bad_input(tmp_path, capsys):
    assert main(["probe", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("afmbench: error: ")
    assert main(["probe", str(tmp_path), "--noise", "-1"]) == 2
    assert "--noise > 0" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert main(["probe", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoints/experience_*.ckpt" in err and "resume=" not in err
    assert "fix: probe a run that finished at least one experience" in err
