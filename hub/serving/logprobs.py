"""Token log-probabilities, as a plain forward pass of a row's own model gives them.

A row's distribution is over the base vocabulary and its own adapter's task tokens (the other adapters' rows of
the shared token table are not part of its model); temperature, top-k/p, penalties and the serving rules for task
tokens change the token choice, never these numbers. Generated tokens get theirs from the step's `[B, V]` logits;
prompt tokens (`echo`) from the prefill, whose forward keeps every position's logits only for the rows that ask
(`hub.serving.batch`). Only rows that ask cost anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hub.serving.sequence import Sequence


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the row's `top` alternatives (id, log-probability), best first. Ids of
    the adapter's own task tokens are numbered from the base vocabulary on in the task's order (the numbering of
    a plain model of the adapter), whatever rows of the shared table they sit in."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenText:
    """A `TokenLogprob` as clients see it: token strings (a task token by its name) and its UTF-8 bytes."""

    token: str
    logprob: float | None  # None: a prompt's first token
    top: tuple[tuple[str, float], ...] = ()

    @property
    def bytes(self) -> list[int]:
        return list(self.token.encode("utf-8"))


def own_task_rows(seq: Sequence) -> range:
    """The ids of the row's own task tokens in the shared table (empty for the plain base model)."""
    adapter = seq.adapter
    if adapter is None or not seq.bound:
        return range(0)
    first = min(adapter.encoder.token_ids.values()) + adapter.row_offset
    return range(first, first + len(adapter.task.special_tokens))


def row_log_probs(logits: torch.Tensor, seq: Sequence, base_vocab: int) -> torch.Tensor:
    """Log-softmax of `logits` [..., V] over the base vocabulary and the row's own task tokens."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[:base_vocab] = True
    own = own_task_rows(seq)
    keep[own.start:own.stop] = True
    return logits.float().masked_fill(~keep, float("-inf")).log_softmax(-1)


def relative_id(seq: Sequence, token: int, base_vocab: int) -> int:
    """A served id with the row's own task tokens numbered from `base_vocab` on (see `TokenLogprob`)."""
    return token if token < base_vocab else base_vocab + token - own_task_rows(seq).start


def entries(log_probs: torch.Tensor, chosen: list[int], top: int, seq: Sequence, base_vocab: int) -> list[TokenLogprob]:
    """The chosen tokens' entries from their positions' log-probabilities `log_probs` [T, V]."""
    picked = log_probs.gather(1, torch.tensor(chosen, device=log_probs.device)[:, None])[:, 0].tolist()
    def relative(token: int) -> int:
        return relative_id(seq, token, base_vocab)

    if top:
        values, ids = log_probs.topk(top, dim=-1)
        tops = [tuple((relative(i), v) for i, v in zip(row_ids, row_values))
                for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(relative(token), value, alternatives)
            for token, value, alternatives in zip(chosen, picked, tops)]


def record_generated(logits: torch.Tensor, rows: list[Sequence], tokens: list[int], base_vocab: int) -> None:
    """Append each asking row's chosen token (not its EOS, which is not part of the output) to its logprobs."""
    for i, (seq, token) in enumerate(zip(rows, tokens)):
        top = seq.params.logprobs
        if top is not None and token != seq.eos_id:
            seq.logprobs += entries(row_log_probs(logits[i:i + 1], seq, base_vocab), [token], top, seq, base_vocab)


def record_prompt(logits: torch.Tensor, rows: list[Sequence], done: int, width: int, base_vocab: int) -> None:
    """Prompt entries from a prefill chunk's logits [B, C, V] covering columns `done` to `done + C` of prompts
    left-padded to `width`. The logits at column c score the token at c + 1; a prompt's first token has none."""
    for i, seq in enumerate(rows):
        top = seq.params.prompt_logprobs
        if top is None:
            continue
        start = width - len(seq.prompt_ids) - len(seq.output_ids)  # the row's first column
        if done <= start:
            seq.prompt_logprobs = [None]
        first, last = max(done, start), min(done + logits.shape[1], start + len(seq.prompt_ids) - 1)
        if first < last:
            targets = seq.prompt_ids[first + 1 - start:last + 1 - start]
            log_probs = row_log_probs(logits[i, first - done:last - done], seq, base_vocab)
            seq.prompt_logprobs += entries(log_probs, targets, top, seq, base_vocab)


def tokenizer_of(seq: Sequence) -> Any:
    if seq.detokenizer is None:
        raise ValueError("a sequence made outside the engine has no tokenizer")
    return seq.detokenizer.tokenizer


def token_text(seq: Sequence, token: int) -> str:
    """The text of one token as numbered in a `TokenLogprob` (a task token by its name)."""
    tokenizer = tokenizer_of(seq)
    if token < len(tokenizer):
        return tokenizer.decode([token], clean_up_tokenization_spaces=False)
    names = seq.adapter.task.special_tokens if seq.adapter is not None else ()
    index = token - len(tokenizer)
    return names[index] if index < len(names) else f"<token {token}>"


def rendered(seq: Sequence, entry: TokenLogprob) -> TokenText:
    """An entry with token strings; as vLLM, the chosen token is always among the alternatives."""
    top = tuple((token_text(seq, i), v) for i, v in entry.top)
    if all(i != entry.id for i, _ in entry.top):
        top += ((token_text(seq, entry.id), entry.logprob),)
    return TokenText(token_text(seq, entry.id), entry.logprob, top)


def rendered_logprobs(seq: Sequence) -> dict:
    """The `RequestResult` fields of a sequence's log-probabilities (none when it asked for none). The prompt's
    first token has no log-probability (None), as in OpenAI's `echo`."""
    fields: dict = {}
    if seq.params.logprobs is not None:
        fields["logprobs"] = [rendered(seq, e) for e in seq.logprobs]
    if seq.params.prompt_logprobs is not None and seq.prompt_logprobs:
        first = relative_id(seq, seq.prompt_ids[0], len(tokenizer_of(seq)))
        fields["prompt_logprobs"] = [TokenText(token_text(seq, first), None)] + [
            rendered(seq, e) for e in seq.prompt_logprobs[1:] if e is not None]
    return fields
