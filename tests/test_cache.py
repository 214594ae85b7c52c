"""msdda.export.cache: keys, hits and misses, corruption, atomic concurrent builds, unwritable folders."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from msdda.export.cache import ArtifactCache, CacheKey, ExportError, default_cache_root, weights_hash


def _key(weights="w" * 64, **kw) -> CacheKey:
    return CacheKey(kind="onnx", weights=weights, precision=kw.pop("precision", "fp32"),
                    profile=kw.pop("profile", {"sample_shape": [1, 8, 8]}), versions={"torch": "x"},
                    filename="unet.onnx", **kw)


class Builder:
    def __init__(self, payload=b"artifact-bytes" * 100):
        self.calls = 0
        self.payload = payload

    def __call__(self, path: Path) -> None:
        self.calls += 1
        path.write_bytes(self.payload)
        path.with_name(path.name + ".data").write_bytes(b"external weights")


# ------------------------------------------------------------------------------------------ hashing and keys
def test_weights_hash_is_deterministic_and_sensitive(tmp_path):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    sd = net.state_dict()
    h = weights_hash(net)
    assert h == weights_hash(dict(reversed(list(sd.items()))))            # insertion order does not matter
    assert h == weights_hash({k: v.t().contiguous().t() for k, v in sd.items()})   # nor memory layout
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    assert h == weights_hash(tmp_path / "w.safetensors")                   # nor module vs safetensors file
    changed = {k: v.clone() for k, v in sd.items()}
    bias = changed["0.bias"]
    bias[1] = torch.nextafter(bias[1], torch.tensor(float("inf")))    # the smallest possible change: one ulp
    assert weights_hash(changed) != h
    assert weights_hash({k: v.half() for k, v in sd.items()}) != h        # dtype is part of the hash
    renamed = {("x" + k): v for k, v in sd.items()}
    assert weights_hash(renamed) != h


def test_key_digest_covers_every_field():
    base = _key()
    assert base.digest == _key().digest
    variants = [_key(weights="v" * 64), _key(precision="fp16"), _key(profile={"sample_shape": [1, 16, 16]}),
                _key(device="sm_90"), _key(architecture="abc"),
                CacheKey(kind="onnx", weights="w" * 64, precision="fp32", profile={"sample_shape": [1, 8, 8]},
                         versions={"torch": "y"}, filename="unet.onnx")]
    assert len({base.digest, *(v.digest for v in variants)}) == len(variants) + 1
    assert CacheKey(kind="onnx", weights="w", precision="fp32").versions["onnxruntime"]   # filled in by default


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MSDDA_CACHE", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c"
    assert ArtifactCache().root == tmp_path / "c"
    monkeypatch.delenv("MSDDA_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "msdda"


# ------------------------------------------------------------------------------------------ hit / miss / damage
def test_miss_then_hit(tmp_path):
    cache, build, key = ArtifactCache(tmp_path), Builder(), _key()
    p1 = cache.get_or_build(key, build)
    p2 = cache.get_or_build(key, build)
    assert p1 == p2 and build.calls == 1 and p1.read_bytes() == build.payload
    entry = json.loads((tmp_path / "manifest.json").read_text())["artifacts"][key.digest]
    assert entry["size"] == len(build.payload) and len(entry["sha256"]) == 64
    assert set(entry["files"]) == {"unet.onnx", "unet.onnx.data"}
    assert entry["key"]["precision"] == "fp32"
    other = cache.get_or_build(_key(precision="fp16"), build)                 # another key: another artifact
    assert other != p1 and build.calls == 2
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "data_file", "manifest", "foreign_key"])
def test_damaged_artifact_is_rebuilt_never_used(tmp_path, damage):
    cache, build, key = ArtifactCache(tmp_path), Builder(), _key()
    path = cache.get_or_build(key, build)
    if damage == "truncate":
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[10] ^= 0x01                                                       # same size, one bit off
        path.write_bytes(bytes(data))
    elif damage == "delete":
        path.unlink()
    elif damage == "data_file":
        path.with_name("unet.onnx.data").write_bytes(b"external weightz")
    elif damage == "manifest":
        (tmp_path / "manifest.json").write_text("{not json")
    else:
        m = json.loads((tmp_path / "manifest.json").read_text())
        m["artifacts"][key.digest]["key"]["precision"] = "fp16"
        (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert cache.check(key) is not None
    again = cache.get_or_build(key, build)
    assert build.calls == 2 and again.read_bytes() == build.payload and cache.check(key) is None


def test_load_failure_is_rebuilt(tmp_path):
    """An artifact whose hash is intact but that no longer loads (e.g. a plan from another TensorRT) is rebuilt."""
    cache, key = ArtifactCache(tmp_path), _key()
    gen = {"n": 0, "reject": None}

    def build(path):
        gen["n"] += 1
        path.write_bytes(f"generation {gen['n']}".encode())

    def validate(path):
        if path.read_bytes() == gen["reject"]:
            raise RuntimeError("cannot deserialize")

    first = cache.get_or_build(key, build, validate=validate)
    assert cache.get_or_build(key, build, validate=validate) == first and gen["n"] == 1
    gen["reject"] = b"generation 1"
    assert "does not load" in cache.check(key, validate)
    again = cache.get_or_build(key, build, validate=validate)
    assert gen["n"] == 2 and again.read_bytes() == b"generation 2"
    gen["reject"] = b"generation 3"           # a build that does not load is an error, not an artifact
    cache.remove(key)
    with pytest.raises(RuntimeError, match="deserialize"):
        cache.get_or_build(key, build, validate=validate)
    assert cache.entry(key) is None


def test_failed_build_leaves_nothing(tmp_path):
    cache, key = ArtifactCache(tmp_path), _key()

    def bad(path):
        path.write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        cache.get_or_build(key, bad)
    assert cache.entry(key) is None and not cache.artifact_dir(key).exists()
    assert list((tmp_path / "tmp").iterdir()) == []
    with pytest.raises(ExportError, match="wrote no"):
        cache.get_or_build(key, lambda p: None)


def test_unwritable_cache_folder_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for root in (blocker / "cache", blocker):
        with pytest.raises(ExportError, match="cache folder") as info:
            ArtifactCache(root).get_or_build(_key(), Builder())
        assert "\n" not in str(info.value)
    assert "not writable (Permission denied)" in _cache_error_in_read_only_folder(tmp_path)


def _cache_error_in_read_only_folder(tmp_path) -> str:
    """The error of a cache in a mode-0500 folder, met by its owner. Root ignores permission bits, so under root (as
    CI runs) a forked child drops to the unprivileged user "nobody", owner of the folder, and meets it as a user
    would; the message comes back through a pipe."""
    import shutil
    import tempfile

    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        try:
            ArtifactCache(ro).get_or_build(_key(), Builder())
        except ExportError as exc:
            return str(exc)
        return "no error"
    import pwd

    nobody = pwd.getpwnam("nobody")
    parent = tempfile.mkdtemp(prefix="msdda-ro-")             # in /tmp: root's private pytest folder is 0700
    try:
        os.chmod(parent, 0o755)
        ro = Path(parent) / "ro"
        ro.mkdir(mode=0o500)
        os.chown(ro, nobody.pw_uid, nobody.pw_gid)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:                                           # the child: never returns into pytest
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                try:
                    ArtifactCache(ro).get_or_build(_key(), Builder())
                    message = "no error"
                except ExportError as exc:
                    message = str(exc)
                os.write(write_end, message.encode())
            except BaseException as exc:                       # surfaced by the parent's assertion
                os.write(write_end, f"child failed: {exc!r}".encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as fh:
            message = fh.read().decode()
        os.waitpid(pid, 0)
        return message
    finally:
        shutil.rmtree(parent)


# ------------------------------------------------------------------------------------------ two processes
def _slow_build_worker(root: str, barrier, log: str) -> str:
    cache = ArtifactCache(root)

    def build(path: Path) -> None:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        with open(path, "wb") as fh:           # slow, chunked write: a reader must never see it half-done
            for _ in range(20):
                fh.write(b"x" * 4096)
                fh.flush()
                time.sleep(0.01)

    barrier.wait()
    return str(cache.get_or_build(_key(), build))


def _export_worker(root: str, unet_dir: str, barrier, log: str) -> str:
    from diffusers import UNet2DModel

    from msdda.export import unet_export_spec
    from msdda.export.onnx import export_unet_onnx, onnx_cache_key

    unet = UNet2DModel.from_pretrained(unet_dir).eval()
    spec = unet_export_spec(unet)
    cache = ArtifactCache(root)

    def build(path: Path) -> None:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        export_unet_onnx(unet, path, **spec)

    barrier.wait()
    return str(cache.get_or_build(onnx_cache_key(unet, **spec), build))


def test_two_processes_build_once(tmp_path):
    log = tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        results = [pool.apply_async(_slow_build_worker, (str(tmp_path / "c"), barrier, str(log))) for _ in range(2)]
        paths = [r.get(timeout=60) for r in results]
    assert paths[0] == paths[1]
    assert len(log.read_text().split()) == 1                    # the second process waited and reused it
    assert Path(paths[0]).stat().st_size == 20 * 4096
    assert ArtifactCache(tmp_path / "c").check(_key()) is None


@pytest.mark.slow
def test_concurrent_onnx_export_gives_one_valid_artifact(tmp_path):
    import onnx

    from tiny_models import make_tiny_unet2d

    base = make_tiny_unet2d(tmp_path / "m", learned_variance=True)
    log = tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        results = [pool.apply_async(_export_worker, (str(tmp_path / "c"), str(base / "unet"), barrier, str(log)))
                   for _ in range(2)]
        paths = [r.get(timeout=180) for r in results]
    assert paths[0] == paths[1] and len(log.read_text().split()) == 1
    onnx.checker.check_model(paths[0])
    artifacts = [p for p in (tmp_path / "c" / "onnx").iterdir()]
    assert len(artifacts) == 1 and list((tmp_path / "c" / "tmp").iterdir()) == []


def test_atomic_writes_are_whole_and_get_the_usual_file_mode(tmp_path):
    """A finished file has the mode open() would give it (mkstemp's 0600 would hide images and results from
    other users); a failed write leaves neither the file nor a temporary."""
    import os
    import stat

    from msdda.atomic import atomic_write_bytes, atomic_write_json

    umask = os.umask(0o022)
    os.umask(umask)
    path = atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert path.read_text() == '{\n  "a": 1\n}\n'

    with pytest.raises(TypeError):                  # the write itself fails (text into a binary file)
        atomic_write_bytes(tmp_path / "x.bin", "not bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
