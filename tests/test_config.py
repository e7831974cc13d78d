
import pytest

from pipeline.config import Params, ParamsError, load_params, write_params
from tests.conftest import REPO


def test_values_are_typed_when_read(tmp_path):
    # YAML reads 2e-3 as a string: the settings make it the number it means, and refuse what is not one.
    path = tmp_path / "params.yaml"
    path.write_text("train: {learning_rate: 2e-3, epochs: '5'}\n")
    train = load_params(path).train
    assert (train.learning_rate, train.epochs) == (0.002, 5)
    assert isinstance(train.learning_rate, float) and isinstance(train.epochs, int)
    path.write_text("train: {learning_rate: fast}\n")
    with pytest.raises(ParamsError, match="train.learning_rate"):
        load_params(path)


def _differences(code: dict, file: dict, prefix: str = "") -> list[str]:
    if isinstance(code, dict):
        return [d for key in code for d in _differences(code[key], file.get(key), f"{prefix}.{key}")]
    return [] if code == file else [f"{prefix[1:]}: code {code!r}, params.yaml {file!r}"]


def test_code_defaults_are_the_repository_params(tmp_path):
    # An operator's params.yaml that leaves a key out must get the documented recipe; a change to
    # the recipe changes both places.
    differences = _differences(Params().model_dump(), load_params(REPO / "params.yaml").model_dump())
    assert differences == [], "pipeline/config.py defaults differ from params.yaml:\n" + "\n".join(differences)
    (tmp_path / "params.yaml").write_text("train: {epochs: 3}\n")
    partial = load_params(tmp_path / "params.yaml")
    assert partial.train.epochs == 3
    assert partial.train.augment == load_params(REPO / "params.yaml").train.augment
    repository = load_params(REPO / "params.yaml")
    assert repository.preprocess.height % 2**repository.model.depth == 0  # the recipe's working size fits its network


def test_unknown_key_is_an_error_naming_file_and_key(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ParamsError) as info:
        load_params(bad)
    assert "params.yaml" in str(info.value) and "train.epochz" in str(info.value)


def test_out_of_range_value_is_an_error(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochs: 0\n")
    with pytest.raises(ParamsError, match="train.epochs"):
        load_params(bad)


def test_deep_supervision_beyond_the_decoder_is_refused_when_params_are_read(tmp_path):
    # Depth 3 has two coarser decoder levels: a third fails at load, naming the file, not after preprocessing.
    bad = tmp_path / "params.yaml"
    bad.write_text("model:\n  depth: 3\n  deep_supervision: 3\n")
    with pytest.raises(ParamsError, match=r"params.yaml: model: .*deep_supervision is 3 but must be below model.depth \(3\)"):
        load_params(bad)
    bad.write_text("model:\n  depth: 3\n  deep_supervision: 2\n")
    assert load_params(bad).model.deep_supervision == 2


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(ParamsError, match="no such file"):
        load_params(tmp_path / "nope.yaml")


def test_digest_is_stable_and_sensitive(tmp_path):
    params = load_params(REPO / "params.yaml")
    write_params(params, tmp_path / "copy.yaml")
    assert load_params(tmp_path / "copy.yaml").digest() == params.digest()
    changed = Params.model_validate({**params.model_dump(), "train": {**params.train.model_dump(), "epochs": 99}})
    assert changed.digest() != params.digest()
