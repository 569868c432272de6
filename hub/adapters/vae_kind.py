"""The sentence-VAE adapter kind as the hub sees it (`SPEC`): its file, its metadata, its hooks in the CLI and
the server, and its reading length. Free of torch: registered (`hub.adapters.registry`) when `hub` is imported.

The model is `hub.adapters.vae`, its serving runtime `hub.adapters.vae_runtime`; `hub train sentence_vae`,
`hub eval` of a VAE and `hub vae ...` are `cli.vae`; the `/v1/vae/{task}/...` routes are `server.vae`.
"""

from __future__ import annotations

from typing import Any

from hub.adapters.spec import KindSpec
from hub.store.format import AdapterMeta
from hub.store.kinds import StoredKind

SENTENCE_VAE = "sentence_vae"
VAE_WEIGHTS = "vae.safetensors"
MAX_LENGTH = 32  # tokens of `<bos> sentence <eos>` a VAE reads when its metadata does not say
TEXT_INPUT_ERROR = ("it is a sentence VAE: use POST /v1/vae/{task}/encode, /decode, /reconstruct, /sample, "
                    "/interpolate or /analogy (CLI: hub vae ...)")


def max_length(meta: AdapterMeta) -> int:
    """The longest `<bos> sentence <eos>` (in tokens) the VAE of `meta` was trained on."""
    return meta.max_length or meta.extra.get("training", {}).get("max_length") or MAX_LENGTH


def summary(meta: AdapterMeta) -> str:
    """`hub show`'s line for a sentence VAE."""
    vae = meta.vae or {}
    return (f"sentence VAE: nz {vae.get('nz')}, encoder {vae.get('encoder_layers')} blocks, pooling "
            f"{vae.get('pooling')}, injection {vae.get('injection')} ({vae.get('kv_projection')}), adapters "
            f"{vae.get('adapter_site')}, recipe {meta.extra.get('recipe')}; parts {meta.extra.get('parts')}")


def _meta_problems(data: dict[str, Any]) -> list[str]:
    return [] if data["vae"] is not None else ["vae must be an object"]


SPEC = KindSpec(
    stored=StoredKind(SENTENCE_VAE, (VAE_WEIGHTS,), VAE_WEIGHTS, has_task_tokens=False, required_fields=("vae",),
                      meta_problems=_meta_problems),
    implementation="hub.adapters.vae_runtime:VaeKind",
    description="sentence VAE on one sentence per line (hub train sentence_vae --recipe adavae|two-phase|none)",
    summary=summary,
    cli_train="cli.vae:train_command",
    cli_eval="cli.vae:evaluate_command",
    http_router="server.vae:vae_router",
)
