"""The student-shape probe's command line (its runs cost minutes; the student code it calls is
tested in test_student.py)."""
import pytest

from iteralite.io.errors import IteraliteError
from iteralite.pipeline import probe


def test_shape_parses_five_integers():
    assert probe.parse_shape("32,2,16,3,64") == {"d_model": 32, "n_layers": 2, "embed_rank": 16, "max_heads": 3,
                                                 "max_ff": 64}


@pytest.mark.parametrize("bad", ["32,2,16", "32,2,16,3,x", "", "32,2,16,3,64,1"])
def test_a_bad_shape_is_one_line(bad):
    with pytest.raises(IteraliteError, match="d_model,n_layers,embed_rank,max_heads,max_ff"):
        probe.parse_shape(bad)


def test_main_refuses_bad_input_with_exit_2(capsys):
    assert probe.main(["1,2"]) == 2
    assert "probe: shape" in capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [
    (["32,2,16,3,64", "--temperature", "0"], "--temperature must be > 0"),
    (["32,2,16,3,64", "--teacher", "no/such.safetensors"], "--teacher no/such.safetensors: no such file"),
])
def test_bad_teacher_or_temperature_is_one_line_exit_2(capsys, args, msg):
    assert probe.main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
