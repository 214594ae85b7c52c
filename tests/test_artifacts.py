"""Artifacts are what they claim to be: every ONNX file the ONNX Runtime backend loads carries, in its own
metadata, the sha256 of the weights it was made from, and it is compared with the model loaded for that member,
wherever the file comes from: the cache (even with the cache manifest edited to match a swapped file),
``onnx_paths=``, or an export folder (``onnx_dir=``). Also: one expert-name rule everywhere."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch

import msdda
from msdda.export import WEIGHTS_KEY, ArtifactCache, ArtifactMismatch, OnnxSet, weights_hash
from msdda.export.artifacts import onnx_metadata
from msdda.hashing import file_sha256
from msdda.loading import LoadError


@pytest.fixture(scope="module")
def models(learned_variance_models):
    """A class-conditional base and two experts of its architecture, and the weights_hash of each UNet."""
    from diffusers import UNet2DModel

    base, experts = learned_variance_models
    weights = {n: weights_hash(UNet2DModel.from_pretrained(p / "unet")) for n, p in {"base": base, **experts}.items()}
    return base, experts, weights


def _engine(models, **options):
    base, experts, _ = models
    return msdda.Engine.from_pretrained(base, experts, backend="onnxruntime", parallel=False, **options)


def _latents(engine, strategy="msdda"):
    return engine.generate(class_labels=3, weights={"a": 0.6, "b": 0.4}, num_images=2, steps=3, seed=5,
                           guidance_scale=2.0, strategy=strategy, output_type="latent").latents


def _match_manifest(cache_root: Path, path: Path) -> None:
    """Edit the cache manifest so that its record of ``path`` (size, sha256) matches the file as it is now."""
    manifest_path = cache_root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    rel = path.relative_to(cache_root).as_posix()
    (entry,) = [e for e in manifest["artifacts"].values() if e["file"] == rel]
    meta = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    entry.update(meta)
    entry["files"][path.name] = meta
    manifest_path.write_text(json.dumps(manifest))


def _strip_metadata(src: Path, dst: Path) -> None:
    model = onnx.load(str(src))
    del model.metadata_props[:]
    onnx.save_model(model, str(dst))


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


# ------------------------------------------------------------------------------------------ the cache
@pytest.mark.slow
def test_artifacts_carry_their_weights_sha256(models, tmp_path):
    _, _, weights = models
    eng = _engine(models, cache_dir=tmp_path)
    for name, path in eng.backend.onnx_paths.items():
        meta = onnx_metadata(path)
        assert meta[WEIGHTS_KEY] == weights[name]
        assert meta["msdda.exporter"] == f"msdda {msdda.__version__}" and meta["msdda.cond"] == "class"


@pytest.mark.slow
def test_swapped_cache_files_with_a_matching_manifest_are_rebuilt(models, tmp_path):
    """Two experts' cached graphs swapped and the cache manifest updated to match: every size and sha256 the
    manifest records is right, only the files' own weights tags tell. The next Engine rebuilds both."""
    _, _, weights = models
    first = _engine(models, cache_dir=tmp_path)
    want = {s: _latents(first, s) for s in ("msdda", "expert:a")}
    pa, pb = first.backend.onnx_paths["a"], first.backend.onnx_paths["b"]
    original = {pa: file_sha256(pa), pb: file_sha256(pb)}
    blob_a = pa.read_bytes()
    pa.write_bytes(pb.read_bytes())
    pb.write_bytes(blob_a)
    _match_manifest(tmp_path, pa)
    _match_manifest(tmp_path, pb)
    assert onnx_metadata(pa)[WEIGHTS_KEY] == weights["b"]          # the swap is in place, the manifest agrees

    second = _engine(models, cache_dir=tmp_path)
    assert second.backend.onnx_paths["a"] == pa                     # the same cache entry, rebuilt
    assert onnx_metadata(pa)[WEIGHTS_KEY] == weights["a"] and onnx_metadata(pb)[WEIGHTS_KEY] == weights["b"]
    assert {p: file_sha256(p) for p in (pa, pb)} == original        # the export is deterministic: the same files
    for strategy, latents in want.items():
        torch.testing.assert_close(_latents(second, strategy), latents, rtol=0, atol=0)


@pytest.mark.slow
def test_cache_entry_without_the_weights_tag_is_reexported(models, tmp_path):
    _, _, weights = models
    first = _engine(models, cache_dir=tmp_path)
    pa = first.backend.onnx_paths["a"]
    _strip_metadata(pa, pa)
    _match_manifest(tmp_path, pa)
    assert WEIGHTS_KEY not in onnx_metadata(pa)
    _engine(models, cache_dir=tmp_path)
    assert onnx_metadata(pa)[WEIGHTS_KEY] == weights["a"]


# ------------------------------------------------------------------------------------------ onnx_paths
@pytest.mark.slow
def test_onnx_paths_naming_another_experts_file_is_refused(models, tmp_path):
    _, _, weights = models
    first = _engine(models, cache_dir=tmp_path / "cache")
    wrong = tmp_path / "a.onnx"
    shutil.copy(first.backend.onnx_paths["b"], wrong)
    with pytest.raises(LoadError) as info:
        _engine(models, cache_dir=tmp_path / "cache", onnx_paths={"a": wrong})
    msg = _one_line(info)
    assert "'a'" in msg and str(wrong) in msg and weights["a"] in msg and weights["b"] in msg


@pytest.mark.slow
def test_onnx_paths_file_without_the_weights_tag_is_refused(models, tmp_path):
    first = _engine(models, cache_dir=tmp_path / "cache")
    bare = tmp_path / "bare.onnx"
    _strip_metadata(first.backend.onnx_paths["a"], bare)
    with pytest.raises(LoadError, match="carries no msdda.weights_sha256") as info:
        _engine(models, cache_dir=tmp_path / "cache", onnx_paths={"a": bare})
    assert "'a'" in _one_line(info)


@pytest.mark.slow
def test_onnx_paths_with_the_right_file_is_used(models, tmp_path):
    first = _engine(models, cache_dir=tmp_path / "cache")
    mine = tmp_path / "mine.onnx"
    shutil.copy(first.backend.onnx_paths["a"], mine)
    second = _engine(models, cache_dir=tmp_path / "cache", onnx_paths={"a": mine})
    assert second.backend.onnx_paths["a"] == mine
    torch.testing.assert_close(_latents(second, "expert:a"), _latents(first, "expert:a"), rtol=0, atol=0)


@pytest.mark.slow
def test_the_backend_itself_checks_what_it_loads(models, tmp_path):
    """The ONNX Runtime backend compares each session's own metadata with the member's sha256, so even an
    OnnxSet built without ``onnx_set``'s checks cannot make it load a file made from other weights."""
    from msdda.backends.onnxruntime_backend import OnnxRuntimeBackend

    _, _, weights = models
    paths = _engine(models, cache_dir=tmp_path).backend.onnx_paths
    unchecked = OnnxSet({"a": paths["b"]}, {"a": weights["a"]}, {"a": {}}, ArtifactCache(tmp_path))
    with pytest.raises(ArtifactMismatch) as info:
        OnnxRuntimeBackend(unchecked)
    assert weights["b"] in _one_line(info)


# ------------------------------------------------------------------------------------------ export folders
@pytest.mark.slow
def test_export_folder_is_loaded_and_checked(models, tmp_path):
    from msdda.exporting import export_models

    base, experts, weights = models
    export_models(base, experts, tmp_path / "engines")
    eng = _engine(models, cache_dir=tmp_path / "cache", onnx_dir=tmp_path / "engines")
    assert eng.backend.onnx_paths == {n: tmp_path / "engines" / f"{n}.onnx" for n in ("base", "a", "b")}
    assert not (tmp_path / "cache" / "onnx").exists()              # nothing exported: the folder had it all
    cached = _engine(models, cache_dir=tmp_path / "cache")
    torch.testing.assert_close(_latents(eng), _latents(cached), rtol=0, atol=0)

    a, b = tmp_path / "engines" / "a.onnx", tmp_path / "engines" / "b.onnx"
    blob = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(blob)
    with pytest.raises(LoadError) as info:
        _engine(models, cache_dir=tmp_path / "cache", onnx_dir=tmp_path / "engines")
    msg = _one_line(info)
    assert str(a) in msg and weights["a"] in msg and weights["b"] in msg


def test_not_an_export_folder(models, tmp_path):
    with pytest.raises(ValueError, match="not an export folder") as info:
        _engine(models, cache_dir=tmp_path / "cache", onnx_dir=tmp_path)
    _one_line(info)


# ------------------------------------------------------------------------------------------ soups
@pytest.mark.slow
def test_soups_are_built_by_export_and_tagged(models, tmp_path):
    """A soup's graph is built through the cache once per weight vector, tagged with its members' hashes and
    coefficients; the backend keeps no soup session."""
    from msdda.export import soup_weights_tag

    _, _, weights = models
    eng = _engine(models, cache_dir=tmp_path)
    before = set((tmp_path / "onnx").iterdir())
    _latents(eng, "soup")
    (soup_dir,) = set((tmp_path / "onnx").iterdir()) - before
    meta = onnx_metadata(soup_dir / "unet.onnx")
    assert meta[WEIGHTS_KEY] == soup_weights_tag([(weights["a"], 0.6), (weights["b"], 0.4)])
    _latents(eng, "soup")
    assert set((tmp_path / "onnx").iterdir()) - before == {soup_dir}      # found in the cache the second time
    assert not any("soup" in k for k in vars(eng.backend))


# ------------------------------------------------------------------------------------------ expert names
BAD_NAMES = ["base", "-x", ".hidden", "a,b", "a=b", "a:b", "a/b", "a b", "ü", "x" * 101]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_one_expert_name_rule_everywhere(models, tmp_path, name, capsys):
    from msdda import cli
    from msdda.export import ExportError
    from msdda.exporting import export_models
    from msdda.validation import EXPERT_NAME_RULE, check_expert_name

    base, experts, _ = models
    with pytest.raises(ValueError, match="bad expert name"):
        check_expert_name(name)
    with pytest.raises(LoadError, match="bad expert name") as info:
        msdda.Engine.from_pretrained(base, {name: experts["a"]})
    assert EXPERT_NAME_RULE in _one_line(info)
    with pytest.raises(ExportError, match="bad expert name"):
        export_models(base, {name: experts["a"]}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    if "=" in name:
        return                                        # NAME=PATH: the CLI reads "a=b=p" as name "a", path "b=p"
    for command in ("generate", "export"):
        assert cli.main([command, "--base", str(base), f"--expert={name}={experts['a']}",
                         "--out", str(tmp_path / command)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "bad expert name" in err[0] and EXPERT_NAME_RULE in err[0]


@pytest.mark.parametrize("name", ["legible", "a.b-c_1", "A1", "x" * 100])
def test_good_expert_names(name):
    from msdda.validation import check_expert_name

    assert check_expert_name(name) == name
