"""The HTTP API of ``msdda serve``, apart from its deployment: the ``POST /v1/generate`` body's schema
(``request_model``, pydantic, strict), ``parse_request`` (body -> ``Engine.check_request`` arguments, with
this server's per-request limits) and ``response_body`` (one request's share of an engine call -> JSON).
Imports no Ray; pydantic is imported on first use (the ``serve`` extra).
"""
# No `from __future__ import annotations`: pydantic reads GenerateRequest's annotations where it is defined.
import base64
import functools
import json
import math

from msdda.errors import one_line, short_value
from msdda.http_limits import HttpLimits, check_prompt_lengths
from msdda.ray_runtime import ModelSpec
from msdda.validation import Limits, check_num_images, check_steps

__all__ = ["check_limits", "parse_request", "request_model", "response_body"]


def check_limits(call: dict, limits: Limits) -> None:
    """Raise ValueError (msdda.validation's line) when one request asks for more than this server allows."""
    steps = call.get("steps")
    if isinstance(steps, int):
        check_steps(steps, limits)
    sizes = [call.get("num_images", 1)] + [len(v) for v in (call.get(k) for k in ("class_labels", "prompt", "seed"))
                                           if isinstance(v, list)]
    if all(isinstance(n, int) for n in sizes):
        check_num_images(max(sizes), limits)


# ---------------------------------------------------------------------- request parsing
_EXPECTED = {
    "prompt": "a string or a list of strings", "class_labels": "an integer or a list of integers",
    "weights": "an object {expert: number}", "seed": "an integer or a list of integers",
    "num_images": "an integer", "steps": "an integer", "guidance_scale": "a number", "eta": "a number",
    "strategy": "a string", "output": "\"png\" or \"latent\"", "normalize": "true or false",
    "expert_betas": "an object {expert: number}", "negative_prompt": "a string",
    "timeout_s": "a positive number of seconds",
}


@functools.lru_cache(maxsize=1)
def request_model():
    """The pydantic model of a generate request (built on first use: pydantic is part of the [serve] extra)."""
    from typing import Literal, Union

    from pydantic import BaseModel, ConfigDict

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        prompt: Union[str, list[str], None] = None
        class_labels: Union[int, list[int], None] = None
        weights: Union[dict[str, float], None] = None
        seed: Union[int, list[int]] = 0
        num_images: int = 1
        steps: Union[int, None] = None
        guidance_scale: Union[float, None] = None
        eta: float = 1.0
        strategy: str = "msdda"
        output: Literal["png", "latent"] = "png"
        normalize: bool = False
        expert_betas: Union[dict[str, float], None] = None
        negative_prompt: Union[str, None] = None
        timeout_s: Union[float, None] = None

    return GenerateRequest


def parse_request(body: bytes, spec: ModelSpec, limits: Limits, *,
                  max_prompt_chars: int = HttpLimits.max_prompt_chars) -> dict:
    """The HTTP body as ``Engine.check_request`` keyword arguments (plus the server's ``timeout_s``), or
    ValueError with one line (at most 300 characters: a refused value is quoted by a short prefix).

    Only the JSON shape, the prompt length and this server's per-request limits are checked here; the values
    (expert names, weights, labels, steps >= 1, ...) are the engine's to judge (the replica builds the
    ``msdda.Request`` with ``check_request``), so its own message reaches the client."""
    from pydantic import ValidationError

    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed JSON: {one_line(exc, 200)}") from None
    except RecursionError:
        raise ValueError("malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("the request body must be a JSON object")
    try:
        req = request_model().model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        name = str(err["loc"][0]) if err["loc"] else "body"
        if err["type"] == "extra_forbidden":
            raise ValueError(f"unknown field {short_value(name)}; fields are: {', '.join(_EXPECTED)}") from None
        raise ValueError(f"{name}: expected {_EXPECTED.get(name, one_line(err['msg'], 100))}, got "
                         f"{short_value(data.get(name))}") from None
    except RecursionError:
        raise ValueError("malformed JSON: nested too deeply") from None
    call = {
        "num_images": req.num_images, "seed": req.seed, "strategy": req.strategy, "eta": req.eta,
        "steps": spec.default_steps if req.steps is None else req.steps,
        "guidance_scale": spec.default_guidance_scale if req.guidance_scale is None else req.guidance_scale,
        "output_type": "pil" if req.output == "png" else "latent",
    }
    for name in ("prompt", "class_labels", "weights", "expert_betas", "negative_prompt"):
        if getattr(req, name) is not None:
            call[name] = getattr(req, name)
    if req.normalize:
        call["normalize"] = True
    check_prompt_lengths(call, max_prompt_chars)
    if req.timeout_s is not None:      # the server's, not the engine's: build_app's generate takes it out
        if not (math.isfinite(req.timeout_s) and req.timeout_s > 0):
            raise ValueError(f"timeout_s: expected {_EXPECTED['timeout_s']}, got {short_value(req.timeout_s)}")
        call["timeout_s"] = req.timeout_s
    check_limits(call, limits)
    return call


def response_body(share, spec_models, request) -> dict:
    """The JSON answer for one request's (a checked ``msdda.Request``) share of an engine call."""
    from msdda.atomic import encode_png

    body = {"seeds": share.seeds, "weights": share.weights, "strategy": share.strategy, "models": spec_models,
            "batch_size": share.batch_size, "steps": request.steps, "guidance_scale": request.guidance_scale,
            "eta": request.eta}
    if request.output_type == "latent":
        body["latents"] = share.latents.float().cpu().tolist()
    else:
        body["images"] = [base64.b64encode(encode_png(im)).decode() for im in share.images]
    return body
