"""A verified set of ONNX graphs, one per member network, and the soups built from them.

``onnx_set_for`` is how the Engine obtains what the ONNX Runtime and TensorRT backends load: for each member, the
file the caller named (``onnx_paths``, or an export folder's) or the cached export of its torch module
(``onnx_for_unet``); every file is checked to carry, in its own metadata, the sha256 of the weights of the model
it is loaded for (``msdda.export.artifacts``). The backends take the resulting ``OnnxSet``, load its files and
ask it for soups; they build nothing themselves.

A soup (rewarded soups: one network with parameters sum_k c_k theta_k) is built from the members' graphs by
mixing their initializers, so no torch module is needed: msdda's exporter keeps one initializer per parameter
and folds only linear maps of single parameters (transposes, reshapes), so the mixed initializers are the
exported initializers of the mixed parameters. Tensors equal in every member (constants) are kept as they are.
The result goes through the artifact cache like any export, tagged with ``soup_weights_tag``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .artifacts import WEIGHTS_KEY, ArtifactMismatch, check_onnx_weights, onnx_metadata, soup_weights_tag
from .cache import ArtifactCache, CacheKey, ExportError, runtime_versions, weights_hash
from .onnx import EXTERNAL_DATA_THRESHOLD, onnx_for_unet, onnx_loads_with_weights, save_onnx

__all__ = ["OnnxSet", "onnx_set", "onnx_set_for", "onnx_soup", "SOUP"]

SOUP = "soup"                   # the member name of a soup set


@dataclass(frozen=True)
class OnnxSet:
    """One ONNX graph per member (``paths``), the weights each must carry (``weights_sha256``: the loaded
    models' ``weights_hash``), each graph's own metadata (read and checked by ``onnx_set``), and the cache that
    builds their soups. Immutable: safe to share between threads."""
    paths: Mapping[str, Path]
    weights_sha256: Mapping[str, str]
    metadata: Mapping[str, Mapping[str, str]]
    cache: ArtifactCache

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(self.paths)

    def spec(self, name: str | None = None) -> dict:
        """cond, sample_shape (C, H, W) and text_shape of a member's graph (the first one by default)."""
        meta = self.metadata[name or self.members[0]]
        text = json.loads(meta.get("msdda.text_shape", "null"))
        return {"cond": meta.get("msdda.cond"), "sample_shape": tuple(json.loads(meta["msdda.sample_shape"])),
                "text_shape": tuple(text) if text else None}

    def soup(self, coeffs: Mapping[str, float]) -> "OnnxSet":
        """A one-member set (member ``"soup"``) holding the graph with parameters sum_k c_k theta_k over the
        members named in ``coeffs``, built through the cache (``onnx_soup``)."""
        path, tag = onnx_soup(self, coeffs)
        return OnnxSet({SOUP: path}, {SOUP: tag}, {SOUP: onnx_metadata(path)}, self.cache)


def _cache(cache) -> ArtifactCache:
    return cache if isinstance(cache, ArtifactCache) else ArtifactCache(cache)


def onnx_set(paths: Mapping[str, os.PathLike | str], weights_sha256: Mapping[str, str], *, cache=None,
             spec: Mapping | None = None) -> OnnxSet:
    """Check each member's file and return the set. ``weights_sha256[name]`` is what the file must carry (the
    sha256 of the model it is loaded for); ``spec`` (cond, sample_shape, text_shape), when given, the I/O the
    graph must have. Raises ArtifactMismatch (one line, naming the member, the file and both hashes)."""
    metadata, checked = {}, {}
    for name, path in paths.items():
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"ONNX file for {name!r} not found: {path}")
        metadata[name] = check_onnx_weights(path, weights_sha256[name], member=name)
        checked[name] = path
    result = OnnxSet(checked, dict(weights_sha256), metadata, _cache(cache))
    if spec is not None:
        want = {"cond": spec["cond"], "sample_shape": tuple(spec["sample_shape"]),
                "text_shape": tuple(spec["text_shape"]) if spec.get("text_shape") else None}
        for name in checked:
            got = result.spec(name)
            if got != want:
                diff = ", ".join(f"{k}={got[k]} (needs {want[k]})" for k in want if got[k] != want[k])
                raise ArtifactMismatch(f"{checked[name]}: the graph for {name!r} takes {diff}")
    return result


def onnx_set_for(networks: Mapping, *, cache=None, sample_shape, cond: str, text_shape=None,
                 weights_sha256: Mapping[str, str] | None = None,
                 onnx_paths: Mapping[str, os.PathLike | str] | None = None) -> OnnxSet:
    """The ONNX graphs of ``networks`` ({member: torch module}): the caller's file where ``onnx_paths`` names one
    (checked, never trusted), else the cached fp32 export (built now if missing, rebuilt if damaged or made from
    other weights). ``weights_sha256``: {member: weights_hash(module)} when the caller has them."""
    cache = _cache(cache)
    given = dict(onnx_paths or {})
    unknown = sorted(set(given) - set(networks))
    if unknown:
        raise ExportError(f"onnx_paths names {unknown[0]!r}, which is not a member ({', '.join(networks)})")
    weights = {name: (weights_sha256 or {}).get(name) or weights_hash(net) for name, net in networks.items()}
    spec = dict(sample_shape=tuple(sample_shape), cond=cond, text_shape=tuple(text_shape) if text_shape else None)
    paths = {}
    for name, net in networks.items():
        paths[name] = Path(given[name]) if name in given else onnx_for_unet(
            net, cache=cache, precision="fp32", dynamic_batch=True, dynamic_hw=False, weights_sha256=weights[name],
            member=name, **spec)
    return onnx_set(paths, weights, cache=cache, spec=spec)


# ---------------------------------------------------------------------------------------------- soups
def _tensors(model) -> dict:
    """{name: TensorProto} of a graph's initializers and Constant nodes' values (a folded parameter may be
    either)."""
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out["const:" + node.output[0]] = attr.t
    return out


def mix_graphs(models, coeffs) -> None:
    """Overwrite ``models[0]``'s weights with sum_k coeffs[k] * models[k]'s, in float64 then cast back; tensors
    equal in every model are kept. Every model must be the same graph (same tensor names, shapes and types)."""
    from onnx import numpy_helper

    tensors = [_tensors(m) for m in models]
    first = tensors[0]
    for other in tensors[1:]:
        if set(other) != set(first):
            raise ExportError("cannot make a soup: the members' ONNX graphs differ (not one architecture, or "
                              "exported differently)")
    for name, proto in first.items():
        arrays = [numpy_helper.to_array(t[name]) for t in tensors]
        a0 = arrays[0]
        if any(a.shape != a0.shape or a.dtype != a0.dtype for a in arrays):
            raise ExportError(f"cannot make a soup: tensor {name!r} differs in shape or type between members")
        if all(np.array_equal(a, a0) for a in arrays[1:]):
            continue
        if not np.issubdtype(a0.dtype, np.floating):
            raise ExportError(f"cannot make a soup: integer tensor {name!r} differs between members")
        mixed = sum(float(c) * a.astype(np.float64) for c, a in zip(coeffs, arrays))
        proto.CopyFrom(numpy_helper.from_array(mixed.astype(a0.dtype), proto.name))


def onnx_soup(members: OnnxSet, coeffs: Mapping[str, float]) -> tuple[Path, str]:
    """(path, weights tag) of the soup graph sum_k c_k theta_k over the members named in ``coeffs`` (taken in
    ``members``' order), from the cache or built now. The key is the soup's tag (its members' weight hashes and
    coefficients) and the members' graph metadata, so one weight vector is built once."""
    import onnx

    unknown = [n for n in coeffs if n not in members.paths]
    if unknown:
        raise ExportError(f"soup over {unknown[0]!r}, which is not a member ({', '.join(members.members)})")
    names = [n for n in members.members if n in coeffs]
    if not names:
        raise ExportError("a soup needs at least one member")
    parts = [(members.weights_sha256[n], float(coeffs[n])) for n in names]
    if len(parts) == 1 and parts[0][1] == 1.0:           # one member at weight 1: the soup is that member
        return members.paths[names[0]], parts[0][0]
    tag = soup_weights_tag(parts)
    graph = {k: v for k, v in members.metadata[names[0]].items() if k != WEIGHTS_KEY}
    key = CacheKey(kind="onnx", weights=tag, precision=graph.get("msdda.precision", "fp32"),
                   profile={"soup_of": [[sha, repr(c)] for sha, c in parts], "graph": graph},
                   versions=runtime_versions("onnx"), filename="unet.onnx")

    def build(target: Path) -> None:
        models = [onnx.load(os.fspath(members.paths[n]), load_external_data=True) for n in names]
        mix_graphs(models, [c for _, c in parts])
        soup = models[0]
        del models
        meta = {p.key: p.value for p in soup.metadata_props}
        meta[WEIGHTS_KEY] = tag
        meta["msdda.soup_of"] = json.dumps([[n, sha, c] for n, (sha, c) in zip(names, parts)])
        del soup.metadata_props[:]
        for k, v in meta.items():
            soup.metadata_props.add(key=k, value=v)
        external = sum(t.ByteSize() for t in soup.graph.initializer) > EXTERNAL_DATA_THRESHOLD
        save_onnx(soup, target, external)

    path = members.cache.get_or_build(key, build, validate=onnx_loads_with_weights(tag, SOUP))
    return path, tag
