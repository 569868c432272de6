"""HTTP routes of sentence VAEs: POST /v1/vae/{task}/encode | decode | reconstruct | sample | interpolate | analogy.

Thin: checks and latent arithmetic are `hub.serving.vae.VaeOps`; decoding goes through the backend's VAE
capability (`ServingBackend.vae`), so VAE rows share fused batches with every other task. The `sentence_vae`
kind's HTTP hook (`hub.adapters.vae_kind.SPEC.http_router`): mounted only on a backend that has that capability
(not under `--ray`). Bad input is a HubError, answered 4xx by the app.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from hub.serving.protocol import ServingBackend
from hub.serving.vae import MAX_SAMPLES, MAX_STEPS, MAX_TEXTS, VaeOps
from server.responses import GENERATION_ERRORS, error_responses


class Sampling(BaseModel):
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None


class TextsRequest(Sampling):
    texts: list[str] = Field(..., description=f"1 to {MAX_TEXTS} sentences")


class DecodeRequest(Sampling):
    z: list[list[float]] = Field(..., description=f"1 to {MAX_TEXTS} latent vectors of the VAE's nz numbers")


class SampleRequest(Sampling):
    n: int = Field(1, description=f"1 to {MAX_SAMPLES} prior samples z ~ N(0, I)")


class InterpolateRequest(Sampling):
    a: str
    b: str
    steps: int = Field(5, description=f"2 to {MAX_STEPS} points from μ(a) to μ(b), both included")


class AnalogyRequest(Sampling):
    a: str
    b: str
    c: str


def vae_router(service: ServingBackend) -> APIRouter | None:
    """The routes, or None on a backend without the VAE capability."""
    if service.vae is None:
        return None
    router = APIRouter(prefix="/v1/vae/{task}", tags=["sentence VAE"], responses=error_responses(*GENERATION_ERRORS))

    async def ops(task: str) -> VaeOps:
        return await service.vae.ops(task)

    async def decode(vae: VaeOps, z, body: Sampling, request: Request) -> list[str]:
        params = service.params(vae.ref, max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                                top_p=body.top_p, top_k=body.top_k, seed=body.seed)
        return await service.vae.decode(vae, z, params, request.is_disconnected)

    @router.post("/encode")
    async def encode(task: str, body: TextsRequest) -> dict:
        vae = await ops(task)
        codes = await asyncio.to_thread(vae.encode, body.texts)
        return {"task": task, "nz": vae.nz, "mu": codes.mu, "logvar": codes.logvar}

    @router.post("/decode")
    async def decode_z(task: str, body: DecodeRequest, request: Request) -> dict:
        vae = await ops(task)
        return {"task": task, "texts": await decode(vae, vae.check_z(body.z), body, request)}

    @router.post("/reconstruct")
    async def reconstruct(task: str, body: TextsRequest, request: Request) -> dict:
        vae = await ops(task)
        mu = (await asyncio.to_thread(vae.encode, body.texts)).mu
        return {"task": task, "texts": await decode(vae, vae.check_z(mu), body, request)}

    @router.post("/sample")
    async def sample(task: str, body: SampleRequest, request: Request) -> dict:
        vae = await ops(task)
        z = vae.prior(body.n, vae.nz, body.seed)
        return {"task": task, "z": z.tolist(), "texts": await decode(vae, z, body, request)}

    @router.post("/interpolate")
    async def interpolate(task: str, body: InterpolateRequest, request: Request) -> dict:
        vae = await ops(task)
        z = await asyncio.to_thread(vae.path, body.a, body.b, body.steps)
        return {"task": task, "texts": await decode(vae, z, body, request)}

    @router.post("/analogy")
    async def analogy(task: str, body: AnalogyRequest, request: Request) -> dict:
        vae = await ops(task)
        z = await asyncio.to_thread(vae.analogy, body.a, body.b, body.c)
        return {"task": task, "text": (await decode(vae, z, body, request))[0]}

    return router
