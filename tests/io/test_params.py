import pytest

from iteralite.core.config import ModelConfig
from iteralite.io.errors import ParamsError
from iteralite.io.params import from_dict, load_section, read_params
from iteralite.data.tokenizer import TokenizerConfig
from iteralite.train.loop import TrainConfig


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(ParamsError, match=r"unknown key 'train.lrr'.*did you mean 'lr'"):
        from_dict(TrainConfig, {"lrr": 0.1}, "train")


def test_wrong_type_is_named():
    with pytest.raises(ParamsError, match=r"'train.steps' must be int, got 'many'"):
        from_dict(TrainConfig, {"steps": "many"}, "train")
    with pytest.raises(ParamsError, match=r"'train.steps' must be int"):
        from_dict(TrainConfig, {"steps": True}, "train")


def test_int_accepted_for_float():
    assert from_dict(TrainConfig, {"lr": 1}, "train").lr == 1.0


def test_range_checks():
    with pytest.raises(ParamsError, match="top_k"):
        from_dict(ModelConfig, {"top_k": 5, "n_experts": 4}, "model")
    with pytest.raises(ParamsError, match="warmup_steps"):
        from_dict(TrainConfig, {"steps": 10, "warmup_steps": 10}, "train")


def test_vocab_too_small_for_byte_alphabet():
    with pytest.raises(ParamsError, match=r"vocab_size' must be >= 257.*256 byte symbols"):
        from_dict(TokenizerConfig, {"vocab_size": 100}, "tokenizer")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_section(TrainConfig, "train", tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_section(TrainConfig, "train", bad)


def test_repository_params_parse_every_section():
    from iteralite.pipeline.sections import SECTIONS, check_params
    from tests.conftest import REPO

    parsed = check_params(REPO / "params.yaml")
    assert set(parsed) == set(SECTIONS)
    assert set(SECTIONS) == set(read_params(REPO / "params.yaml")), "a params section has no parser (or vice versa)"


def test_check_params_names_an_unknown_section_and_a_bad_key(tmp_path):
    from iteralite.pipeline.sections import check_params
    from tests.conftest import REPO

    text = (REPO / "params.yaml").read_text()
    bad = tmp_path / "params.yaml"
    bad.write_text(text + "\nprunee:\n  ratios: [0.1]\n")
    with pytest.raises(ParamsError, match="unknown section.*prunee"):
        check_params(bad)
    bad.write_text(text.replace("  repeats: 5\n", "  repeatz: 5\n", 1))
    with pytest.raises(ParamsError, match="unknown key 'fuse.repeatz'"):
        check_params(bad)
