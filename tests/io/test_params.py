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
    bad.write_text(text.replace("  repeats: 3\n", "  repeatz: 3\n", 1))
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


# --- the file itself: duplicates, aliases, size, unknown sections ---------------------------------

def _write(tmp_path, text, name="params.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,key,lines", [
    ("eval:\n  seq_len: 64\ntrain:\n  lr: 0.1\neval:\n  seq_len: 128\n", "eval", "1 and 5"),
    ("train:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n", "train.lr", "2 and 4"),
    ("mixed_precision:\n  manual:\n    embedding: int8\n    embedding: int4\n",
     "mixed_precision.manual.embedding", "3 and 4"),
])
def test_a_key_given_twice_at_any_level_is_refused(tmp_path, text, key, lines):
    """PyYAML keeps the last of two equal keys silently: `iteralite evaluate --params` read the
    second of two `eval:` sections."""
    p = _write(tmp_path, text)
    with pytest.raises(ParamsError, match=re.escape(f"'{key}' is given twice (lines {lines}); keep one")):
        load_section(TrainConfig, "train", p)


def test_yaml_aliases_are_refused_before_expansion(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(  # 9**5 items once expanded
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcd", "bcde"))
    p = _write(tmp_path, bomb)
    with pytest.raises(ParamsError, match=r"not valid YAML: line 2: YAML aliases \(\*a\) are not supported"):
        read_params(p)
    p = _write(tmp_path, "train:\n  lr: &lr 0.1\n  min_lr: *lr\n")
    with pytest.raises(ParamsError, match=r"line 3: YAML aliases \(\*lr\) are not supported in params"):
        read_params(p)


def test_an_oversized_params_file_is_refused_unread(tmp_path, monkeypatch):
    from iteralite.io import params

    p = _write(tmp_path, "train:\n  lr: 0.1\n" + "# padding\n" * 120_000)
    with pytest.raises(ParamsError, match=r"params.yaml: 1,200,0\d\d bytes; a params file may hold at most 1,048,576"):
        read_params(p)
    monkeypatch.setattr(params.Path, "read_bytes", lambda self: pytest.fail("read an oversized file"))
    with pytest.raises(ParamsError, match="at most"):
        read_params(p)


def test_unknown_section_is_named_with_a_suggestion(tmp_path):
    p = _write(tmp_path, "evall:\n  seq_len: 64\n")
    with pytest.raises(ParamsError, match=r"unknown section 'evall' \(did you mean 'eval'\?\); known sections: data,"):
        load_section(TrainConfig, "eval", p)
    p = _write(tmp_path, "zzz: 1\n")
    with pytest.raises(ParamsError, match=r"unknown section 'zzz'; known sections"):
        read_params(p)


def test_section_names_match_the_section_registry():
    from iteralite.io.params import SECTION_NAMES
    from iteralite.pipeline.sections import SECTIONS

    assert tuple(SECTIONS) == SECTION_NAMES


def test_not_utf8_and_not_a_file_are_one_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_bytes(b"train:\n  lr: \xff\n")
    with pytest.raises(ParamsError, match=r"not UTF-8 text \(invalid byte at offset 13\)"):
        read_params(p)
    with pytest.raises(ParamsError, match="not a regular file"):
        read_params(tmp_path)


# --- what one section says about another (check_params, the pipeline's first stage) -------------

def _repo_params(tmp_path, **edits):
    """The repository's params.yaml with `section.key: value` edits, written to tmp_path."""
    from tests.conftest import REPO

    p = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in edits.items():
        sec, key = dotted.split("__")
        p[sec][key] = value
    return _write(tmp_path, yaml.safe_dump(p, sort_keys=False))


@pytest.mark.parametrize("edits,msg", [
    ({"student__from_ratio": 0.3}, "'student.from_ratio' = 0.3 is not one of 'prune.ratios' [0.1, 0.2, 0.4]"),
    ({"prune__ratios": [0.0, 0.4]}, "'prune.ratios' entries must be in (0, 1) (a fraction removed), got 0.0"),
    ({"train__nproc": 0}, "'train.nproc' must be >= 1"),
    ({"model__n_experts": 65, "model__top_k": 2}, "'model.n_experts' = 65 is more than the 64 experts per layer"),
    ({"model__top_k": 5}, "'model.top_k' must be <= n_experts (4)"),
])
def test_check_params_refuses_what_only_a_late_stage_would_meet(tmp_path, edits, msg):
    from iteralite.pipeline.sections import check_params

    with pytest.raises(ParamsError) as e:
        check_params(_repo_params(tmp_path, **edits))
    assert str(e.value).startswith("params: ") and msg in str(e.value) and "\n" not in str(e.value)


def test_the_native_limit_in_check_params_is_the_c_routers():
    """model.n_experts is checked against layout.MAX_EXPERTS: it must be itl_step.h's ITL_MAX_EXPERTS."""
    from iteralite.runtime.native.layout import MAX_EXPERTS
    from tests.conftest import REPO

    c = (REPO / "iteralite" / "runtime" / "native" / "itl_step.h").read_text()
    assert re.search(rf"#define ITL_MAX_EXPERTS {MAX_EXPERTS}\b", c)


def test_deep_nesting_control_characters_and_huge_values_are_one_short_line(tmp_path):
    """Found by tests/fuzz: YAML nested ~1,000 deep escaped as RecursionError, a NUL or DEL byte as
    PyYAML's ReaderError (raised while the loader was built), and a wrong value was repeated whole
    in the message (megabytes for a big list)."""
    from iteralite.pipeline.sections import check_params
    from tests.conftest import REPO

    base = (REPO / "params.yaml").read_text()
    cases = {
        "deep": base.replace("  lr: 0.003\n", "  lr: " + "[" * 1000 + "]" * 1000 + "\n", 1),
        "nul": base.replace("train:", "tra\x00in:", 1),
        "del": base.replace("train:", "tra\x7fin:", 1),
    }
    for name, text in cases.items():
        p = tmp_path / f"{name}.yaml"
        p.write_text(text)
        with pytest.raises(ParamsError) as e:
            read_params(p)
        assert "\n" not in str(e.value) and len(str(e.value)) < 400, name
    big = tmp_path / "big.yaml"
    big.write_text(base.replace("  lr: 0.003\n", "  lr: [" + ", ".join(["1"] * 20000) + "]\n", 1))
    with pytest.raises(ParamsError) as e:
        check_params(big)
    assert "train.lr" in str(e.value) and len(str(e.value)) < 400
