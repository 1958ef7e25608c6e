"""The SAX-HTTP routes of the ai-on-gke server (`tools/saxml-on-gke/httpserver`).

- `GET /` -> {"message": "HTTP Server for SAX Client"}
- `POST /publish` {"model", "model_path", "checkpoint", "replicas", "overrides": "K=V K2=V2"}
  -> the same fields echoed, "overrides" as a dict when given. Overrides are split on whitespace
  and each at its first "="; values are JSON (e.g. `BATCH_SIZE=4 BUCKET_KEYS=[128,256]`), so a
  value may not contain spaces.
- `POST /unpublish` {"model"} -> {"model"}
- `PUT /update` {"model", "model_path", "checkpoint", "replicas"} -> echoed (`sax.Update`).
- `GET /listcell` {"model"} -> {"model", "model_path", "checkpoint", "max_replicas",
  "active_replicas"}
- `GET /listall` {"sax_cell"} -> ["/sax/test/m", ...] (the gateway's cell when none is given)
- `POST /generate` {"model", "query", "extra_inputs": {...}} -> [[text, score], ...]

The GET routes take their fields from a JSON body, as ai-on-gke's do, or from the query string.
Bodies are read as JSON whatever their content type. Differences from ai-on-gke: errors get their
own status (400, 404, 409, 429, 503, ...; see `gateway.http_errors`) with `{"detail": "..."}`, not
always 500; `/generate` sends only the extra inputs the request gives (the model's defaults
apply to the rest) instead of always adding temperature 0.5, 128 decode steps, top_k 200 and
top_p 0.95; extra inputs may be numbers, lists of numbers (tensors) or strings; and Saxml's
`per_example_top_k` / `per_example_top_p` are sent as `top_k` / `top_p`, the names the configs
here declare, unless the model's config declares the Saxml names.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

import sax
from gateway.app_state import GatewayState
from gateway.calls import Call
from sax.errors import InvalidArgumentError
from sax.naming import parse_model

#: Saxml's extra-input names -> the names the configs here declare.
EXTRA_INPUT_ALIASES = {"per_example_top_k": "top_k", "per_example_top_p": "top_p"}

ExtraValue = float | list[float] | str
_M = TypeVar("_M", bound=BaseModel)


class ModelId(BaseModel):
    """A request naming one model."""

    model: str = Field(description='full model id, e.g. "/sax/test/lm2b"')


class SaxCell(BaseModel):
    """A request naming a cell."""

    sax_cell: str | None = Field(default=None, description='e.g. "/sax/test"')


class PublishBody(BaseModel):
    """A model to publish or update."""

    model: str
    model_path: str = Field(description='servable config name, e.g. "test.TinyLM"')
    checkpoint: str = Field(description='checkpoint path, "None" for test-mode configs')
    replicas: int = Field(ge=0)
    overrides: str | None = Field(default=None, description='"K=V K2=V2", values are JSON')


class GenerateBody(BaseModel):
    """A generate request."""

    model: str
    query: str
    extra_inputs: dict[str, ExtraValue] | None = None


def parse_overrides(text: str | None) -> dict[str, str]:
    """'BATCH_SIZE=4 BUCKET_KEYS=[128,256]' -> {"BATCH_SIZE": "4", "BUCKET_KEYS": "[128,256]"}."""
    overrides: dict[str, str] = {}
    for part in (text or "").split():
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(
                f"override {part!r} is not KEY=VALUE; write overrides as 'K=V K2=V2' (values are "
                "JSON without spaces, e.g. BATCH_SIZE=4 BUCKET_KEYS=[128,256])"
            )
        overrides[key] = value
    return overrides


async def parse_body(request: Request, model: type[_M]) -> _M:
    """The request's JSON body (or, if it has none, its query string) as `model`."""
    raw = await request.body()
    data: Any
    if raw.strip():
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidArgumentError(f"the request body is not valid JSON ({e})") from e
    else:
        data = dict(request.query_params)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors()]
        raise RequestValidationError(errors, body=data) from e


def router() -> APIRouter:
    """The SAX-HTTP routes; they use the `GatewayState` in `app.state.gateway`."""
    r = APIRouter()

    def state(request: Request) -> GatewayState:
        return request.app.state.gateway

    @r.get("/")
    async def root() -> dict[str, str]:
        return {"message": "HTTP Server for SAX Client"}

    @r.post("/publish")
    async def publish(request: Request) -> dict[str, Any]:
        body = await parse_body(request, PublishBody)
        overrides = parse_overrides(body.overrides)
        await state(request).runner.admin(
            sax.Publish,
            body.model,
            body.model_path,
            body.checkpoint,
            body.replicas,
            overrides,
            timeout=state(request).settings.admin_timeout,
        )
        answer: dict[str, Any] = {
            "model": body.model,
            "model_path": body.model_path,
            "checkpoint": body.checkpoint,
            "replicas": body.replicas,
        }
        if body.overrides:
            answer["overrides"] = overrides
        return answer

    @r.post("/unpublish")
    async def unpublish(request: Request) -> dict[str, str]:
        body = await parse_body(request, ModelId)
        s = state(request)
        await s.runner.admin(sax.Unpublish, body.model, timeout=s.settings.admin_timeout)
        return {"model": body.model}

    @r.put("/update")
    async def update(request: Request) -> dict[str, Any]:
        body = await parse_body(request, PublishBody)
        if body.overrides:
            raise InvalidArgumentError(
                "/update cannot change overrides; unpublish and publish the model again"
            )
        s = state(request)
        await s.runner.admin(
            sax.Update,
            body.model,
            body.model_path,
            body.checkpoint,
            body.replicas,
            timeout=s.settings.admin_timeout,
        )
        return {
            "model": body.model,
            "model_path": body.model_path,
            "checkpoint": body.checkpoint,
            "replicas": body.replicas,
        }

    @r.get("/listcell")
    async def listcell(request: Request) -> dict[str, Any]:
        body = await parse_body(request, ModelId)
        s = state(request)
        detail = await s.runner.admin(sax.ListDetail, body.model, timeout=s.settings.admin_timeout)
        return {
            "model": body.model,
            "model_path": detail.model,
            "checkpoint": detail.ckpt,
            "max_replicas": detail.max_replicas,
            "active_replicas": detail.active_replicas,
        }

    @r.get("/listall")
    async def listall(request: Request) -> list[str]:
        body = await parse_body(request, SaxCell)
        s = state(request)
        cell = body.sax_cell or s.settings.sax_cell
        return await s.runner.admin(sax.ListAll, cell, timeout=s.settings.admin_timeout)

    @r.post("/generate")
    async def generate(request: Request) -> list[list[Any]]:
        body = await parse_body(request, GenerateBody)
        s = state(request)
        model_id = parse_model(body.model).full
        extra = dict(body.extra_inputs or {})
        if any(key in extra for key in EXTRA_INPUT_ALIASES):
            info = await s.runner.admin(s.catalog.get, model_id)
            declared = info.declared_extra_inputs()
            for saxml_name, name in EXTRA_INPUT_ALIASES.items():
                if saxml_name in extra and (declared is None or saxml_name not in declared):
                    extra.setdefault(name, extra.pop(saxml_name))
        options = s.runner.options()
        for key, value in extra.items():
            if isinstance(value, str):
                options.SetExtraInputString(key, value)
            elif isinstance(value, list):
                options.SetExtraInputTensor(key, value)
            else:
                options.SetExtraInput(key, value)
        with s.runner.reserve(1) as reservation:
            results = await s.runner.generate(model_id, Call(body.query, options), reservation)
        return [[c.text, c.score] for c in results.completions]

    return r
