"""The one frozen GPT-2: loading by Hugging Face id or local path, device/dtype choice, fingerprint."""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerBase

from hub.errors import HubError

DEFAULT_BASE = os.environ.get("HUB_BASE", "gpt2")
HUB_PROBE_TIMEOUT = 3.0  # seconds to reach the model hub before giving up (transformers itself retries ~90 s)


@dataclass
class Backbone:
    """A frozen `GPT2LMHeadModel` with its tokenizer, device, dtype and fingerprint."""

    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: dict
    num_parameters: int  # of GPT-2 itself, counted at load, before any adapter or task row is attached

    @property
    def vocab_size(self) -> int:
        """Rows of the original embedding matrix; task tokens get ids from here on."""
        return self.model.config.vocab_size

    @property
    def n_positions(self) -> int:
        return self.model.config.n_positions


def resolve_base(base: str | None, trained_on: dict | None = None) -> str | None:
    """--base, else HUB_BASE, else the backbone an adapter or model was trained on (its fingerprint's source)."""
    return base or os.environ.get("HUB_BASE") or (trained_on or {}).get("source")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise HubError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HubError("--device cuda was asked for, but no CUDA GPU is available here; use --device cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on the CPU; bf16 on a GPU that supports it, else fp16."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """Why the Hugging Face hub (`HF_ENDPOINT`) cannot be reached, or None when a connection opens."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"cannot connect to {endpoint.hostname}:{port} ({err.__class__.__name__}: {err})"
    return None


def _from_pretrained(source: str) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """A local folder, else the Hugging Face cache, else a download, failing within seconds when offline."""
    if not Path(source).exists():
        try:
            return (GPT2LMHeadModel.from_pretrained(source, local_files_only=True),
                    AutoTokenizer.from_pretrained(source, local_files_only=True))
        except OSError:
            reason = hub_unreachable()
            if reason:
                raise HubError(f"backbone {source!r} is neither a local folder nor in the Hugging Face cache, and "
                               f"the model hub is unreachable: {reason}. Pass a local model folder with --base "
                               f"(or HUB_BASE), e.g. ../shared/models/gpt2-standin") from None
    try:
        return GPT2LMHeadModel.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise HubError(
            f"cannot load backbone {source!r}: {err.__class__.__name__}. Pass a local model folder with --base "
            f"(or HUB_BASE), e.g. ../shared/models/gpt2-standin, or a Hugging Face id when online."
        ) from None


def load_backbone(source: str | None = None, device: str = "auto", dtype: torch.dtype | None = None) -> Backbone:
    """Load a GPT-2 by HF id (`gpt2`, `gpt2-medium`, ...) or local path and freeze every weight."""
    source = source or DEFAULT_BASE
    torch_device = resolve_device(device)
    model, tokenizer = _from_pretrained(source)
    if model.config.model_type != "gpt2":
        raise HubError(f"backbone {source!r} is a {model.config.model_type!r} model; the hub serves GPT-2 models")
    for param in model.parameters():
        param.requires_grad_(False)
    fingerprint = backbone_fingerprint(model, source)
    num_parameters = sum(p.numel() for p in model.parameters())
    model.to(device=torch_device, dtype=dtype or default_dtype(torch_device))  # type: ignore[call-arg]
    model.eval()
    return Backbone(model, tokenizer, source, torch_device, next(model.parameters()).dtype, fingerprint,
                    num_parameters)


def weights_sha256(model: torch.nn.Module) -> str:
    """Hash of every weight tensor (name, shape, fp32 bytes), so a format or dtype change keeps the hash."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name == "lm_head.weight":  # tied to wte
            continue
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def backbone_fingerprint(model: GPT2LMHeadModel, source: str) -> dict:
    """What an adapter needs of its backbone: architecture, vocabulary size and the exact weights."""
    config = model.config
    return {
        "model_type": config.model_type,
        "n_layer": config.n_layer,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "vocab_size": config.vocab_size,
        "weights_sha256": weights_sha256(model),
        "source": str(Path(source).resolve()) if Path(source).exists() else source,
    }
