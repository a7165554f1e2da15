"""A NaN or infinite loss (or importance) stops the run, names where, keeps what was written, and
marks it failed."""

import json

import pytest
import torch

import afmbench
from afmbench.errors import DivergenceError
from afmbench.plugin import ContinualPlugin
from afmbench.strategies import EWC
from tests.conftest import run_cli


class NanInSecondExperience(ContinualPlugin):
    """A deliberately broken strategy: its penalty is NaN from experience 1 on."""

    name = "broken"

    def penalty(self, module):
        return torch.tensor(float("nan")) if module.experience == 1 else None


def test_nan_penalty_stops_the_run_and_keeps_earlier_results(tmp_path):
    scenario = afmbench.build_scenario("split_digits", n_experiences=5)
    afmbench.seed_everything(0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
    with pytest.raises(
        DivergenceError, match=r"loss became nan in experience 2/5 \(epoch 0, step 0\)"
    ):
        afmbench.run(
            scenario,
            model,
            [NanInSecondExperience()],
            max_epochs=1,
            run_dir=tmp_path,
            verbose=False,
        )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "loss became nan" in metrics["error"]
    assert metrics["experiences_done"] == 1 and len(metrics["accuracy_matrix"]) == 1
    assert (tmp_path / "checkpoints" / "experience_0.ckpt").is_file()
    assert (tmp_path / "accuracy_matrix.csv").read_text().count("experience_0") == 1


class NanFisherInSecondExperience(EWC):
    """EWC whose Fisher of experience 1 has a NaN: its penalty enters through a closed-form
    gradient, not the loss, so only the check on Ω can see it."""

    def estimate(self, module):
        fisher = super().estimate(module)
        if module.experience == 1:
            fisher["body.1.weight"][0, 0] = float("nan")
        return fisher


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_nan_importance_stops_the_run_and_keeps_earlier_results(mode, tmp_path):
    scenario = afmbench.build_scenario("split_digits", n_experiences=5)
    afmbench.seed_everything(0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
    with pytest.raises(DivergenceError, match=r"ewc importance became NaN or infinite in "
                       r"experience 2/5 \(body.1.weight\)"):  # fmt: skip
        afmbench.run(scenario, model, [NanFisherInSecondExperience(mode=mode)], max_epochs=1,
                     run_dir=tmp_path, verbose=False)  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "importance became NaN" in metrics["error"]
    assert metrics["experiences_done"] == 1 and len(metrics["accuracy_matrix"]) == 1


def test_exploding_learning_rate_is_one_line_and_exit_code_3(tmp_path):
    out = run_cli("run", "optimizer.lr=1e12", "optimizer.momentum=0.0", f"run_dir={tmp_path}",
                  "trainer.enable_progress_bar=false")  # fmt: skip
    assert out.returncode == 3, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("afmbench: error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert "loss became" in errors[0] and "experience" in errors[0] and "step" in errors[0]
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"
