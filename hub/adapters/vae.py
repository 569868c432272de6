"""The sentence VAE on the one frozen GPT-2 (AdaVAE, Tu et al. 2022; spec `vae-and-mvcr.md` §2).

    encoder  the first k blocks of GPT-2, bidirectional (key-padding mask only), then `ln_f`, with the encoder
             adapter set; pooled over tokens (latent attention, mean or max) into one vector per sentence
    heads    μ = W_μ·rep + b, log σ² = W_σ·rep + b;  z = μ + σ ⊙ ε  (σ, not log σ²: spec §6)
    decoder  all blocks, causal, with the decoder adapter set; z enters as a one-slot KV prefix in every layer
             (AdaVAE `add_attn`), as a vector added to every input embedding (Optimus), or both

Nothing of GPT-2 is trained or changed, its LayerNorms included. The encoder calls the blocks' parts itself with
its adapters in line; the decoder's adapters and injection are forward hooks whose handles are removed when the
pass ends (`SentenceVAE.decoder_pass`); serving applies them per row (`hub.adapters.vae_runtime`). What the rest of the
hub knows of the kind (files, metadata, hooks) is `hub.adapters.vae_kind`. Adapter formulas:

    block_output  (default; the hub's VLM adapter, `hub.adapters.vlm.vlm_adapter`)  h ← A(h) after each block
    ffn_parallel  (AdaVAE)  x ← x + mlp(ln_2 x) + f(x),  f(x) = W_up·ReLU(W_down·x + b_d) + b_u, no LN

The KV prefix uses HF's cache convention: the latent occupies cache position 0, so the first real token gets
position id 1 (Optimus' `past_length = 1`); training, scoring and serving all derive positions from the mask.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from hub.adapters.vlm import AdapterWeights, vlm_adapter
from hub.errors import HubError, IntegrityError
from hub.store.format import AdapterMeta

POOLINGS = ("latent_attn", "mean", "max")
INJECTIONS = ("kv_prefix", "embedding", "both")
KV_PROJECTIONS = ("direct", "per_layer")
ADAPTER_SITES = ("block_output", "ffn_parallel")


@dataclass(frozen=True)
class VAEConfig:
    """Shape of a sentence VAE bundle. `kv_projection`: `direct` = one Linear(nz → L·2·d) for every layer's
    K_z, V_z (rank ≤ nz, Optimus' memory size); `per_layer` = AdaVAE's Linear(nz → d) then a Conv1D(d → 2d) per
    layer (14 M parameters on GPT-2 small)."""

    nz: int = 32
    encoder_layers: int = 8
    bottleneck: int = 128
    pooling: str = "latent_attn"
    pooling_temperature: float = 1.0  # AdaVAE used √(batch size): spec §6
    injection: str = "kv_prefix"
    kv_projection: str = "direct"
    adapter_site: str = "block_output"

    def validate(self, n_layer: int) -> "VAEConfig":
        for value, allowed, what in ((self.pooling, POOLINGS, "pooling"), (self.injection, INJECTIONS, "injection"),
                                     (self.kv_projection, KV_PROJECTIONS, "kv_projection"),
                                     (self.adapter_site, ADAPTER_SITES, "adapter_site")):
            if value not in allowed:
                raise HubError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
        if not 1 <= self.encoder_layers <= n_layer:
            raise HubError(f"encoder_layers must be between 1 and the backbone's {n_layer} layers")
        if self.nz < 1 or self.bottleneck < 1 or self.pooling_temperature <= 0:
            raise HubError("nz and bottleneck must be at least 1 and pooling_temperature positive")
        return self

    @property
    def uses_prefix(self) -> bool:
        return self.injection in ("kv_prefix", "both")

    @property
    def uses_embedding(self) -> bool:
        return self.injection in ("embedding", "both")

    def as_dict(self) -> dict:
        return asdict(self)


def default_encoder_layers(n_layer: int) -> int:
    """AdaVAE's 8 of 12 blocks; round(2/3·L) for other depths."""
    return max(1, round(2 * n_layer / 3))


def ffn_parallel_adapter(x: torch.Tensor, w: AdapterWeights) -> torch.Tensor:
    """AdaVAE's f(x) = W_up·ReLU(W_down·x + b_d) + b_u (no LayerNorm; `w.ln_*` unused), the term added to the
    MLP output. Weights shared ([d, r] ...) or per row ([B, d, r] ...), as in `vlm_adapter`."""
    lift = (lambda t: t.unsqueeze(1)) if w.down_bias.dim() == 2 else (lambda t: t)
    hidden = torch.relu(torch.matmul(x, w.down_weight) + lift(w.down_bias))
    return torch.matmul(hidden, w.up_weight) + lift(w.up_bias)


class AdapterSet(nn.Module):
    """One adapter per block for `n` blocks, stacked: `AdapterWeights` with a leading [n] dim (the bank layout).

    W_down ~ N(0, 0.02), W_up = 0: at initialisation every adapter is the identity."""

    def __init__(self, n: int, hidden_size: int, bottleneck: int):
        super().__init__()
        self.ln_weight = nn.Parameter(torch.ones(n, hidden_size))
        self.ln_bias = nn.Parameter(torch.zeros(n, hidden_size))
        self.down_weight = nn.Parameter(torch.randn(n, hidden_size, bottleneck) * 0.02)
        self.down_bias = nn.Parameter(torch.zeros(n, bottleneck))
        self.up_weight = nn.Parameter(torch.zeros(n, bottleneck, hidden_size))
        self.up_bias = nn.Parameter(torch.zeros(n, hidden_size))

    def weights(self) -> AdapterWeights:
        return AdapterWeights(self.ln_weight, self.ln_bias, self.down_weight, self.down_bias, self.up_weight,
                              self.up_bias)

    @contextmanager
    def attached(self, blocks: Sequence[GPT2Block], site: str, eps: float) -> Iterator[None]:
        """Hooks that apply layer i's adapter in `blocks[i]` at `site`; removed on exit."""
        with ExitStack() as stack:
            for i, block in enumerate(blocks[: self.ln_weight.shape[0]]):
                w = self.weights().map(lambda t, i=i: t[i])
                for handle in _site_hooks(block, site, w, eps):
                    stack.callback(handle.remove)
            yield


def _site_hooks(block: GPT2Block, site: str, w: AdapterWeights, eps: float) -> list:
    if site == "block_output":
        return [block.register_forward_hook(
            lambda module, args, output: (vlm_adapter(output[0], w, eps),) + tuple(output[1:]))]
    residual: list[torch.Tensor] = []  # the post-attention stream, captured as ln_2's input

    def capture(module, args):
        residual[:] = [args[0]]

    return [block.ln_2.register_forward_pre_hook(capture),
            block.mlp.register_forward_hook(lambda module, args, output: output + ffn_parallel_adapter(residual[0], w))]


class LatentPooling(nn.Module):
    """Token states [B, T, d] with mask [B, T] -> one vector [B, d].

    latent_attn: s_t = ReLU(w·h_t + b), α = softmax_t(s_t / τ) over real tokens, rep = Σ α_t h_t (τ constant)."""

    def __init__(self, hidden_size: int, kind: str, temperature: float):
        super().__init__()
        self.kind, self.temperature = kind, temperature
        self.score = nn.Linear(hidden_size, 1) if kind == "latent_attn" else None

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        real = mask.bool().unsqueeze(-1)
        if self.kind == "mean":
            return (h * real).sum(1) / real.sum(1).clamp(min=1)
        if self.kind == "max":
            return h.masked_fill(~real, float("-inf")).amax(1)
        assert self.score is not None  # latent_attn
        scores = torch.relu(self.score(h)) / self.temperature
        alpha = scores.masked_fill(~real, float("-inf")).softmax(dim=1)
        return (alpha * h).sum(1)


class LatentInjector(nn.Module):
    """z [B, nz] -> per-layer K_z, V_z [B, H, 1, d_head] (KV prefix) and/or an embedding offset [B, d]."""

    def __init__(self, config: VAEConfig, n_layer: int, n_head: int, hidden_size: int):
        super().__init__()
        self.n_layer, self.n_head, self.hidden_size = n_layer, n_head, hidden_size
        self.kv: nn.Module | None = None
        if config.uses_prefix and config.kv_projection == "direct":
            self.kv = nn.Linear(config.nz, n_layer * 2 * hidden_size, bias=False)
        elif config.uses_prefix:
            self.kv = nn.Sequential(nn.Linear(config.nz, hidden_size, bias=False),
                                    PerLayerProjection(n_layer, hidden_size, 2 * hidden_size))
        self.embedding = nn.Linear(config.nz, hidden_size, bias=False) if config.uses_embedding else None

    def prefix(self, z: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """(K_z, V_z) per layer, each [B, H, 1, d_head]; None without a KV prefix."""
        if self.kv is None:
            return None
        kv = self.kv(z).view(z.shape[0], self.n_layer, 2, self.n_head, 1, self.hidden_size // self.n_head)
        return [(kv[:, layer, 0], kv[:, layer, 1]) for layer in range(self.n_layer)]

    def embedding_offset(self, z: torch.Tensor) -> torch.Tensor | None:
        return None if self.embedding is None else self.embedding(z)


class PerLayerProjection(nn.Module):
    """AdaVAE's `c_z`: one Conv1D(d → 2d) per layer, outputs concatenated [B, L·2d]."""

    def __init__(self, n_layer: int, hidden_size: int, out_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_layer, hidden_size, out_size) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_layer, out_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.einsum("bd,lde->ble", x, self.weight) + self.bias).flatten(1)


def latent_cache(prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache that already holds the latent slot of every layer."""
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(prefix):
        cache.update(keys, values, layer)
    return cache


@contextmanager
def embedding_offset_hook(model: GPT2LMHeadModel, offset: torch.Tensor | None) -> Iterator[None]:
    """Add `offset` [B, d] to every position's token + position embedding (before GPT-2's embedding dropout);
    nothing when `offset` is None."""
    if offset is None:
        yield
        return
    handle = model.transformer.drop.register_forward_pre_hook(lambda module, args: (args[0] + offset[:, None],))
    try:
        yield
    finally:
        handle.remove()


class SentenceVAE(nn.Module):
    """The trainable bundle (adapters, pooling, heads, injector) over a frozen GPT-2 it only borrows."""

    def __init__(self, config: VAEConfig, model_config):
        super().__init__()
        self.config = config.validate(model_config.n_layer)
        d, n_layer = model_config.n_embd, model_config.n_layer
        self.eps = model_config.layer_norm_epsilon
        self.encoder_adapters = AdapterSet(config.encoder_layers, d, config.bottleneck)
        self.decoder_adapters = AdapterSet(n_layer, d, config.bottleneck)
        self.pooling = LatentPooling(d, config.pooling, config.pooling_temperature)
        self.mu = nn.Linear(d, config.nz)
        self.logvar = nn.Linear(d, config.nz)
        self.injector = LatentInjector(config, n_layer, model_config.n_head, d)

    # -- encoder --------------------------------------------------------------------------------------------
    def encode(self, model: GPT2LMHeadModel, ids: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²), each [B, nz], for right-padded ids [B, T] with mask [B, T]."""
        rep = self.pooling(self.encoder_states(model, ids, mask), mask)
        return self.mu(rep), self.logvar(rep)

    def encoder_states(self, model: GPT2LMHeadModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`ln_f` of the first k blocks run bidirectionally (each token sees every real token) [B, T, d].

        The blocks' parts are called directly (`.forward`), with the encoder adapters applied in line: no hook
        is registered or fired, so an encode pass may run while the serving engine decodes on the same model."""
        require_sdpa(model)
        transformer = model.transformer
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        embedded = transformer.wte(ids) + transformer.wpe(positions)
        h = F.dropout(embedded, transformer.drop.p, self.training)
        key_padding = mask.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
        weights = self.encoder_adapters.weights()
        for layer, block in enumerate(transformer.h[: self.config.encoder_layers]):
            h = self._encoder_block(block, h, key_padding, weights.map(lambda t: t[layer]))
        return transformer.ln_f.forward(h)

    def _encoder_block(self, block: GPT2Block, h: torch.Tensor, key_padding: torch.Tensor,
                       w: AdapterWeights) -> torch.Tensor:
        """GPT2Block's pre-LN residual computation (attention, then MLP) with this layer's encoder adapter."""
        x = h + block.attn.forward(block.ln_1.forward(h), attention_mask=key_padding)[0]
        mlp = block.mlp.forward(block.ln_2.forward(x))
        if self.config.adapter_site == "ffn_parallel":
            return x + mlp + ffn_parallel_adapter(x, w)
        return vlm_adapter(x + mlp, w, self.eps)

    # -- decoder --------------------------------------------------------------------------------------------
    def decoder_logits(self, model: GPT2LMHeadModel, ids: torch.Tensor, mask: torch.Tensor,
                       z: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, T, V] of right-padded ids [B, T] given z [B, nz] (teacher forcing)."""
        prefix = self.injector.prefix(z)
        cache = latent_cache(prefix) if prefix is not None else None
        full_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1) if prefix is not None else mask
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        with self.decoder_pass(model, z):
            return model(input_ids=ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                         use_cache=cache is not None).logits

    @contextmanager
    def decoder_pass(self, model: GPT2LMHeadModel, z: torch.Tensor) -> Iterator[None]:
        """Decoder adapters and the embedding offset of z on `model` for the duration of the block."""
        with self.decoder_adapters.attached(model.transformer.h, self.config.adapter_site, self.eps), \
                embedding_offset_hook(model, self.injector.embedding_offset(z)):
            yield

    def token_nll(self, model: GPT2LMHeadModel, ids: torch.Tensor, mask: torch.Tensor,
                  z: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """−log p(x_t | x_<t, z) [B, T−1] of `<bos> x <eos>` rows (ids [B, T], right-padded; 0 at padding).

        `inputs` (same shape) replaces what the decoder reads, not what it predicts (word dropout)."""
        logits = self.decoder_logits(model, (ids if inputs is None else inputs)[:, :-1], mask[:, :-1], z)
        nll = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        return nll.view(ids.shape[0], -1) * mask[:, 1:]

    @torch.no_grad()
    def greedy(self, model: GPT2LMHeadModel, z: torch.Tensor, bos_id: int, eos_id: int,
               max_new_tokens: int) -> list[list[int]]:
        """The plain (unfused) decoder: greedy tokens per row of z [B, nz], cut at EOS."""
        prefix = self.injector.prefix(z)
        cache = latent_cache(prefix) if prefix is not None else DynamicCache()
        batch = z.shape[0]
        mask = torch.ones(batch, 1 if prefix is not None else 0, dtype=torch.long, device=z.device)
        last = torch.full((batch, 1), bos_id, device=z.device)
        outputs = torch.zeros(batch, 0, dtype=torch.long, device=z.device)
        with self.decoder_pass(model, z):
            for _ in range(max_new_tokens):
                mask = torch.cat([mask, torch.ones_like(last)], dim=1)
                positions = (mask.cumsum(-1) - 1)[:, -1:]
                logits = model(input_ids=last, attention_mask=mask, position_ids=positions, past_key_values=cache,
                               use_cache=True).logits[:, -1]
                last = logits.argmax(-1, keepdim=True)
                outputs = torch.cat([outputs, last], dim=1)
                if bool((outputs == eos_id).any(-1).all()):
                    break
        return [cut_at(row, eos_id) for row in outputs.tolist()]

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, samples: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ·ε, [B, nz]; with `samples` k: [B, k, nz]."""
        std = (0.5 * logvar).exp()
        if samples is not None:
            mu, std = mu.unsqueeze(1).expand(-1, samples, -1), std.unsqueeze(1).expand(-1, samples, -1)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + std * eps

    def parts(self) -> dict[str, nn.Module]:
        """The bundle's parts by name (what a recipe freezes or trains is a choice among them)."""
        return {"encoder_adapters": self.encoder_adapters, "decoder_adapters": self.decoder_adapters,
                "pooling": self.pooling, "heads": nn.ModuleList([self.mu, self.logvar]), "injector": self.injector}

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part of the bundle."""
        return {name: sum(p.numel() for p in part.parameters()) for name, part in self.parts().items()}


def encode_sentences(tokenizer, sentences: list[str], max_length: int) -> list[list[int]]:
    """`<bos> x <eos>` ids per non-empty sentence (GPT-2's `<|endoftext|>` as both), x cut to fit `max_length`."""
    eos = tokenizer.eos_token_id or 0
    return [[eos] + tokenizer.encode(" " + s.strip())[: max_length - 2] + [eos] for s in sentences if s.strip()]


def pad_rows(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] (0 at padding) and their mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def cut_at(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def require_sdpa(model: GPT2LMHeadModel) -> None:
    """GPT-2's eager attention always applies its causal buffer; SDPA honours a key-padding-only mask."""
    if model.config._attn_implementation != "sdpa":
        raise HubError(f"the sentence VAE encoder needs GPT-2 loaded with attn_implementation='sdpa', "
                       f"not {model.config._attn_implementation!r}")


def load_vae(tensors: dict[str, torch.Tensor], meta: AdapterMeta, model_config) -> SentenceVAE:
    """A stored bundle (`vae.safetensors` tensors, its metadata) as a `SentenceVAE` for `model_config`'s backbone;
    an IntegrityError says what does not fit."""
    try:
        vae = SentenceVAE(VAEConfig(**(meta.vae or {})), model_config)
    except TypeError as err:
        raise IntegrityError(f"sentence VAE '{meta.name}' has an unreadable 'vae' config: {err}") from None
    expected = vae.state_dict()
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    wrong = [k for k in expected.keys() & tensors.keys() if expected[k].shape != tensors[k].shape]
    if missing or unexpected or wrong:
        raise IntegrityError(f"sentence VAE '{meta.name}' does not fit its config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, wrong shape {sorted(wrong)[:3]}")
    vae.load_state_dict(tensors)
    return vae.eval()


def interpolation_path(start: torch.Tensor, end: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` points on the line from `start` to `end` [nz], both ends included: [steps, nz]."""
    weights = torch.linspace(0, 1, steps, device=start.device, dtype=start.dtype)[:, None]
    return (1 - weights) * start + weights * end


def analogy_point(mu_a: torch.Tensor, mu_b: torch.Tensor, mu_c: torch.Tensor) -> torch.Tensor:
    """a : b = c : ?  ->  μ(c) + μ(b) − μ(a)."""
    return mu_c + mu_b - mu_a
