"""The sentence VAE served on the engine's backbone: the `sentence_vae` kind's implementation (`VaeKind`).

Resident VAEs by slot (`VaeRuntime`): per decode step, rows of a VAE get its decoder adapters at the VAE's site
and their own z's embedding offset; their z's KV prefix is in the batch's cache from the prefill on
(`latent_row_state`). The rows carry their own state, so the kind serves under its own task (`SentenceVaeTask`:
no special tokens, no text layout) instead of a task type's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from hub.adapters.base import NO_SLOT, PREFIX_KEYS, PREFIX_VALUES, AdapterKind, KindRuntime, RowState
from hub.adapters.vae import ADAPTER_SITES, SentenceVAE, load_vae
from hub.adapters.vae_kind import MAX_LENGTH, SENTENCE_VAE, SPEC, TEXT_INPUT_ERROR
from hub.adapters.vlm import device_layers
from hub.adapters.vlm_plan import VlmPlan, add_deltas, group_rows
from hub.errors import HubError
from hub.store.format import AdapterMeta
from hub.task import Example, Segment, Task, TaskDefaults

EMBEDDING_OFFSET = "embedding_offset"


@dataclass
class ResidentVae:
    """A bundle on the device: the module (encoder, heads, injector), its decoder adapters per layer and their
    site (block output: `LayerWeights` with the LN folded in; FFN-parallel: no LN, applied to ln_2's input)."""

    vae: SentenceVAE
    decoder: list  # `hub.adapters.vlm.LayerWeights` per block
    site: str


@dataclass(frozen=True)
class VaePlan:
    """Decoder adapters grouped by slot (`VlmPlan`s: rows at the block-output site, rows at the FFN-parallel
    site) and the rows' embedding offsets [B, d] (None: none)."""

    adapters: VlmPlan
    parallel: VlmPlan
    embedding: torch.Tensor | None


class VaeRuntime(KindRuntime):
    """Resident sentence VAEs on the engine's backbone. Per decode step, rows of a VAE get its decoder adapters
    at the VAE's site (`LayerWeights.delta`: after the block, or beside its MLP on the post-attention stream)
    and their own z's embedding offset; their z's KV prefix is in the batch's cache from the prefill on
    (`latent_row_state`, `hub.serving.batch`). Other rows pass unchanged."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.eps = self.model.config.layer_norm_epsilon
        self.device = next(model.parameters()).device
        self.streams: dict[int, torch.Tensor] = {}  # layer -> ln_2's input in the current forward
        for layer, block in enumerate(self.model.transformer.h):
            self.hooks.add(block, self._block_hook(layer))
            self.hooks.add_pre(block.ln_2, self._stream_hook(layer))
            self.hooks.add(block.mlp, self._mlp_hook(layer))
        self.hooks.add_pre(self.model.transformer.drop, self._embedding_hook)

    def add(self, bundle: SentenceVAE) -> int:
        dtype = next(self.model.parameters()).dtype  # the encoder runs on the backbone's own dtype
        vae = copy.deepcopy(bundle).to(device=self.device, dtype=dtype)  # the bundle stays on the CPU
        weights = vae.decoder_adapters.weights().map(lambda t: t.detach())
        site = vae.config.adapter_site
        if site == "ffn_parallel":  # f(x) has no LN: fold the identity affine
            weights = replace(weights, ln_weight=torch.ones_like(weights.ln_weight),
                              ln_bias=torch.zeros_like(weights.ln_bias))
        return self.claim(ResidentVae(vae, device_layers(weights, self.device), site))

    def resident_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for r in self.slots.values() for p in r.vae.parameters())

    def make_plan(self, rows: list[RowState] | None, slot: int = NO_SLOT) -> VaePlan:

        def at_site(s: int, site: str) -> int:
            return s if s != NO_SLOT and self.slots[s].site == site else NO_SLOT

        plans = [group_rows(None if rows is None else [RowState(at_site(r.slot, site)) for r in rows],
                            at_site(slot, site), self.device) for site in ADAPTER_SITES]
        if rows is None:
            return VaePlan(plans[0], plans[1], None)
        offsets = [row.extra.get(EMBEDDING_OFFSET) for row in rows]
        embedding = None
        if any(o is not None for o in offsets):
            d = self.model.config.n_embd
            embedding = torch.stack([o.to(self.device) if o is not None else torch.zeros(d, device=self.device)
                                     for o in offsets])
        return VaePlan(plans[0], plans[1], embedding)

    def _block_hook(self, layer: int):
        def apply(module, args, output):
            plan: VaePlan | None = self.plan
            if not plan or not plan.adapters.groups:
                return output
            h = add_deltas(output[0], plan.adapters, lambda slot: self.slots[slot].decoder[layer], self.eps)
            return (h,) + tuple(output[1:])

        return apply

    def _stream_hook(self, layer: int):
        def keep(module, args):
            plan: VaePlan | None = self.plan
            if plan and plan.parallel.groups:
                self.streams[layer] = args[0]

        return keep

    def _mlp_hook(self, layer: int):
        def apply(module, args, output):
            plan: VaePlan | None = self.plan
            if not plan or not plan.parallel.groups:
                return output
            return add_deltas(output, plan.parallel, lambda slot: self.slots[slot].decoder[layer], self.eps,
                              inputs=self.streams.pop(layer))

        return apply

    def _embedding_hook(self, module, args):
        plan: VaePlan | None = self.plan
        if not plan or plan.embedding is None:
            return None
        return (args[0] + plan.embedding[:, None].to(args[0].dtype),)


class VaeKind(AdapterKind):
    """Sentence VAE bundles (`vae.safetensors`, metadata `adapter_kind: sentence_vae`)."""

    name = SENTENCE_VAE
    text_input_error = TEXT_INPUT_ERROR

    def load(self, loaded, config) -> SentenceVAE:
        return load_vae(loaded.adapter_tensors, loaded.meta, config)

    def parameter_count(self, bundle: SentenceVAE) -> int:
        return sum(p.numel() for p in bundle.parameters())

    def runtime(self, model: nn.Module, bank_dtype: torch.dtype = torch.float32) -> VaeRuntime:
        """VAE bundles stay in the backbone's dtype whatever `bank_dtype` says."""
        return VaeRuntime(model)

    def task(self, meta: AdapterMeta) -> Task:
        return SentenceVaeTask()


class SentenceVaeTask(Task):
    """What a served sentence VAE is to the engine as a task: no special tokens (`<|endoftext|>` opens and ends
    a sentence), no input layout (its decode rows are built from z by `hub.serving.vae`), its decode length."""

    type_name = SENTENCE_VAE
    description = SPEC.description
    special_tokens = ()
    defaults = TaskDefaults(bottleneck=0, lr=1e-3, epochs=1, batch_size=32, grad_accum=1, max_length=MAX_LENGTH,
                            max_target_length=MAX_LENGTH - 2, max_new_tokens=40)
    metric = "sacrebleu"  # never decoded: `hub eval` scores a VAE through its kind's hook (`cli.vae`)

    def load_examples(self, data: str, split: str) -> list[Example]:
        raise HubError("a sentence VAE trains with `hub train sentence_vae`, not from task examples")

    def prompt_segments(self, source: Any) -> list[Segment]:
        return []

    def parse_input(self, value: Any) -> Any:
        raise HubError(f"this task takes no text input: {TEXT_INPUT_ERROR}")


@torch.no_grad()
def latent_row_state(vae: SentenceVAE, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """What one decode row carries for its z [nz]: per-layer prefix keys/values [L, H, 1, d_head] and the
    embedding offset [d] (each only when the VAE injects that way)."""
    extra = {}
    prefix = vae.injector.prefix(z[None])
    if prefix is not None:
        extra[PREFIX_KEYS] = torch.stack([k[0] for k, _ in prefix])
        extra[PREFIX_VALUES] = torch.stack([v[0] for _, v in prefix])
    offset = vae.injector.embedding_offset(z[None])
    if offset is not None:
        extra[EMBEDDING_OFFSET] = offset[0]
    return extra
