"""What a run export and a store version hold on disk: the file names, and which files each adapter kind stores
(`hub.store.kinds`: each kind registers its own).

A version folder ``<root>/<name>/<version>/`` holds its kind's payload files and ``hub.json``; folders starting
with ``.`` (``.tmp-*`` staging, ``.trash-*`` removal) are internal and never listed.
"""

from __future__ import annotations

from hub.store.format import AdapterMeta
from hub.store.kinds import stored_kind

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
TASK_TOKENS = "task_tokens.safetensors"
ADAPTER_META = "adapter_meta.json"
HUB_JSON = "hub.json"
TRAIN_LOG = "train_log.json"  # optional: the run's losses, stored when the export has it (`hub show --plot`)
EXPORT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_TOKENS, ADAPTER_META)
# adapter_meta.json is not stored: hub.json carries its content.
PAYLOAD_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_TOKENS)
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}

MAX_PUBLISH_ATTEMPTS = 100
STALE_AFTER_S = 3600.0  # internal folders older than this belong to no live publisher (`hub store gc`)
INTERNAL_PREFIXES = (".tmp-", ".trash-", f".{HUB_JSON}.tmp-")


def payload_files(meta: AdapterMeta) -> tuple[str, ...]:
    """The files a version of `meta`'s kind stores besides hub.json, each checksummed in `meta.files`."""
    return stored_kind(meta.adapter_kind).payload_files


def checked_files(meta) -> tuple[str, ...]:
    """The files a version's checksums cover: its payload, and its training log when one was recorded."""
    return (*payload_files(meta), *((TRAIN_LOG,) if TRAIN_LOG in meta.files else ()))


def weights_file(meta: AdapterMeta) -> str:
    """The payload file a version's adapter tensors are read from."""
    return stored_kind(meta.adapter_kind).weights_file
