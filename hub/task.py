"""What every task is to the core: special tokens, defaults, data reading and the VLM input layout.

A task lays an example out as segments, each opened by one of its special tokens, which also types the
segment (`token_type_ids`, embedded with the same rows, as in VLM). The last prompt segment's marker opens the
target; the target ends with the task's EOS. Only target tokens and the EOS are labelled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from hub.errors import HubError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TaskDefaults:
    """VLM's recipe for a task type (bottleneck, lr, epochs, batch = batch_size × grad_accum)."""

    bottleneck: int
    lr: float
    epochs: int
    batch_size: int
    grad_accum: int
    max_length: int = 512
    max_target_length: int = 128
    max_new_tokens: int = 64


@dataclass(frozen=True)
class Segment:
    """A special token followed by text.

    `max_tokens` caps the text's tokens before anything else (e.g. a document at 400 BPE). When the prompt is
    still too long, `truncatable` segments are cut, in order, each down to one token at most, until it fits;
    `keep_end` cuts a segment from its front (keeps its most recent tokens) instead of its end."""

    marker: str
    text: str = ""
    truncatable: bool = False
    max_tokens: int | None = None
    keep_end: bool = False


def turn_segments(utterances: list[str], window: int, markers: tuple[str, str], **options: Any) -> list[Segment]:
    """The last `window` utterances of a conversation, each opened by its speaker's marker. Speakers alternate
    backwards from the last utterance, which gets `markers[0]` (VLM: the reply's speaker is the other one)."""
    recent = utterances[-window:] if window > 0 else []
    return [Segment(markers[(len(recent) - 1 - i) % 2], text, **options) for i, text in enumerate(recent)]


@dataclass
class Example:
    source: Any
    target: str | None = None


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int]
    labels: list[int]


class Task(ABC):
    """A task type. Subclasses set the class attributes and lay out their examples."""

    type_name: ClassVar[str]
    special_tokens: ClassVar[tuple[str, ...]]  # the first is BOS, the second EOS
    defaults: ClassVar[TaskDefaults]
    description: ClassVar[str]
    metric: ClassVar[str]  # the `hub.evaluation.metrics` module that scores it (references: `Example.target`)
    # Whether serving may cut a too-long input as training does (the task defines how, e.g. summarize's 400-token
    # article); else a request whose input does not fit is refused with the limit.
    truncates_input: ClassVar[bool] = False
    # Tasks of one layout family lay out their prompts alike (segments in the same roles), so a request may compose
    # their adapters (`hub.serving.composition`); None: the task type alone.
    family: ClassVar[str | None] = None

    def __init__(self, **config: Any):
        if config:
            raise HubError(f"task {self.type_name!r} takes no options, got {sorted(config)}")

    def config(self) -> dict:
        """Options that shape the layout; stored with the adapter so serving lays out inputs the same way."""
        return {}

    @property
    def layout_family(self) -> str:
        return self.family or self.type_name

    @property
    def bos(self) -> str:
        return self.special_tokens[0]

    @property
    def eos(self) -> str:
        return self.special_tokens[1]

    @abstractmethod
    def load_examples(self, data: str, split: str) -> list[Example]:
        """Read a split (train/validation/test) from an HF dataset id or a local file or folder."""

    @abstractmethod
    def prompt_segments(self, source: Any) -> list[Segment]:
        """Segments after BOS; the last one's marker opens the target."""

    def fit_to_targets(self, target_lengths: list[int]) -> None:
        """Called by the trainer with the training targets' token counts (EOS included); a task whose outputs
        vary in length may derive its generation defaults from them (text2text does). Its `config()` then
        records them, so serving and `hub eval` use the same defaults."""

    def parse_input(self, value: Any) -> Any:
        """Turn a request's `input` (text or JSON) into a source; text by default."""
        if not isinstance(value, str) or not value.strip():
            raise HubError(f"task type {self.type_name!r} expects 'input' to be a non-empty string")
        return value

    def parse_chat(self, messages: list[dict]) -> Any:
        """Turn chat messages into a source; by default the last user message is the input.
        Dialogue tasks override this to keep the persona and history."""
        user = [m["content"] for m in messages if m.get("role") == "user"]
        if not user:
            raise HubError("chat messages need at least one message with role 'user'")
        return self.parse_input(user[-1])


def _cut(ids: list[int], keep: int | None, keep_end: bool) -> list[int]:
    if keep is None or len(ids) <= keep:
        return ids
    return ids[len(ids) - keep :] if keep_end else ids[:keep]


class ConversationTask(Task):
    """A task whose prompt holds the last `2·max_history + 1` turns of a conversation (`turn_segments`)."""

    default_max_history: ClassVar[int]

    def __init__(self, max_history: int | None = None, **config: Any):
        super().__init__(**config)
        max_history = self.default_max_history if max_history is None else max_history
        if not isinstance(max_history, int) or max_history < 0:
            raise HubError(f"max_history must be a whole number >= 0, got {max_history!r}")
        self.max_history = max_history

    def config(self) -> dict:
        return {"max_history": self.max_history}

    @property
    def history_window(self) -> int:
        return 2 * self.max_history + 1


def collate(batch: list[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right padding and no attention mask, as in VLM: pads only follow the sequence and are not labelled."""

    def pad(values: list[list[int]], fill: int) -> torch.Tensor:
        return pad_sequence([torch.tensor(v) for v in values], batch_first=True, padding_value=fill).to(device)

    return {
        "input_ids": pad([e.input_ids for e in batch], pad_id),
        "token_type_ids": pad([e.token_type_ids for e in batch], pad_id),
        "labels": pad([e.labels for e in batch], IGNORE_INDEX),
    }


TaskFactory = Callable[..., "Task"]
"""`make_task(type_name, config=None) -> Task`: how the library gets a task; the `tasks` package supplies it
(`tasks.make_task`) and the caller passes it in, so nothing in `hub` imports `tasks`."""


class TaskCodec:
    """Turns a task's segments into ids, given where its special tokens sit in the embedding table."""

    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, first_token_id: int, max_length: int):
        self.task = task
        self.tokenizer = tokenizer
        self.token_ids = {tok: first_token_id + i for i, tok in enumerate(task.special_tokens)}
        self.max_length = max_length

    @property
    def eos_id(self) -> int:
        return self.token_ids[self.task.eos]

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(" " + text.strip()) if text.strip() else []

    def _marker_id(self, marker: str) -> int:
        if marker not in self.token_ids:
            raise HubError(f"task {self.task.type_name!r} has no special token {marker!r}")
        return self.token_ids[marker]

    def encode_prompt(self, source: Any, reserve: int = 0) -> tuple[list[int], list[int]]:
        """Prompt ids and types, ending with the target marker; `reserve` positions are kept free."""
        ids, types, _ = self.encode_request(source, reserve, refuse_cuts=False)
        return ids, types

    def encode_request(self, source: Any, reserve: int, refuse_cuts: bool) -> tuple[list[int], list[int], int]:
        """`encode_prompt` plus the number of input tokens cut to fit; with `refuse_cuts`, an input that would be
        cut is a HubError that states the limit instead (serving never answers a silently shortened input)."""
        segments = self.task.prompt_segments(source)
        full = [(self._marker_id(s.marker), self._text_ids(s.text), s) for s in segments]
        pieces = [(marker, _cut(text, s.max_tokens, s.keep_end), s) for marker, text, s in full]
        total = 1 + sum(1 + len(text) for _, text, _ in full)
        over = total + reserve - self.max_length
        if refuse_cuts and (over > 0 or any(len(a[1]) != len(b[1]) for a, b in zip(pieces, full))):
            raise HubError(
                f"input is too long: prompt ({total} tokens) and answer ({reserve} tokens) are over the limit of "
                f"{self.max_length} tokens{self._caps_note(segments)}; shorten the input or lower max_new_tokens"
            )
        cut_total = 1 + sum(1 + len(text) for _, text, _ in pieces)
        if cut_total + reserve > self.max_length:
            pieces = self._truncate(pieces, cut_total + reserve - self.max_length)
        bos = self.token_ids[self.task.bos]
        ids, types = [bos], [bos]
        for marker, text, _ in pieces:
            ids += [marker] + text
            types += [marker] * (1 + len(text))
        return ids, types, total - len(ids)

    @staticmethod
    def _caps_note(segments: list[Segment]) -> str:
        caps = sorted({s.max_tokens for s in segments if s.max_tokens})
        return f" (and each input part in {'/'.join(map(str, caps))} tokens)" if caps else ""

    def _truncate(self, pieces: list, over: int) -> list:
        """Cut truncatable segments in order, each to one token at most, until `over` tokens are gone."""
        pieces, needed = list(pieces), over
        for i, (marker, text, segment) in enumerate(pieces):
            if needed > 0 and segment.truncatable and len(text) > 1:
                cut = min(needed, len(text) - 1)
                pieces[i] = (marker, _cut(text, len(text) - cut, segment.keep_end), segment)
                needed -= cut
        if needed > 0:
            raise HubError(
                f"input is too long: it needs {over} more tokens than the limit of {self.max_length} "
                f"(prompt and answer together)"
            )
        return pieces

    def encode_example(self, example: Example, max_target: int | None = None) -> Encoded:
        """Prompt + target + EOS for training; only the target and EOS are labelled."""
        target = self._text_ids(example.target or "")
        if max_target is not None:
            target = target[:max_target]
        target.append(self.eos_id)
        ids, types = self.encode_prompt(example.source, reserve=len(target))
        return Encoded(
            input_ids=ids + target,
            token_type_ids=types + [types[-1]] * len(target),
            labels=[IGNORE_INDEX] * len(ids) + target,
        )
