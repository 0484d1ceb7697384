import re

import pytest
import yaml

from iteralite.core.config import ModelConfig
from iteralite.io.errors import ParamsError
from iteralite.io.params import from_dict, load_section, read_params
from iteralite.data.tokenizer import TokenizerConfig
from iteralite.prune.config import PruneConfig
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


def test_float_written_with_an_exponent_is_accepted():
    # YAML 1.1 (PyYAML) reads `lr: 3e-3` as the string '3e-3': it is taken as the number it spells.
    raw = yaml.safe_load("lr: 3e-3\nmin_lr: 1E-4\n")
    assert raw["lr"] == "3e-3"
    cfg = from_dict(TrainConfig, raw, "train")
    assert cfg.lr == 0.003 and cfg.min_lr == 0.0001 and isinstance(cfg.lr, float)
    with pytest.raises(ParamsError, match=r"'train.lr' must be float, got 'fast'"):
        from_dict(TrainConfig, {"lr": "fast"}, "train")


def test_integer_written_with_an_exponent_says_how_to_write_it():
    with pytest.raises(ParamsError, match=r"'train.steps' must be int, got '1e3' \(a string: .* write 1000\)"):
        from_dict(TrainConfig, yaml.safe_load("steps: 1e3"), "train")


@pytest.mark.parametrize("text", ["lr: .inf", "lr: -.inf", "lr: .nan", "lr: 'nan'", "grad_clip: .inf"])
def test_non_finite_floats_are_rejected(text):
    key = text.split(":")[0]
    with pytest.raises(ParamsError, match=rf"'train.{key}' must be a finite number, got -?(inf|nan)"):
        from_dict(TrainConfig, yaml.safe_load(text), "train")


def test_non_finite_floats_are_rejected_in_every_section():
    """Every float field of every params section refuses .inf."""
    import typing

    from iteralite.pipeline.sections import SECTIONS, section_class

    checked = 0
    for section in SECTIONS:
        cls = section_class(section)
        for name, tp in typing.get_type_hints(cls).items():
            if tp is float:
                with pytest.raises(ParamsError, match=rf"'{section}.{name}' must be a finite number"):
                    from_dict(cls, {name: float("inf")}, section)
                checked += 1
    assert checked >= 10


def test_list_item_of_a_wrong_type_is_named():
    from iteralite.quant.calibrate import CalibrateConfig
    from iteralite.quant.qat import QATConfig

    with pytest.raises(ParamsError, match=r"'calibrate.sens_bits' items must be integers; item 1 is the string 'eight'"):
        from_dict(CalibrateConfig, {"sens_bits": [4, "eight"]}, "calibrate")
    with pytest.raises(ParamsError, match=r"'qat.keep_float' items must be strings; item 0 is the int 1"):
        from_dict(QATConfig, {"keep_float": [1]}, "qat")
    with pytest.raises(ParamsError, match=r"'prune.ratios' items must be numbers; item 1 is the string 'half'"):
        from_dict(PruneConfig, {"ratios": [0.1, "half"]}, "prune")
    with pytest.raises(ParamsError, match=r"'prune.ratios' items must be finite numbers; item 1 is inf"):
        from_dict(PruneConfig, {"ratios": [0.1, float("inf")]}, "prune")


def test_numeric_strings_in_float_lists_follow_the_scalar_rule():
    """A float list item written as text is converted like a scalar, except where the item's text
    names DVC outputs (prune.ratios), which must stay plain numbers."""
    from iteralite.pipeline.mixed import MixedConfig

    assert from_dict(MixedConfig, {"precisions": [4, "8", "fp16"]}, "mixed_precision").precisions == [4, 8, 16]
    with pytest.raises(ParamsError, match=r"'prune.ratios' items must be numbers; item 0 is the string '0.1' "
                                          r"\(each one names its DVC outputs as written"):
        from_dict(PruneConfig, yaml.safe_load("ratios: ['0.1', '0.4']"), "prune")


def test_scalar_for_a_list_says_how_to_write_a_list():
    from iteralite.quant.qat import QATConfig

    with pytest.raises(ParamsError, match=re.escape(
            "'prune.ratios' must be a list of ratios, e.g. [0.3] (with dvc exp run: -S 'prune.ratios=[0.3]')")):
        from_dict(PruneConfig, {"ratios": 0.3}, "prune")
    with pytest.raises(ParamsError, match=re.escape("'qat.keep_float' must be a list of strings, e.g. [dt_proj]")):
        from_dict(QATConfig, {"keep_float": "dt_proj"}, "qat")
    with pytest.raises(ParamsError, match=r"'qat.keep_float' must be a list of strings, got a mapping"):
        from_dict(QATConfig, {"keep_float": {"a": 1}}, "qat")
