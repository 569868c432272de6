"""Deprecated: the names this module held before the store was split into one concept per module.

Import from the modules instead — `hub.store.local` (AdapterStore), `hub.store.versions` (StoredVersion,
SkippedVersion, AdapterSummary, LoadedAdapter), `hub.store.refs`, `hub.store.fingerprint`, `hub.store.export`,
`hub.store.layout`; the VLM tensor keys (`adapter_layers`) are `hub.adapters.vlm_format`'s. Kept only until
`hub/serving/` and `server/` have moved; nothing else imports it.
"""

from __future__ import annotations

from hub.store import fingerprint
from hub.store.export import RunExport, export_dir, read_export, stage_payload
from hub.store.fileio import sha256_file, utc_now
from hub.store.fingerprint import fingerprint_mismatch
from hub.store.layout import (
    ADAPTER_CONFIG, ADAPTER_META, ADAPTER_WEIGHTS, EXPORT_FILES, HUB_JSON, INTERNAL_PREFIXES,
    MAX_PUBLISH_ATTEMPTS, PAYLOAD_FILES, PICKLE_SUFFIXES, STALE_AFTER_S, TASK_TOKENS, TRAIN_LOG, payload_files,
    weights_file,
)
from hub.store.local import AdapterStore
from hub.store.refs import MAX_NAME_LEN, NAME_RE, parse_ref, validate_name, version_key
from hub.store.versions import (
    AdapterSummary, LoadedAdapter, SkippedVersion, StoredVersion, loaded_adapter, read_training_log,
)

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_META", "ADAPTER_WEIGHTS", "EXPORT_FILES", "HUB_JSON", "INTERNAL_PREFIXES",
    "MAX_NAME_LEN", "MAX_PUBLISH_ATTEMPTS", "NAME_RE", "PAYLOAD_FILES",
    "PICKLE_SUFFIXES", "STALE_AFTER_S", "TASK_TOKENS", "TRAIN_LOG", "VAE_WEIGHTS", "AdapterStore", "AdapterSummary",
    "LoadedAdapter", "RunExport", "SkippedVersion", "StoredVersion", "check_backbone", "export_dir",
    "fingerprint_mismatch", "loaded_adapter", "parse_ref", "payload_files", "read_export", "read_training_log",
    "sha256_file", "stage_payload", "utc_now", "validate_name", "version_key", "weights_file",
]

# Read here by `hub.training.vae` until it imports the kind's own (`hub.adapters.vae_kind.VAE_WEIGHTS`).
VAE_WEIGHTS = "vae.safetensors"


def check_backbone(stored: StoredVersion, backbone: dict) -> None:
    """The old signature of `hub.store.fingerprint.check_backbone` (used by hub/serving/sync.py until it moves)."""
    fingerprint.check_backbone(stored.meta.backbone, backbone, f"adapter '{stored.ref}'")
