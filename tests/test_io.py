"""Atomic directories: whatever instant a save is killed at, a complete copy survives where readers look."""
import os

import pytest

from lmforge import io


def _dir(path, text):
    path.mkdir()
    (path / "f").write_text(text)


@pytest.mark.parametrize("crash_on", [1, 2])
def test_a_crash_inside_the_swap_keeps_a_complete_copy(tmp_path, monkeypatch, crash_on):
    target = tmp_path / "ckpt"
    _dir(target, "v1")
    real, calls = os.replace, []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == crash_on:
            raise KeyboardInterrupt  # killed between two file operations
        real(a, b)
    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_dir(target) as tmp:
            (tmp / "f").write_text("v2")
    survivors = [p for p in (target, tmp_path / "ckpt.old") if (p / "f").is_file()]
    assert survivors and (survivors[0] / "f").read_text() == "v1"


def test_a_leftover_old_copy_is_dropped_only_after_the_new_one_is_in_place(tmp_path, monkeypatch):
    # an earlier crash left only ckpt.old; the next save must not delete it before ckpt exists again
    _dir(tmp_path / "ckpt.old", "v1")
    tmp = tmp_path / "ckpt.tmp"
    _dir(tmp, "v2")
    monkeypatch.setattr(io.os, "replace", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        io.swap_in(tmp, tmp_path / "ckpt")
    assert (tmp_path / "ckpt.old" / "f").read_text() == "v1"
    monkeypatch.undo()
    io.swap_in(tmp, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "f").read_text() == "v2" and not (tmp_path / "ckpt.old").exists()
