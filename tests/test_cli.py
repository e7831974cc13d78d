import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import REPO, write_simple_dataset

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["quickstart"], ["run"], ["validate"], ["predict"], ["models"],
                                     ["stage", "train"], ["data", "synth"]])
def test_help_on_everything(command):
    out = runner.invoke(app, [*command, "--help"])
    assert out.exit_code == 0, out.output
    assert "Usage" in out.output


def test_bad_params_exit_2_naming_the_file(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: -1\n")
    out = runner.invoke(app, ["models", "-C", str(tmp_path)])
    assert out.exit_code == 2
    assert "params.yaml" in out.output and "train.epochs" in out.output


def test_validate_passes_on_good_data_and_exits_1_naming_bad_files(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    data = write_simple_dataset(tmp_path / "data" / "raw", subjects=3, frames=4)
    good = runner.invoke(app, ["validate", str(data), "-C", str(tmp_path)])
    assert good.exit_code == 0, good.output
    assert "validation passed" in good.output
    (data / "train" / "2_2_mask.tif").unlink()
    bad = runner.invoke(app, ["validate", str(data), "-C", str(tmp_path)])
    assert bad.exit_code == 1
    assert "2_2" in bad.output


def test_models_on_an_empty_store_says_what_to_do(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    out = runner.invoke(app, ["models", "-C", str(tmp_path)])
    assert out.exit_code == 0
    assert "no versions" in out.output


def test_predict_with_a_missing_model_fails_clearly(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    data = write_simple_dataset(tmp_path / "data" / "raw", subjects=1, frames=1)
    out = runner.invoke(app, ["predict", str(data / "train" / "1_1.tif"), "-C", str(tmp_path)])
    assert out.exit_code == 1
    assert "cannot load model" in out.output
