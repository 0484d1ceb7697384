import math
import os

import pytest

from iteralite.io.atomic import atomic_path, new_file_mode, write_bytes, write_json, write_text
from iteralite.io.errors import DivergedError


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o000])
def test_written_files_get_the_normal_new_file_mode(tmp_path, umask, mask):
    """Not mkstemp's 0600: files inside DVC directory outputs must be readable like any new file."""
    umask(mask)
    assert new_file_mode() == 0o666 & ~mask
    write_text(tmp_path / "a.txt", "x")
    write_bytes(tmp_path / "b.bin", b"x")
    write_json(tmp_path / "c.json", {"x": 1})
    for name in ("a.txt", "b.bin", "c.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_replacing_a_0600_file_gives_the_normal_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "m.bin"
    path.write_bytes(b"old")
    path.chmod(0o600)
    write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.bin"]


def test_json_with_nan_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(DivergedError, match="m.json: a value is NaN or infinite"):
        write_json(tmp_path / "m.json", {"val_loss": math.nan})
    assert list(tmp_path.iterdir()) == []
    write_json(tmp_path / "m.json", {"val_loss": 1.5})
    assert (tmp_path / "m.json").read_text() == '{\n  "val_loss": 1.5\n}\n'
