"""AdapterHub interop: a stored hub adapter in a plain `transformers` GPT-2 with the `adapters` library.

The store keeps each version in AdapterHub's own format (`adapter_config.json`, `adapter.safetensors`), but a
hub task is more than the adapter: its k special tokens are extra embedding rows (`task_tokens.safetensors`),
its prompt is laid out in segments typed by those tokens (`token_type_ids`), and generation may only choose the
task's EOS among the added tokens. `load_into_adapters` does all of it in one call; the layout is also written
into each version's metadata (`layout`, by `prompt_layout`) for readers without the hub.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence, cast

import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, LogitsProcessorList, PreTrainedTokenizerBase

from hub.errors import HubError, IntegrityError
from hub.model.backbone import weights_sha256
from hub.store.fingerprint import check_backbone
from hub.store.format import AdapterMeta
from hub.store.layout import ADAPTER_META, HUB_JSON, PAYLOAD_FILES, TASK_TOKENS, payload_files
from hub.store.refs import Ref
from hub.task import Task, TaskCodec, TaskFactory

EXPORT_README = "README.md"


@contextmanager
def quiet_adapter_activation() -> Iterator[None]:
    """`adapters` resets its adapters before activating them and, in that internal pass, warns "There are adapters
    available but none are activated for the forward pass."; silence that logger while activating."""
    logger = logging.getLogger("adapters.model_mixin")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def prompt_layout(task: Task, example_source: Any) -> dict:
    """How a prompt is built, for the version's metadata: enough to rebuild ids and token types without the hub."""
    segments = task.prompt_segments(example_source)
    return {
        "special_token_ids": "special token i has id vocab_size + i (row i of task_tokens.safetensors); "
                             "the input and tied output embeddings both get these rows",
        "prompt": [task.bos] + [f"{s.marker} {{text}}" if s.text else s.marker for s in segments],
        "text_encoding": "each segment's text is tokenized as ' ' + text.strip(); an empty text adds no tokens",
        "token_types": "every token is typed by the special token that opens its segment (BOS by itself); "
                       "generated tokens are typed by the last prompt marker",
        "target_marker": segments[-1].marker if segments else task.bos,  # the BOS alone for an unconditional task
        "eos_token": task.eos,
        "generation": "among the added ids only the EOS may be generated, and not as the first token",
        "example": {"source": example_source, "segments": [[s.marker, s.text] for s in segments]},
    }


def read_version_meta(path: Path) -> AdapterMeta:
    """`hub.json` of a store version or an `hub export` folder, else a run export's `adapter_meta.json`."""
    for filename, stored in ((HUB_JSON, True), (ADAPTER_META, False)):
        if (path / filename).is_file():
            try:
                data = json.loads((path / filename).read_text(encoding="utf-8"))
            except ValueError as err:
                raise IntegrityError(f"{path / filename} is not readable JSON: {err}") from None
            return AdapterMeta.from_dict(data, str(path / filename), stored=stored)
    raise HubError(f"'{path}' is not a hub adapter folder: it has neither {HUB_JSON} nor {ADAPTER_META}")


def _adapterhub_meta(path: Path) -> AdapterMeta:
    """`read_version_meta`, refusing kinds whose bundle is no AdapterHub adapter (a sentence VAE)."""
    meta = read_version_meta(path)
    if payload_files(meta) != PAYLOAD_FILES:
        raise HubError(f"'{path}' holds a {meta.adapter_kind} adapter ({', '.join(payload_files(meta))}), not an "
                       f"AdapterHub adapter; only VLM adapters load into plain transformers + adapters")
    return meta


class AdaptersModel(Protocol):
    """The methods `adapters.init` mixes into a model (`adapters.ModelAdaptersMixin`), as this module calls them:
    `adapters` ships no type information, and transformers' stubs type `load_adapter` as PEFT's."""

    def load_adapter(self, adapter_name_or_path: str, *, load_as: str | None = None, set_active: bool = False,
                     use_safetensors: bool = False) -> str: ...

    def set_active_adapters(self, adapter_setup: Any) -> None: ...


def _input_embeddings(model: GPT2LMHeadModel) -> torch.nn.Embedding:
    """GPT-2's token embedding (`wte`), which transformers types as any module."""
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, torch.nn.Embedding):
        raise HubError(f"expected a plain GPT-2 whose input embeddings are an nn.Embedding, got "
                       f"{type(embeddings).__name__}")
    return embeddings


@dataclass
class AdapterHubTask:
    """A hub task inside a plain `GPT2LMHeadModel` with `adapters`: encode its inputs and decode greedily."""

    model: GPT2LMHeadModel
    codec: TaskCodec
    adapter_name: str
    base_vocab: int  # GPT-2's own vocabulary; ids from here on are task tokens

    @property
    def task(self) -> Task:
        return self.codec.task

    def encode(self, source: Any, max_new_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """`input_ids` and `token_type_ids`, [1, T], leaving room for `max_new_tokens` in the context."""
        reserve = max_new_tokens or self.task.defaults.max_new_tokens
        ids, types = self.codec.encode_prompt(self.task.parse_input(source), reserve=reserve)
        device = self.model.device
        return {"input_ids": torch.tensor([ids], device=device), "token_type_ids": torch.tensor([types], device=device)}

    @torch.inference_mode()
    def generate_ids(self, source: Any, max_new_tokens: int | None = None) -> list[int]:
        """Greedy output ids without the EOS, with the hub's rule for the added tokens."""
        from hub.evaluation.decode import TaskTokenMask, cut_at_eos

        max_new_tokens = max_new_tokens or self.task.defaults.max_new_tokens
        inputs = self.encode(source, max_new_tokens)
        width = inputs["input_ids"].shape[1]
        self.model.eval()
        generated = self.model.generate(
            input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"],
            attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=self.codec.eos_id, pad_token_id=self.codec.eos_id,
            logits_processor=LogitsProcessorList([TaskTokenMask(self.base_vocab, self.codec.eos_id, width)]),
        )
        return cut_at_eos(generated[0, width:].tolist(), self.codec.eos_id)

    def generate(self, source: Any, max_new_tokens: int | None = None) -> str:
        return self.codec.tokenizer.decode(self.generate_ids(source, max_new_tokens)).strip()


def _check_backbone(model: GPT2LMHeadModel, needed: Mapping[str, Any]) -> None:
    """The architecture always; the vocabulary and the weights' sha256 while the model is still plain GPT-2 (no
    rows added yet)."""
    config = model.config
    loaded = {"model_type": config.model_type, "n_layer": config.n_layer, "n_embd": config.n_embd,
              "n_head": config.n_head, "source": model.name_or_path}
    vocab_size = model.get_input_embeddings().num_embeddings
    if vocab_size == needed.get("vocab_size"):
        loaded.update(vocab_size=vocab_size, weights_sha256=weights_sha256(model))
    check_backbone(needed, loaded, "the adapter", keys=loaded.keys())


def load_into_adapters(model: GPT2LMHeadModel, path: str | Path,
                       tokenizer: PreTrainedTokenizerBase | None = None,
                       make_task: TaskFactory | None = None) -> AdapterHubTask:
    """Load a store version (or `hub export --format adapterhub` folder) into a plain GPT-2: the adapter through
    `adapters.load_adapter` (made active), the task rows appended to the (tied) embeddings, and the prompt
    layout; greedy decoding with the returned task gives the hub's tokens. The tokenizer defaults to the
    model's own (`AutoTokenizer.from_pretrained(model.name_or_path)`)."""
    import adapters

    if make_task is None:  # a user outside the hub: the task types this install ships
        from tasks import make_task as shipped_tasks

        make_task = shipped_tasks

    path = Path(path)
    meta = _adapterhub_meta(path)
    _check_backbone(model, meta.backbone)
    if not hasattr(model, "adapters_config"):
        adapters.init(model)
    with quiet_adapter_activation():
        name = cast(AdaptersModel, model).load_adapter(str(path), set_active=True, use_safetensors=True)
    rows = load_file(path / TASK_TOKENS)["rows"]
    first_id = _input_embeddings(model).num_embeddings
    model.resize_token_embeddings(first_id + rows.shape[0], mean_resizing=False)
    with torch.no_grad():
        embeddings = _input_embeddings(model)  # resizing replaced the module
        embeddings.weight[first_id:] = rows.to(embeddings.weight)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    task = make_task(meta.task_type, dict(meta.task_config))
    codec = TaskCodec(task, tokenizer, first_id, model.config.n_positions)
    return AdapterHubTask(model, codec, name, meta.backbone["vocab_size"])


def load_composition(model: GPT2LMHeadModel, block: str, paths: Sequence[str | Path], weights: Sequence[float],
                     layout: int = 0, tokenizer: PreTrainedTokenizerBase | None = None,
                     make_task: TaskFactory | None = None) -> AdapterHubTask:
    """A hub composition in a plain GPT-2 with `adapters`: every version loaded under its own name, the `layout`
    version's task rows and prompt layout (`load_into_adapters`), and AdapterHub's `Average(*names,
    weights=weights)` or `Stack(*names)` made active; greedy decoding gives the hub's tokens for the same
    composition (`hub.serving.composition`)."""
    from adapters.composition import Average, Stack

    task = load_into_adapters(model, paths[layout], tokenizer, make_task)
    with_adapters = cast(AdaptersModel, model)  # `load_into_adapters` ran `adapters.init` on it
    names = []
    for i, path in enumerate(paths):
        if i == layout:
            names.append(task.adapter_name)
            continue
        meta = _adapterhub_meta(Path(path))
        _check_backbone(model, meta.backbone)
        with quiet_adapter_activation():
            names.append(with_adapters.load_adapter(str(path), load_as=f"{meta.name}#{i}", use_safetensors=True))
    setup = Average(*names, weights=list(weights)) if block == "average" else Stack(*names)
    with quiet_adapter_activation():
        with_adapters.set_active_adapters(setup)
    return dataclasses.replace(task, adapter_name=str(setup))


def export_adapterhub(version_dir: Path, out: Path) -> Path:
    """A self-contained folder for plain `adapters`: the payload files, `hub.json` and a README with the call."""
    _adapterhub_meta(version_dir)
    if out.exists() and any(out.iterdir()):
        raise HubError(f"{out} exists and is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for filename in (*PAYLOAD_FILES, HUB_JSON):
        shutil.copyfile(version_dir / filename, out / filename)
    meta = read_version_meta(out)
    (out / EXPORT_README).write_text(
        f"# {Ref(meta.name, meta.version)}: a {meta.task_type} adapter of the GPT-2 adapter hub\n\n"
        f"Trained on `{meta.backbone.get('source', '?')}`. Load it into a plain transformers + adapters GPT-2:\n\n"
        "```python\nfrom transformers import GPT2LMHeadModel\nfrom hub.interop import load_into_adapters\n\n"
        "model = GPT2LMHeadModel.from_pretrained(BASE)  # the backbone above\n"
        "task = load_into_adapters(model, THIS_FOLDER)\nprint(task.generate(INPUT))  # greedy, as the hub\n```\n\n"
        "Without the hub: `model.load_adapter(THIS_FOLDER, use_safetensors=True)`, append the rows of "
        "`task_tokens.safetensors` to the embeddings (`resize_token_embeddings`), and build `input_ids` and "
        "`token_type_ids` as `layout` in `hub.json` says.\n",
        encoding="utf-8")
    return out
