"""What a run export and a store version hold on disk: the file names, and which files each adapter kind stores.

A version folder ``<root>/<name>/<version>/`` holds its kind's payload files and ``hub.json``; folders starting
with ``.`` (``.tmp-*`` staging, ``.trash-*`` removal) are internal and never listed.
"""

from __future__ import annotations

from hub.store.format import SENTENCE_VAE, VLM, AdapterMeta

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
TASK_TOKENS = "task_tokens.safetensors"
ADAPTER_META = "adapter_meta.json"
HUB_JSON = "hub.json"
TRAIN_LOG = "train_log.json"  # optional: the run's losses, stored when the export has it (`hub show --plot`)
VAE_WEIGHTS = "vae.safetensors"
EXPORT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_TOKENS, ADAPTER_META)
# adapter_meta.json is not stored: hub.json carries its content.
PAYLOAD_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_TOKENS)
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}

# adapter kind -> the files its bundle stores (and hub.json checksums); kinds not named here store a VLM bundle
KIND_PAYLOAD_FILES = {VLM: PAYLOAD_FILES, SENTENCE_VAE: (VAE_WEIGHTS,)}
KIND_WEIGHTS = {SENTENCE_VAE: VAE_WEIGHTS}  # adapter kind -> the file LoadedAdapter.adapter_tensors come from

MAX_PUBLISH_ATTEMPTS = 100
STALE_AFTER_S = 3600.0  # internal folders older than this belong to no live publisher (`hub store gc`)
INTERNAL_PREFIXES = (".tmp-", ".trash-", f".{HUB_JSON}.tmp-")


def payload_files(meta: AdapterMeta) -> tuple[str, ...]:
    """The files a version of `meta`'s kind stores besides hub.json, each checksummed in `meta.files`."""
    return KIND_PAYLOAD_FILES.get(meta.adapter_kind, PAYLOAD_FILES)


def weights_file(meta: AdapterMeta) -> str:
    """The payload file a version's adapter tensors are read from."""
    return KIND_WEIGHTS.get(meta.adapter_kind, ADAPTER_WEIGHTS)
