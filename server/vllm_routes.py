"""vLLM's serving extras that operators' scripts and routers call: `/tokenize`, `/detokenize`, and
`POST /v1/load_lora_adapter` / `/v1/unload_lora_adapter` (behind the admin token).

Loading publishes the folder at `lora_path` (a run directory, a run export, or an AdapterHub folder written by
`hub export`) into the store as the next version of `lora_name` and syncs, so it is served when the call returns
and survives a restart; unloading stops serving the task until a newer version is published (`hub.serving.sync`).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from hub.errors import HubError, NotFoundError
from hub.interop import read_version_meta
from hub.serving.protocol import ServingBackend
from hub.store.export import export_dir
from hub.store.fileio import write_json
from hub.store.layout import ADAPTER_META, HUB_JSON, payload_files
from server.responses import ADMIN_ERRORS, BODY_ERRORS, error_responses

MAX_TOKENIZE_CHARS = 1 << 16


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str = Field(..., max_length=MAX_TOKENIZE_CHARS)
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int] = Field(..., max_length=MAX_TOKENIZE_CHARS)


class LoadLoraRequest(BaseModel):
    lora_name: str = Field(..., min_length=1, max_length=128)
    lora_path: str = Field(..., min_length=1, max_length=4096)


class UnloadLoraRequest(BaseModel):
    lora_name: str = Field(..., min_length=1, max_length=128)


def tokenizer_of(hub: ServingBackend) -> Any:
    """The backend's tokenizer (`HubService.engine`); a backend without one (Ray's ingress) answers 404."""
    engine = getattr(hub, "engine", None)
    if engine is None:
        raise NotFoundError("/tokenize and /detokenize are served by `hub serve` without --ray")
    return engine.backbone


def publishable(path: Path, staging: Path) -> Path:
    """A folder `store.publish` reads: a run's export as it is; an AdapterHub folder (`hub export`: payload files
    and `hub.json`) staged as a run export (its metadata without the store's fields)."""
    if not path.is_dir():
        raise HubError(f"lora_path '{path}' is not a folder on the server")
    path = export_dir(path)
    if (path / ADAPTER_META).is_file() or not (path / HUB_JSON).is_file():
        return path
    meta = read_version_meta(path)
    for name in payload_files(meta):
        shutil.copyfile(path / name, staging / name)
    unstored = dataclasses.replace(meta, version=None, created_at=None, files={})
    write_json(staging / ADAPTER_META, unstored.to_dict())
    return staging


def vllm_router(hub: ServingBackend, admin: Any) -> APIRouter:
    """The routes; `admin` is the app's admin-token dependency (`Depends(...)`)."""
    router = APIRouter()

    @router.post("/tokenize", responses=error_responses(*BODY_ERRORS, 404))
    async def tokenize(body: TokenizeRequest):
        backbone = tokenizer_of(hub)
        ids = backbone.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": backbone.n_positions, "tokens": ids}

    @router.post("/detokenize", responses=error_responses(*BODY_ERRORS, 404))
    async def detokenize(body: DetokenizeRequest):
        backbone = tokenizer_of(hub)
        if not all(0 <= i < len(backbone.tokenizer) for i in body.tokens):
            raise HubError(f"tokens must be ids from 0 to {len(backbone.tokenizer) - 1}")
        return {"prompt": backbone.tokenizer.decode(body.tokens)}

    @router.post("/v1/load_lora_adapter", dependencies=[admin], responses=error_responses(*ADMIN_ERRORS, 422))
    async def load_lora_adapter(body: LoadLoraRequest):
        with tempfile.TemporaryDirectory(prefix="hub-load-") as staging:
            export = await run_in_threadpool(publishable, Path(body.lora_path), Path(staging))
            stored = await hub.store_call(hub.store.publish, export, body.lora_name)  # type: ignore[attr-defined]
        changes = await hub.reload()
        if stored.ref in dict(changes.refused):
            raise HubError(f"published {stored.ref}, but it cannot be served: {dict(changes.refused)[stored.ref]}")
        return {"lora_name": body.lora_name, "version": stored.version,
                "message": f"Success: LoRA adapter '{body.lora_name}' added successfully."}

    @router.post("/v1/unload_lora_adapter", dependencies=[admin], responses=error_responses(*ADMIN_ERRORS, 404))
    async def unload_lora_adapter(body: UnloadLoraRequest):
        if body.lora_name not in hub.task_names():
            raise NotFoundError(f"'{body.lora_name}' is not served")
        await run_in_threadpool(hub.unload, body.lora_name)
        return {"lora_name": body.lora_name,
                "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}

    return router
