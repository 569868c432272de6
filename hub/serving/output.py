"""Output processing, apart from the KV cache and the forward (vLLM v1's output processor is the model): the
token choice for a whole batch, detokenization, stop strings, length limits and finish reasons.

Sampling runs over the batch's `[B, V]` logits at once (temperature, top-k and top-p as tensor operations);
only the final draw is per row, with the row's own generator, so a seeded request gives the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

import time

import torch

from hub.model.task_tokens import mask_task_logits
from hub.serving.logprobs import record_generated
from hub.serving.penalties import apply_penalties
from hub.serving.sampling import SamplingParams
from hub.serving.sequence import Sequence


def filtered_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k and nucleus (top-p) applied to each row of `logits` [B, V] (float64; removed tokens
    -inf). Each row's best token sits at 0 before dividing, so any temperature > 0 stays finite."""
    logits = logits.double()
    temperature = logits.new_tensor([p.temperature for p in params])[:, None]
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    vocab = logits.shape[-1]
    top_k = [min(p.top_k, vocab) if p.top_k else vocab for p in params]
    if min(top_k) < vocab:
        ranked = logits.topk(max(top_k), dim=-1).values
        kth = ranked.gather(1, torch.tensor(top_k)[:, None] - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = logits.new_tensor([p.top_p for p in params])[:, None]
    if bool((top_p < 1.0).any()):
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        outside = (probs.cumsum(-1) - probs > top_p) & (top_p < 1.0)  # keep the smallest set reaching top_p
        logits = logits.scatter(1, order, ordered.masked_fill(outside, float("-inf")))
    return logits


def choose_tokens(logits: torch.Tensor, rows: list[Sequence]) -> list[int]:
    """The next token of every row: argmax for greedy rows, a draw with the row's generator for the others."""
    tokens = logits.argmax(-1).tolist()
    sampled = [i for i, s in enumerate(rows) if s.params.temperature > 0]
    if sampled:
        probs = filtered_logits(logits[sampled].cpu(), [rows[i].params for i in sampled]).softmax(-1)
        for row_probs, i in zip(probs, sampled):
            tokens[i] = int(torch.multinomial(row_probs, 1, generator=rows[i].generator))
    return tokens


class OutputProcessor:
    """Turns each step's logits into tokens, text and finish reasons for the rows that produced them."""

    def __init__(self, base_vocab: int, context: int):
        self.base_vocab = base_vocab
        self.context = context

    def advance(self, logits: torch.Tensor, rows: list[Sequence]) -> None:
        """Choose each row's next token from its last-position logits [B, V] (after its penalties), record its
        log-probability where asked, then update the row. A row that asks for no tokens (`max_new_tokens` 0: a
        scored prompt) ends here."""
        scored = [s for s in rows if s.params.max_new_tokens == 0]
        for sequence in scored:
            sequence.finish_reason = "length"
            sequence.notify()
        if scored:
            keep = [i for i, s in enumerate(rows) if s.params.max_new_tokens > 0]
            logits, rows = logits[keep], [rows[i] for i in keep]
        if not rows:
            return
        masked = apply_penalties(self._mask_task_tokens(logits, rows), rows, self.base_vocab)
        tokens = choose_tokens(masked, rows)
        record_generated(logits, rows, tokens, self.base_vocab)
        now = time.monotonic()
        for sequence, token in zip(rows, tokens):
            sequence.first_token_at = sequence.first_token_at or now
            self._append(sequence, token)

    def _mask_task_tokens(self, logits: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
        """Only a row's own EOS may be chosen among the task tokens, not as the first token (VLM rule), not
        before `min_tokens` and never with `ignore_eos`."""
        eos = torch.tensor([s.eos_id for s in rows], device=logits.device)[:, None]
        allowed = torch.tensor([not s.params.ignore_eos and len(s.output_ids) >= max(1, s.params.min_tokens)
                                for s in rows], device=logits.device)[:, None]
        return mask_task_logits(logits, self.base_vocab, eos, allowed)

    def _append(self, seq: Sequence, token: int) -> None:
        detokenizer = seq.detokenizer
        if detokenizer is None:
            raise ValueError("a sequence made outside the engine has no detokenizer")
        if token == seq.eos_id:
            seq.finish_reason = "stop"
        else:
            seq.output_ids.append(token)
            seq.text = visible(seq, detokenizer.extend(seq.output_ids))
            if cut_at_stop(seq):
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_new_tokens:
                seq.finish_reason = "length"
            elif len(seq.prompt_ids) + len(seq.output_ids) >= self.context:
                seq.finish_reason = "length"
        if seq.cancelled and not seq.finished:
            seq.finish_reason = "cancelled"
        if seq.finished:  # the exact text, with a last character the incremental text may hold back
            seq.text = visible(seq, detokenizer.final(seq.output_ids))
            cut_at_stop(seq)
        seq.notify()


def visible(seq: Sequence, text: str) -> str:
    """A task's target follows its marker after a layout space, which is not part of the answer."""
    return text.lstrip() if seq.adapter is not None else text


def cut_at_stop(seq: Sequence) -> bool:
    """Cut the text before the first stop string that appears after `min_tokens` tokens (as vLLM: text before
    that point is never searched); True if one was found. Only the new tail is searched."""
    stops = seq.params.stop
    if not stops:
        return False
    if not seq.params.may_stop(len(seq.output_ids)):
        seq.stop_scan = len(seq.text)
        return False
    cut = min((i for i in (seq.text.find(s, seq.stop_scan) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        seq.text = seq.text[:cut]
        return True
    seq.stop_scan = max(seq.stop_scan, len(seq.text) - max(map(len, stops)) + 1)
    return False
