"""What a store returns: published versions, skipped ones with their reason, a name's summary, loaded tensors.

Every backend builds these (`hub.store.local`, `hub.store.backends.fsspec_store`) and ends its `load` in
`loaded_adapter`, so the checks on reading a version are written once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from hub.errors import IntegrityError, NotFoundError
from hub.store.fingerprint import check_backbone
from hub.store.format import AdapterMeta
from hub.store.layout import TASK_TOKENS, TRAIN_LOG, weights_file
from hub.store.refs import Ref


@dataclass(frozen=True)
class StoredVersion:
    """One published, fully validated version; ``meta`` is its hub.json. ``path``: a local folder or a URL."""

    name: str
    version: str
    path: Path | str
    meta: AdapterMeta

    @property
    def ref(self) -> str:
        return str(Ref(self.name, self.version))

    @property
    def created_at(self) -> str | None:
        return self.meta.created_at


@dataclass(frozen=True)
class SkippedVersion:
    """A version folder (or a whole name, `version` None) that is not used, and why."""

    name: str
    version: str | None
    reason: str

    @property
    def ref(self) -> str:
        return str(Ref(self.name, self.version))


@dataclass(frozen=True)
class AdapterSummary:
    """A name with its usable versions, oldest to newest, and the versions skipped."""

    name: str
    versions: list[StoredVersion]
    skipped: list[SkippedVersion] = field(default_factory=list)

    @property
    def latest(self) -> StoredVersion:
        return self.versions[-1]


@dataclass(frozen=True)
class LoadedAdapter:
    """A verified version with its tensors in memory (CPU)."""

    name: str
    version: str
    meta: AdapterMeta
    path: Path | str | None
    adapter_tensors: dict[str, torch.Tensor]
    token_rows: torch.Tensor

    @property
    def ref(self) -> str:
        return str(Ref(self.name, self.version))


def loaded_adapter(stored: StoredVersion, backbone: dict | None,
                   read_tensors: Callable[[str], dict[str, torch.Tensor]]) -> LoadedAdapter:
    """A verified version's tensors (`read_tensors(payload file name)`) as a LoadedAdapter, after checking the
    backbone fingerprint (if given) and the task rows' shape; every store backend ends its `load` here."""
    if backbone is not None:
        check_backbone(stored.meta.backbone, backbone, f"adapter '{stored.ref}'")
    adapter_tensors = read_tensors(weights_file(stored.meta))
    if not stored.meta.has_task_tokens:
        no_rows = torch.zeros(0, stored.meta.backbone["n_embd"])
        return LoadedAdapter(stored.name, stored.version, stored.meta, stored.path, adapter_tensors, no_rows)
    rows = read_tensors(TASK_TOKENS).get("rows")
    k = len(stored.meta.special_tokens)
    d = stored.meta.backbone.get("n_embd")
    if rows is None or rows.ndim != 2 or rows.shape[0] != k or (d is not None and rows.shape[1] != d):
        raise IntegrityError(f"{TASK_TOKENS} of '{stored.ref}' does not hold rows [{k}, {d or 'd'}] for its "
                             f"backbone" + (f" (found {list(rows.shape)})" if rows is not None else ""))
    return LoadedAdapter(stored.name, stored.version, stored.meta, stored.path, adapter_tensors, rows)


def read_training_log(stored: StoredVersion, read: Callable[[], bytes]) -> dict:
    """A version's `train_log.json` from `read()` (a file, an object), checked against the sha256 hub.json
    recorded for it (versions published before logs were checksummed have none); NotFoundError when it has none."""
    try:
        data = read()
        recorded = stored.meta.files.get(TRAIN_LOG)
        if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
            raise IntegrityError(f"{TRAIN_LOG} of '{stored.ref}' is corrupted or modified (sha256 mismatch)")
        return json.loads(data)
    except FileNotFoundError:
        raise NotFoundError(f"'{stored.ref}' has no training log (published from an export without "
                            f"{TRAIN_LOG}); its run folder's loss_curve.png has the curve") from None
    except ValueError as e:
        raise IntegrityError(f"{TRAIN_LOG} of '{stored.ref}' is not readable JSON: {e}") from e
