"""MVCR (Liu et al., ACL 2023, arXiv 2211.08794): random multi-view compressed representations while training.

Spec: `../shared/specs/vae-and-mvcr.md` §7 (code: DAMO-NLP-SG/MVCR `AE2TK`). In the chosen GPT-2 blocks the MLP
output `m = mlp(ln_2 x)` (after its dropout, before `x <- x + m`) is replaced, in training only, by a random
view per token position: with noise `h = m + N(0, σ²)`, each of the K hierarchical autoencoders' outputs
HAE_k(h) with probability 1/(2K−1), or h itself with probability (K−1)/(2K−1) (`view_probabilities`).
The task loss trains the HAEs with the method's parameters; after each task step every layer's reconstruction
loss mean_k MSE(h, HAE_k(h)) is stepped by that layer's own AdamW (absolute lr, default 1e-3, linear decay,
clip 1.0) on its HAEs only. Before the first step the HAEs warm up on reconstruction of the frozen model's MLP
outputs (forward passes only, cached while they fit in `CACHE_BYTES`). In eval mode the hook returns `m`
unchanged; after training the hooks are removed, and the HAEs never belong to the model, so exports and serving
are those of a run without MVCR.

Differences from the public code, on purpose: GPT-2 is pre-LN, so the hook sits on the MLP output before the
residual add (BERT's sits before the add + LayerNorm). The reconstruction step recomputes the loss from the
step's stored noisy inputs (detached from the model) with the HAEs as the task step left them; its gradient
with respect to the HAEs equals that of the undetached target, and the frozen backbone needs no other.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from hub.errors import HubError
from hub.training.regularizers import ForwardBatches, GradientSync, Regularizer

REFERENCE_LAYERS, REFERENCE_DEPTH = (6, 8, 11), 12  # MVCR's `--layer_sets` in a 12-layer model
REFERENCE_DIMS, REFERENCE_WIDTH = (128, 256, 512), 768  # `--vae_sets` for hidden size 768
DEFAULTS = {"noise": 0.002, "pretrain_epochs": 4, "ae_lr": 1e-3}
DROPOUT = 0.2
CACHE_BYTES = 512 * 2**20  # warm-up activations kept in memory up to this size, else recomputed each epoch


def view_probabilities(num_autoencoders: int) -> list[float]:
    """P(HAE_1), ..., P(HAE_K), P(identity): r = randint(0, 2(K−1)) inclusive picks HAE_r if r < K, else h."""
    outcomes = 2 * num_autoencoders - 1
    return [1 / outcomes] * num_autoencoders + [(num_autoencoders - 1) / outcomes]


class SubAutoencoder(nn.Sequential):
    """d_k -> d_k/2 -> d_k, tanh after each linear map, dropout in the middle."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, dim // 2), nn.Tanh(), nn.Dropout(DROPOUT), nn.Linear(dim // 2, dim),
                         nn.Tanh())


class HierarchicalAutoencoder(nn.Module):
    """HAE_k: Linear(d -> d_k), tanh, dropout; then per call one of {sub-AE 1, sub-AE 2, identity} (1/3 each);
    then Linear(d_k -> d). No residual inside."""

    def __init__(self, hidden: int, dim: int):
        super().__init__()
        self.encode = nn.Sequential(nn.Linear(hidden, dim), nn.Tanh(), nn.Dropout(DROPOUT))
        self.inner = nn.ModuleList([SubAutoencoder(dim), SubAutoencoder(dim)])
        self.decode = nn.Linear(dim, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.encode(h)
        choice = int(torch.randint(len(self.inner) + 1, ()))
        return self.decode(self.inner[choice](z) if choice < len(self.inner) else z)


def sample_views(h: torch.Tensor, autoencoders: nn.ModuleList) -> torch.Tensor:
    """[B, T, d] -> [B, T, d]: per token position (shared across the batch) one of HAE_k(h) or h."""
    k = len(autoencoders)
    choice = torch.randint(0, 2 * k - 1, (h.shape[1],), device=h.device).clamp(max=k)  # k = identity
    views = torch.stack([ae(h).to(h.dtype) for ae in autoencoders] + [h])  # [K + 1, B, T, d]
    pick = nn.functional.one_hot(choice, k + 1).T.to(h.dtype)  # [K + 1, T]
    return torch.einsum("kt,kbtd->btd", pick, views)


def reconstruction_loss(h: torch.Tensor, autoencoders: nn.ModuleList) -> torch.Tensor:
    """mean_k MSE(h, HAE_k(h)) over all positions."""
    return torch.stack([nn.functional.mse_loss(ae(h), h) for ae in autoencoders]).mean()


def gpt2_blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if not isinstance(blocks, nn.ModuleList) or not all(hasattr(b, "mlp") for b in blocks):
        raise HubError(f"MVCR needs a GPT-2 model (blocks transformer.h[i].mlp); {type(model).__name__} has none")
    return blocks


def hidden_size(model: nn.Module) -> int:
    """A transformers GPT-2's `config.n_embd`."""
    n_embd = getattr(getattr(model, "config", None), "n_embd", None)
    if not isinstance(n_embd, int):
        raise HubError(f"MVCR needs a GPT-2 model (config.n_embd); {type(model).__name__} has none")
    return n_embd


class MVCR(Regularizer):
    name = "mvcr"

    @classmethod
    def resolve(cls, options: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """Layers default to MVCR's relative depths (blocks 6, 8, 11 of 12), dims to 128, 256, 512 × d/768."""
        unknown = sorted(set(options) - {"layers", "dims", *DEFAULTS})
        if unknown:
            raise HubError(f"unknown MVCR option(s) {unknown}")
        n_layer, hidden = len(gpt2_blocks(model)), hidden_size(model)
        given = {k: v for k, v in options.items() if v is not None}
        layers = given.get("layers") or sorted({i * n_layer // REFERENCE_DEPTH for i in REFERENCE_LAYERS})
        dims = given.get("dims") or [max(2, round(d * hidden / REFERENCE_WIDTH)) for d in REFERENCE_DIMS]
        settings = {**DEFAULTS, **given, "layers": list(layers), "dims": list(dims)}
        check_settings(settings, n_layer)
        return {**settings, "p_identity": view_probabilities(len(dims))[-1]}

    def __init__(self, settings: dict[str, Any], model: nn.Module, seed: int,
                 average_gradients: GradientSync = lambda params: None):
        super().__init__(settings, model, seed, average_gradients)
        hidden, device = hidden_size(model), next(model.parameters()).device
        with torch.random.fork_rng(devices=[]):  # the run's own random stream stays that of a run without MVCR
            torch.manual_seed(seed)
            self.autoencoders = {layer: nn.ModuleList([HierarchicalAutoencoder(hidden, d) for d in settings["dims"]])
                                 .to(device) for layer in settings["layers"]}
        self.total_steps = 1  # reconstruction steps of the run (warm-up + task steps), set by `warm_up`
        self.optimizers = {layer: torch.optim.AdamW(aes.parameters(), lr=settings["ae_lr"], weight_decay=0.0)
                           for layer, aes in self.autoencoders.items()}
        self.schedules = {layer: torch.optim.lr_scheduler.LambdaLR(opt, self._decay)
                          for layer, opt in self.optimizers.items()}
        self.capturing = False
        self.pending: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.autoencoders}
        self.shuffle = random.Random(seed)

    def _decay(self, step: int) -> float:
        return max(0.0, 1 - step / self.total_steps)

    def parameters(self) -> list[nn.Parameter]:
        return [p for aes in self.autoencoders.values() for p in aes.parameters()]

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        blocks = gpt2_blocks(model)
        handles = [blocks[layer].mlp.register_forward_hook(self._hook(layer)) for layer in self.autoencoders]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for stored in self.pending.values():
                stored.clear()

    def _hook(self, layer: int):
        def views(mlp: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self.capturing:
                self.pending[layer].append(output.detach().flatten(0, 1).float())
                return None
            if not mlp.training:
                return None  # eval: the identity
            noisy = output + self.settings["noise"] * torch.randn_like(output)
            self.pending[layer].append(noisy.detach().flatten(0, 1).float())
            return sample_views(noisy, self.autoencoders[layer])

        return views

    def warm_up(self, forward_batches: ForwardBatches, task_steps: int) -> None:
        """`pretrain_epochs` epochs of reconstruction on the frozen model's MLP outputs (plus the noise)."""
        epochs = self.settings["pretrain_epochs"]
        cache, num_batches = self._cache(forward_batches) if epochs else ([], 0)
        self.total_steps = max(1, epochs * num_batches + task_steps)
        noise = self.settings["noise"]
        for _ in range(epochs):
            if cache is not None:
                self.shuffle.shuffle(cache)
            for batch in cache if cache is not None else self._captured(forward_batches):
                self._reconstruction_step({layer: h + noise * torch.randn_like(h) for layer, h in batch.items()})

    def _cache(self, forward_batches: ForwardBatches) -> tuple[list[dict[int, torch.Tensor]] | None, int]:
        """The captured batches (None when they exceed `CACHE_BYTES`) and how many there are."""
        cache: list[dict[int, torch.Tensor]] | None = []
        captured_bytes, num_batches = 0, 0
        for batch in self._captured(forward_batches):
            num_batches += 1
            captured_bytes += sum(t.numel() * t.element_size() for t in batch.values())
            if cache is not None and captured_bytes > CACHE_BYTES:
                cache = None
            if cache is not None:
                cache.append(batch)
        return cache, num_batches

    def _captured(self, forward_batches: ForwardBatches) -> Iterator[dict[int, torch.Tensor]]:
        """MLP outputs at the MVCR layers, one batch at a time ([tokens, d] per layer)."""
        self.capturing = True
        try:
            for _ in forward_batches():
                yield {layer: torch.cat(stored) for layer, stored in self.pending.items()}
                for stored in self.pending.values():
                    stored.clear()
        finally:
            self.capturing = False

    def after_step(self) -> dict[str, float]:
        """One reconstruction step per layer on the noisy MLP outputs the task step saw."""
        if not any(self.pending.values()):
            return {}
        inputs = {layer: torch.cat(stored) for layer, stored in self.pending.items()}
        for stored in self.pending.values():
            stored.clear()
        return {"reconstruction_loss": self._reconstruction_step(inputs)}

    def _reconstruction_step(self, inputs: dict[int, torch.Tensor]) -> float:
        """Each layer's reconstruction loss, stepped by that layer's optimiser; the mean over layers."""
        losses = []
        for layer, h in inputs.items():
            loss = reconstruction_loss(h, self.autoencoders[layer])
            loss.backward()
            self.average_gradients(list(self.autoencoders[layer].parameters()))
            torch.nn.utils.clip_grad_norm_(self.autoencoders[layer].parameters(), 1.0)
            self.optimizers[layer].step()
            self.schedules[layer].step()
            self.optimizers[layer].zero_grad(set_to_none=True)
            losses.append(loss.item())
        return sum(losses) / len(losses)

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps,
                "layers": {layer: {"autoencoders": self.autoencoders[layer].state_dict(),
                                   "optimizer": self.optimizers[layer].state_dict(),
                                   "schedule": self.schedules[layer].state_dict()} for layer in self.autoencoders}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_steps = state["total_steps"]
        for layer, parts in state["layers"].items():
            self.autoencoders[int(layer)].load_state_dict(parts["autoencoders"])
            self.optimizers[int(layer)].load_state_dict(parts["optimizer"])
            self.schedules[int(layer)].load_state_dict(parts["schedule"])


def check_settings(settings: dict[str, Any], n_layer: int) -> None:
    """A clear error for each invalid MVCR setting."""
    layers, dims = settings["layers"], settings["dims"]
    if not all(isinstance(i, int) and 0 <= i < n_layer for i in layers) or len(set(layers)) != len(layers):
        raise HubError(f"--mvcr-layers {layers}: need distinct block indices in 0..{n_layer - 1} "
                       f"(this model has {n_layer} blocks)")
    if not dims or not all(isinstance(d, int) and d > 1 for d in dims):
        raise HubError(f"--mvcr-dims {dims}: need whole numbers > 1 (each autoencoder's bottleneck)")
    if not (isinstance(settings["noise"], (int, float)) and 0 <= settings["noise"] < math.inf):
        raise HubError(f"--mvcr-noise {settings['noise']}: need a standard deviation >= 0")
    if not (isinstance(settings["pretrain_epochs"], int) and settings["pretrain_epochs"] >= 0):
        raise HubError(f"--mvcr-pretrain-epochs {settings['pretrain_epochs']}: need a whole number >= 0")
    if not (isinstance(settings["ae_lr"], (int, float)) and 0 < settings["ae_lr"] < math.inf):
        raise HubError(f"--mvcr-ae-lr {settings['ae_lr']}: need a learning rate > 0")
