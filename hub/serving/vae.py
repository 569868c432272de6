"""Sentence-VAE operations on the serving engine: encode, decode, reconstruct, sample, interpolate, analogy.

Encoding is a batched pass over the VAE's encoder (the first k blocks, bidirectional, hook-free, so it may run
while the engine decodes). Decoding builds one sequence per z whose row carries the latent slot and embedding
offset (`hub.adapters.vae.latent_row_state`); the engine decodes those rows in the same fused batches as every
other task's. `VaeOps` does the checks and the latent arithmetic once; the caller decodes its sequences: the
HTTP routes (`server.vae`) through `VaeService` (all of a request's rows queued or none, released on every
path), the CLI (`cli.vae`) with `decode_to_completion`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hub.adapters.vae import SentenceVAE, analogy_point, interpolation_path, pad_rows
from hub.adapters.vae_kind import SENTENCE_VAE, max_length
from hub.adapters.vae_runtime import latent_row_state
from hub.errors import HubError
from hub.serving.engine import Engine, ResidentAdapter, Sequence
from hub.serving.protocol import Disconnected, TaskRef
from hub.serving.sampling import SamplingParams

if TYPE_CHECKING:
    from hub.serving.service import HubService

MAX_TEXTS = 64  # texts per encode/reconstruct request, z vectors per decode request
MAX_SAMPLES = 64  # prior samples per request
MAX_STEPS = 32  # points on an interpolation path


@dataclass
class LatentCodes:
    mu: list[list[float]]
    logvar: list[list[float]]


class VaeOps:
    """One served sentence VAE: its checks, encoder and decode sequences."""

    def __init__(self, engine: Engine, adapter: ResidentAdapter):
        self.engine = engine
        self.adapter = adapter
        if adapter.kind != SENTENCE_VAE:
            raise HubError(f"task {adapter.name!r} is not a sentence VAE (its type is {adapter.meta.task_type!r}); "
                           f"the /v1/vae routes serve sentence_vae adapters only")
        self.task = adapter.name
        self.vae: SentenceVAE = engine.manager.weights(adapter)  # the CPU copy: latent states of decode rows
        self.nz = self.vae.config.nz
        self.max_length = max_length(adapter.meta)
        self.eos = engine.backbone.tokenizer.eos_token_id or 0

    @property
    def ref(self) -> TaskRef:
        return TaskRef(self.adapter.name, self.adapter.version, self.adapter.task, self.adapter)

    # -- checks ---------------------------------------------------------------------------------------------
    def check_texts(self, texts: list[str], cap: int = MAX_TEXTS) -> list[list[int]]:
        """Token rows of `<bos> text <eos>`; a clear error for no texts, too many, an empty or a too long one."""
        if not texts or len(texts) > cap:
            raise HubError(f"send between 1 and {cap} texts, got {len(texts)}")
        rows = []
        for i, text in enumerate(texts):
            ids = self.engine.backbone.tokenizer.encode(" " + text.strip()) if text.strip() else []
            if not ids:
                raise HubError(f"text {i} is empty")
            if len(ids) + 2 > self.max_length:
                raise HubError(f"text {i} has {len(ids)} tokens; this VAE reads at most {self.max_length - 2} "
                               f"(it was trained with max_length {self.max_length})")
            rows.append([self.eos] + ids + [self.eos])
        return rows

    def check_z(self, z: list[list[float]]) -> torch.Tensor:
        if not z or len(z) > MAX_TEXTS:
            raise HubError(f"send between 1 and {MAX_TEXTS} latent vectors, got {len(z)}")
        bad = [i for i, v in enumerate(z) if len(v) != self.nz]
        if bad:
            raise HubError(f"latent vector {bad[0]} has {len(z[bad[0]])} numbers; this VAE has nz = {self.nz}")
        tensor = torch.tensor(z, dtype=torch.float32)
        if not torch.isfinite(tensor).all():
            raise HubError("latent vectors must hold finite numbers")
        return tensor

    # -- encoder and decoder ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, texts: list[str], cap: int = MAX_TEXTS) -> LatentCodes:
        """(μ, log σ²) per text, in one batched encoder pass (on the CPU copy of the bundle's encoder side and
        the engine's backbone)."""
        rows = self.check_texts(texts, cap)
        backbone = self.engine.backbone
        ids, mask = pad_rows(rows, backbone.device)
        with self.engine.manager.pinned(self.adapter) as resident:  # the device copy, kept resident meanwhile
            mu, logvar = resident.vae.encode(backbone.model, ids, mask)
        return LatentCodes(mu.float().cpu().tolist(), logvar.float().cpu().tolist())

    def sequences(self, z: torch.Tensor, params: SamplingParams) -> list[Sequence]:
        """One decode sequence per row of z [N, nz]: prompt `<bos>`, stop at `<eos>`, the row's latent state.
        All or none: if one cannot be made, those made are released."""
        made: list[Sequence] = []
        try:
            for row in z:
                made.append(self.engine.new_state_sequence(self.adapter, [self.eos], self.eos, params,
                                                           latent_row_state(self.vae, row)))
        except BaseException:
            for sequence in made:
                self.engine.release(sequence)
            raise
        return made

    # -- operations on top of encode + decode ---------------------------------------------------------------
    @staticmethod
    def prior(n: int, nz: int, seed: int | None) -> torch.Tensor:
        if not 1 <= n <= MAX_SAMPLES:
            raise HubError(f"n must be between 1 and {MAX_SAMPLES}, got {n}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return torch.randn(n, nz, generator=generator)

    def path(self, a: str, b: str, steps: int) -> torch.Tensor:
        if not 2 <= steps <= MAX_STEPS:
            raise HubError(f"steps must be between 2 and {MAX_STEPS}, got {steps}")
        mu = torch.tensor(self.encode([a, b]).mu)
        return interpolation_path(mu[0], mu[1], steps)

    def analogy(self, a: str, b: str, c: str) -> torch.Tensor:
        mu = torch.tensor(self.encode([a, b, c]).mu)
        return analogy_point(mu[0], mu[1], mu[2])[None]



class VaeService:
    """The sentence-VAE capability of the in-process backend (`ServingBackend.vae`): what `server.vae` calls."""

    def __init__(self, service: "HubService"):
        self.service = service

    async def ops(self, task: str) -> VaeOps:
        ref = await self.service.resolve(task)
        return await asyncio.to_thread(VaeOps, self.service.engine, ref.adapter)

    async def decode(self, ops: VaeOps, z: torch.Tensor, params: SamplingParams,
                     disconnected: Disconnected) -> list[str]:
        """Decode every row of z in the shared batches: all queued or none, every row cancelled once the
        request ends (a client that left, a failed row), so nothing stays pinned."""
        handles = self.service.submit_all(ops.sequences(z, params))  # a refusal releases every row
        try:
            return list(await asyncio.gather(*(self.service.complete(h, disconnected) for h in handles)))
        finally:
            for handle in handles:
                self.service.cancel(handle)
