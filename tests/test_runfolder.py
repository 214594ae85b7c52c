"""msdda.runfolder on its own (no models): locking, refusal of foreign folders, same-run checks, stale temp files,
undo on an early error, and image verification."""
from __future__ import annotations

import json
import re

import pytest

from msdda.runfolder import LOCK_NAME, MANIFEST, RunFolder, RunFolderError, check_target, image_intact


def owns(name: str) -> bool:
    return name in (MANIFEST, "grid.png") or re.fullmatch(r"\d{5}\.png", name) is not None


PARAMS = {"command": "generate", "steps": 2, "weights": {"a": 0.5, "b": 0.5}, "pair": ("a", "b")}


def _png(path, value=100):
    from PIL import Image

    Image.new("L", (4, 4), value).save(path)


def test_fresh_folder_gets_manifest_and_lock(tmp_path):
    out = tmp_path / "a" / "b"
    with RunFolder(out, PARAMS, owns) as run:
        assert not run.resumed
        assert json.loads((out / MANIFEST).read_text()) == {**json.loads(json.dumps(PARAMS)), "complete": False}
        run.write_json("grid.png", {"x": 1})
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "grid.png", MANIFEST]


def test_second_run_on_a_locked_folder_is_refused(tmp_path):
    with RunFolder(tmp_path / "o", PARAMS, owns):
        with pytest.raises(RunFolderError, match="another msdda run is writing to"):
            with RunFolder(tmp_path / "o", PARAMS, owns):
                pass
    with RunFolder(tmp_path / "o", PARAMS, owns) as again:     # released at exit
        assert again.resumed


def test_error_before_anything_finished_removes_what_was_created(tmp_path):
    out = tmp_path / "new" / "deeper" / "o"
    with pytest.raises(KeyError):
        with RunFolder(out, PARAMS, owns):
            raise KeyError("boom")
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(KeyError):
        with RunFolder(mine, PARAMS, owns):
            raise KeyError("boom")
    assert mine.is_dir() and list(mine.iterdir()) == []


def test_error_after_a_finished_file_keeps_the_folder(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        with RunFolder(out, PARAMS, owns) as run:
            _png(tmp_path / "src.png")
            from PIL import Image
            run.write_image("00000.png", Image.open(tmp_path / "src.png"))
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "00000.png", MANIFEST]


def test_resumed_folder_is_never_undone(tmp_path):
    out = tmp_path / "o"
    with RunFolder(out, PARAMS, owns):
        pass
    manifest = (out / MANIFEST).read_bytes()
    with pytest.raises(KeyError):
        with RunFolder(out, PARAMS, owns):
            raise KeyError("boom")
    assert (out / MANIFEST).read_bytes() == manifest


def test_same_run_compares_parameters_only(tmp_path):
    out = tmp_path / "o"
    with RunFolder(out, PARAMS, owns) as run:
        run.write_json(MANIFEST, {**run.params, "complete": True, "images": ["00000.png"], "sha256": {}})
    with RunFolder(out, PARAMS, owns) as run:                 # keys the finished run added are ignored
        assert run.resumed and run.previous["complete"] is True
    with pytest.raises(RunFolderError, match=r"holds a different run \(differs in: steps, weights\)"):
        with RunFolder(out, {**PARAMS, "steps": 3, "weights": {"a": 1.0}}, owns):
            pass


@pytest.mark.parametrize("entries", [["notes.txt"], ["00001.png"], [".hidden"], [".00001.png.abcdefgh.tmpx"]])
def test_foreign_files_are_refused_untouched(tmp_path, entries):
    out = tmp_path / "o"
    out.mkdir()
    for name in entries:
        (out / name).write_text("user data")
    with pytest.raises(RunFolderError, match="holds no msdda manifest"):
        with RunFolder(out, PARAMS, owns):
            pass
    assert sorted(p.name for p in out.iterdir()) == sorted(entries)


def test_stale_temp_files_are_cleaned_and_others_left(tmp_path):
    out = tmp_path / "o"
    with RunFolder(out, PARAMS, owns):
        pass
    ours = [".00003.png.k2j_8x0a.tmp", ".manifest.json.abcdefgh.tmp", ".grid.png.00000000.tmp"]
    theirs = [".notes.txt.abcdefgh.tmp", "notes.txt"]
    for name in ours + theirs:
        (out / name).write_text("x")
    with RunFolder(out, PARAMS, owns):
        pass
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, MANIFEST, *theirs])


def test_folder_with_only_our_leftovers_counts_as_fresh(tmp_path):
    """kill -9 before the manifest was written leaves only the lock file and temp files: not a foreign folder."""
    out = tmp_path / "o"
    out.mkdir()
    (out / LOCK_NAME).write_text("")
    (out / ".manifest.json.abcdefgh.tmp").write_text("{")
    assert check_target(out, owns) is None
    with RunFolder(out, PARAMS, owns) as run:
        assert not run.resumed
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, MANIFEST]


def test_nan_never_reaches_json(tmp_path):
    with pytest.raises(ValueError):
        RunFolder(tmp_path / "o", {**PARAMS, "guidance_scale": float("nan")}, owns)
    assert not (tmp_path / "o").exists()
    with RunFolder(tmp_path / "o", PARAMS, owns) as run:
        with pytest.raises(ValueError):
            run.write_json("grid.png", {"x": float("inf")})
    assert not (tmp_path / "o" / "grid.png").exists()


def test_image_intact(tmp_path):
    from msdda.loading import file_sha256

    good = tmp_path / "good.png"
    _png(good)
    assert image_intact(good) and image_intact(good, file_sha256(good))
    assert not image_intact(good, "0" * 64)
    assert not image_intact(tmp_path / "missing.png")
    data = good.read_bytes()
    (tmp_path / "short.png").write_bytes(data[:-20])
    assert not image_intact(tmp_path / "short.png")
    (tmp_path / "text.png").write_text("not an image")
    assert not image_intact(tmp_path / "text.png")
