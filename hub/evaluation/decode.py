"""Evaluating a task model on a data split: batched decoding with HF `generate()`, the task's metric, reports.

What is evaluated is a `TaskModel`: an HF causal LM plus the codec that lays out the task's inputs. A store
adapter or a run's `best/` export is put on the serving `Engine` and decoded on the engine's own model with the
adapter's slot active for the whole batch (its `[1, L, ...]` rows broadcast over rows and beams), so greedy
output equals `decode_to_completion` (the serving path). Full fine-tuning and LoRA runs
(`hub.training.baselines`) are decoded by the same code.

One output is generated per unique source, in first-occurrence order, scored against all of that source's
references (E2E: several references per MR, `hub.evaluation.metrics.group_by_mr`).
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, cast

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from hub.errors import HubError
from hub.model.backbone import Backbone, load_backbone, resolve_base
from hub.serving.batch import left_pad
from hub.serving.engine import Engine
from hub.evaluation.metrics import group_by_mr, load_metric
from hub.store.export import export_dir, read_export
from hub.store.fingerprint import check_backbone
from hub.store.layout import TASK_TOKENS
from hub.store.protocol import Store
from hub.store.versions import LoadedAdapter
from hub.task import Example, Task, TaskCodec, TaskFactory
from hub.model.task_tokens import ExtendedLMHead, mask_task_logits
from hub.plots import metrics_bar_png

@dataclass(frozen=True)
class Decoding:
    """How outputs are decoded: greedy (`num_beams` 1, VLM's decoder) or beam search."""

    max_new_tokens: int
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    batch_size: int = 16

    def describe(self) -> str:
        parts = [f"beam {self.num_beams}, length penalty {self.length_penalty:g}" if self.num_beams > 1 else "greedy"]
        if self.no_repeat_ngram_size:
            parts.append(f"no-repeat-ngram {self.no_repeat_ngram_size}")
        return ", ".join(parts + [f"at most {self.max_new_tokens} new tokens"])


@dataclass
class TaskModel:
    """An HF causal LM that decodes one task; ids from `base_vocab` on are task tokens (this task's and, on the
    engine, the table's other rows).

    `activate()` is entered around every `generate()` call (the engine path selects the adapter's slot there);
    `store_ref` is set when the model is a store adapter, whose metadata then receives the metrics.
    """

    model: PreTrainedModel
    codec: TaskCodec
    base_vocab: int
    label: str
    activate: Callable[[], AbstractContextManager] = nullcontext
    store_ref: str | None = None

    @property
    def task(self) -> Task:
        return self.codec.task

    @property
    def pad_id(self) -> int:
        """Any valid id: finished rows are padded with it and the EOS cut removes it."""
        return self.codec.tokenizer.eos_token_id or 0


class TaskTokenMask(LogitsProcessor):
    """Among the added tokens (ids from `base_vocab` on) only the task's EOS may be chosen, and not first.

    The serving engine's rule (spec §5, §8): VLM masks every added token but the task's EOS; at step 0 the EOS
    is masked as well (instead of VLM's re-sampling quirk). `prompt_width` is the padded prompt length.
    """

    def __init__(self, base_vocab: int, eos_id: int, prompt_width: int):
        self.base_vocab, self.eos_id, self.prompt_width = base_vocab, eos_id, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = scores.shape[0]
        eos = torch.full((rows, 1), self.eos_id, device=scores.device)
        allowed = torch.full((rows, 1), input_ids.shape[1] > self.prompt_width, device=scores.device)
        # transformers' `LogitsProcessor` hints name `FloatTensor` for scores of any float dtype
        return cast(torch.FloatTensor, mask_task_logits(scores, self.base_vocab, eos, allowed))


@contextmanager
def head_sized_vocab(model: PreTrainedModel) -> Iterator[None]:
    """HF beam search reshapes scores by `config.vocab_size`; with task rows in an `ExtendedLMHead` the logits
    are wider than GPT-2's vocabulary, so the config says so for the duration of `generate()`."""
    head, saved = model.get_output_embeddings(), model.config.vocab_size
    if isinstance(head, ExtendedLMHead):
        model.config.vocab_size = head.embedding.base_vocab + head.embedding.extra.shape[0]
    try:
        yield
    finally:
        model.config.vocab_size = saved


def cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


@torch.inference_mode()
def generate_ids(task_model: TaskModel, sources: list[Any], decoding: Decoding,
                 progress: bool = True) -> list[list[int]]:
    """Generated token ids per source (without the EOS), in batches of `decoding.batch_size`."""
    codec, model = task_model.codec, task_model.model
    if not isinstance(model, GenerationMixin):
        raise HubError(f"{task_model.label}: a {type(model).__name__} cannot generate (not an HF causal LM)")
    device = next(model.parameters()).device
    outputs: list[list[int]] = []
    model.eval()
    with tqdm(total=len(sources), desc=f"decode {task_model.label}", unit="input", disable=not progress) as bar:
        for start in range(0, len(sources), decoding.batch_size):
            batch = sources[start : start + decoding.batch_size]
            inputs = left_pad([codec.encode_prompt(s, reserve=decoding.max_new_tokens) for s in batch], device)
            width = inputs["input_ids"].shape[1]
            mask = TaskTokenMask(task_model.base_vocab, codec.eos_id, width)
            with task_model.activate(), head_sized_vocab(model):
                generated = model.generate(
                    **inputs, max_new_tokens=decoding.max_new_tokens, do_sample=False, num_beams=decoding.num_beams,
                    length_penalty=decoding.length_penalty, no_repeat_ngram_size=decoding.no_repeat_ngram_size,
                    early_stopping=decoding.num_beams > 1, eos_token_id=codec.eos_id, pad_token_id=task_model.pad_id,
                    logits_processor=LogitsProcessorList([mask]), renormalize_logits=True,
                )
            outputs += [cut_at_eos(row, codec.eos_id) for row in generated[:, width:].tolist()]
            bar.update(len(batch))
    return outputs


def one_line(text: str) -> str:
    """Outputs are written one per line: collapse whitespace (newlines included)."""
    return " ".join(text.split())


# -- data and metrics ---------------------------------------------------------------------------------------

def source_key(source: Any) -> str:
    return source if isinstance(source, str) else json.dumps(source, sort_keys=True)


def unique_sources(examples: list[Example]) -> tuple[list[Any], list[list[str]]]:
    """One entry per unique source in first-occurrence order, with all its references."""
    by_key: dict[str, Any] = {}
    for example in examples:
        by_key.setdefault(source_key(example.source), example.source)
    keys, references = group_by_mr([source_key(e.source) for e in examples], [e.target or "" for e in examples])
    return [by_key[k] for k in keys], references


def score(task: Task, predictions: list[str], references: list[list[str]]) -> tuple[dict, list[str]]:
    """The task's metric; E2E without Java falls back to BLEU and NIST only, with a note."""
    name = task.metric
    options, notes = {}, []
    if name == "e2e" and shutil.which("java") is None:
        options["skip_java"] = True
        notes.append("java is not on PATH: E2E METEOR, ROUGE-L and CIDEr skipped (BLEU and NIST only)")
    scores = load_metric(name).compute(predictions=predictions, references=references, **options)
    return scores, notes


# -- what to evaluate ---------------------------------------------------------------------------------------

def engine_task_model(backbone: Backbone, loaded: LoadedAdapter, label: str, store_ref: str | None,
                      make_task: TaskFactory) -> TaskModel:
    """An adapter on the serving engine; its slot's rows are active (for the whole batch) during `generate()`."""
    engine = Engine(backbone, make_task)
    resident = engine.manager.add_adapter(loaded)
    return TaskModel(backbone.model, resident.codec, backbone.vocab_size, label,
                     activate=lambda: engine.applying_to_all(resident), store_ref=store_ref)


def from_store(store: Store, ref: str, backbone: Backbone, make_task: TaskFactory) -> TaskModel:
    loaded = store.load(ref, backbone.fingerprint)
    return engine_task_model(backbone, loaded, loaded.ref, loaded.ref, make_task)


def from_run(run_dir: Path, base: str | None, device: str, make_task: TaskFactory) -> TaskModel:
    """A run's adapter export, evaluated before it is published."""
    path = export_dir(run_dir)
    export = read_export(path)
    backbone = load_backbone(resolve_base(base, dict(export.meta.backbone)), device)
    check_backbone(export.meta.backbone, backbone.fingerprint, f"run export '{path}'")
    rows = load_file(path / TASK_TOKENS)["rows"]
    loaded = LoadedAdapter(export.trained_name, "run", export.meta, path, export.adapter_tensors, rows)
    return engine_task_model(backbone, loaded, str(run_dir), None, make_task)


# -- the evaluation -----------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    label: str
    task_type: str
    split: str
    metric: str
    scores: dict
    decoding: str
    num_sources: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list, repr=False)
    sources: list[Any] = field(default_factory=list, repr=False)  # the inputs the outputs answer, in order

    def record(self) -> dict:
        """What goes into metrics.json and the store metadata (the outputs are in outputs.txt)."""
        return {k: v for k, v in asdict(self).items() if k not in ("outputs", "sources")}

    def markdown(self) -> str:
        lines = [f"**{self.label}** ({self.task_type}) on `{self.split}`: {self.num_sources} unique inputs, "
                 f"{self.decoding}, metric `{self.metric}`", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in self.scores.items()]
        lines += [f"\nNote: {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def evaluate(task_model: TaskModel, data: str, split: str, decoding: Decoding, limit: int | None = None,
             progress: bool = True) -> EvalResult:
    """Decode every unique source of the split (or the first `limit`) and score the outputs."""
    task = task_model.task
    sources, references = unique_sources(task.load_examples(data, split))
    if limit is not None:
        sources, references = sources[:limit], references[:limit]
    started = time.time()
    ids = generate_ids(task_model, sources, decoding, progress)
    outputs = [one_line(task_model.codec.tokenizer.decode(row)) for row in ids]
    seconds = time.time() - started
    scores, notes = score(task, outputs, references)
    return EvalResult(task_model.label, task.type_name, split, task.metric, scores, decoding.describe(),
                      len(sources), round(seconds, 1), notes, outputs, sources)


def write_result(result: EvalResult, out_dir: Path) -> None:
    """`outputs.txt` (one line per unique source), `metrics.json`, `metrics.md` and a bar chart of the scores,
    `metrics.png`, in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "outputs.txt").write_text("".join(line + "\n" for line in result.outputs), encoding="utf-8")
    (out_dir / "metrics.json").write_text(json.dumps(result.record(), indent=2))
    (out_dir / "metrics.md").write_text(result.markdown())
    title = f"{result.label} ({result.task_type}) on {result.split}"
    (out_dir / "metrics.png").write_bytes(metrics_bar_png(result.scores, title))


def record_in_store(store: Store, ref: str, result: EvalResult) -> None:
    """Merge `{split: {scores..., decoding, num_sources}}` into the adapter's metadata (`hub show` shows it)."""
    entry = {**result.scores, "metric": result.metric, "decoding": result.decoding,
             "num_sources": result.num_sources, "notes": result.notes}
    store.update_metrics(ref, {result.split: entry})
