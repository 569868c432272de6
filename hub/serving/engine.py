"""The generation engine: one frozen GPT-2, its adapters (`AdapterManager`) and what a forward needs of them.

The engine turns requests into `Sequence`s (parsing and tokenizing outside every lock), binds a sequence to
its adapter's slot when it joins a batch, and gives each kind's runtime its plan for a batch. Decoding itself
is `hub.serving.batch.DecodeBatch`, driven by the runner (`hub.serving.scheduler`) in the server and by
`decode_to_completion` in the CLI, evaluation and benchmarks.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch

from hub.adapters.base import KindRuntime, RowState, SlotComposition
from hub.adapters.registry import get_kind
from hub.errors import CapacityError, HubError
from hub.model.backbone import Backbone
from hub.serving.composition import ComposedAdapters
from hub.serving.detokenize import IncrementalText
from hub.serving.manager import AdapterManager
from hub.serving.tiers import ManagerSettings
from hub.serving.sampling import SamplingParams, new_generator
from hub.serving.sequence import ResidentAdapter, Sequence, TokenPrompt
from hub.store.format import is_int
from hub.serving.token_rows import TokenRowTable
from hub.task import Task

__all__ = ["Engine", "ResidentAdapter", "SamplingParams", "Sequence"]


class Engine:
    """Sequences, binding and forward plans over one backbone and its `AdapterManager`. Use as a context
    manager, or call `close`, to take every hook and the task-token table off the model again."""

    def __init__(self, backbone: Backbone, make_task: Callable[[str, dict], Task],
                 settings: ManagerSettings | None = None):
        self.backbone = backbone
        self._plain_heads = (backbone.model.transformer.wte, backbone.model.lm_head)
        self.manager = AdapterManager(backbone, make_task, settings)
        self.no_type_id = backbone.vocab_size + TokenRowTable.ZERO_ROW

    def close(self) -> None:
        """Remove every kind's hooks and restore the model's own embedding and LM head."""
        self.manager.close()
        self.backbone.model.transformer.wte, self.backbone.model.lm_head = self._plain_heads

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sequences ------------------------------------------------------------------------------------------
    def new_sequence(self, adapter: ResidentAdapter | str | None, source, params: SamplingParams,
                     prompt_text: str | None = None, composed: ComposedAdapters | None = None) -> Sequence:
        """Encode a request's prompt for its adapter's task (or raw text for the base model, adapter None). The
        server passes the adapter its request was resolved to; a name is resolved here, once. A `TokenPrompt`
        source is decoded as it is, with no task layout. With `composed`, the row runs every adapter of the
        composition and its `layout` adapter lays out the prompt (`adapter` is then ignored).

        The sequence counts as a user of its adapters from here on; `release` gives them back on every path.
        """
        params.validate()
        if composed is not None:
            adapter = composed.layout
        if isinstance(adapter, str):
            adapter = self.manager.resolve(adapter)
        limit = self.backbone.n_positions
        if params.max_new_tokens >= limit:
            raise HubError(f"max_new_tokens must be below the model's context of {limit} tokens")
        if adapter is None and not isinstance(source, TokenPrompt):
            source = TokenPrompt(tuple(self.backbone.tokenizer.encode(prompt_text or "")))
        if adapter is not None and (refusal := get_kind(adapter.kind).text_input_error):
            raise HubError(f"task {adapter.name!r} takes no text input: {refusal}")
        if isinstance(source, TokenPrompt):
            return self._token_sequence(adapter, list(source.ids), params, composed)
        assert adapter is not None, "text for the base model was tokenized into a TokenPrompt above"
        sequence = self._sequence(adapter, [], None, params, adapter.encoder.eos_id, composed)
        try:
            source = adapter.task.parse_input(source)
            sequence.prompt_ids, sequence.prompt_types, sequence.input_tokens_dropped = \
                adapter.encoder.encode_request(source, params.max_new_tokens,
                                               refuse_cuts=not adapter.task.truncates_input)
        except BaseException:
            self.release(sequence)
            raise
        return sequence

    def _token_sequence(self, adapter: ResidentAdapter | None, ids: list[int], params: SamplingParams,
                        composed: ComposedAdapters | None = None) -> Sequence:
        limit, vocab = self.backbone.n_positions, self.backbone.vocab_size
        if not ids or len(ids) + params.max_new_tokens > limit:
            raise HubError(f"the prompt needs 1 to {limit - params.max_new_tokens} tokens "
                           f"(context {limit} minus max_new_tokens), got {len(ids)}")
        if not all(is_int(i) and 0 <= i < vocab for i in ids):
            raise HubError(f"prompt token ids must be whole numbers from 0 to {vocab - 1}")
        eos = adapter.encoder.eos_id if adapter is not None else self.backbone.tokenizer.eos_token_id or 0
        return self._sequence(adapter, ids, None, params, eos, composed)

    def new_state_sequence(self, adapter: ResidentAdapter, prompt_ids: list[int], eos_id: int,
                           params: SamplingParams, extra: dict[str, torch.Tensor]) -> Sequence:
        """A sequence with a ready prompt whose row carries kind-specific state (`RowState.extra`, e.g. a
        sentence VAE's latent slot): no task layout, the kind decides what the row means."""
        params.validate()
        sequence = self._sequence(adapter, prompt_ids, None, params, eos_id)
        sequence.row.extra = extra
        return sequence

    def _sequence(self, adapter: ResidentAdapter | None, ids, types, params: SamplingParams,
                  eos_id: int, composed: ComposedAdapters | None = None) -> Sequence:
        sequence = Sequence(adapter, ids, types, params, eos_id, generator=new_generator(params),
                            detokenizer=IncrementalText(self.backbone.tokenizer), composed=composed)
        for used in sequence.adapters:
            self.manager.acquire(used)
        return sequence

    def release(self, sequence: Sequence) -> None:
        """The one place a sequence gives its adapters back (finished, cancelled, failed or refused); safe to
        call more than once."""
        if not sequence.adapters or sequence.released:
            return
        with self.manager.lock:
            if sequence.released:
                return
            sequence.released = True
            if sequence.bound:
                self.manager.activate(sequence.adapters, -1)
        for used in sequence.adapters:
            self.manager.release(used)

    def bind(self, sequence: Sequence) -> bool:
        """Make the sequence's adapters resident and shift its task-token ids to its (layout) adapter's rows;
        False (nothing changed) while their weights are not on the CPU or the slots are busy."""
        if sequence.bound:
            return True
        adapter = sequence.adapter
        if adapter is not None:
            with self.manager.lock:
                if not (self.manager.make_resident_all(sequence.adapters) if sequence.composed
                        else self.manager.make_resident(adapter)):
                    return False
                vocab, offset = self.backbone.vocab_size, adapter.row_offset

                def shift(ids: list[int]) -> list[int]:
                    return [i + offset if i >= vocab else i for i in ids]

                sequence.prompt_ids = shift(sequence.prompt_ids)
                sequence.prompt_types = shift(sequence.prompt_types) if sequence.prompt_types else None
                sequence.eos_id = shift([sequence.eos_id])[0]
                assert adapter.slot is not None, "a resident adapter has a slot"
                sequence.row.slot = adapter.slot  # keeps the row's kind-specific state (`RowState.extra`)
                sequence.row.composition = row_composition(sequence.composed)
                self.manager.activate(sequence.adapters)
        sequence.bound = True
        return True

    # -- forwards -------------------------------------------------------------------------------------------
    def plans(self, sequences: list[Sequence]) -> list[tuple[KindRuntime, Any]]:
        """Each kind's plan for a batch of (bound) sequences: rows of other kinds get NO_SLOT."""
        with self.manager.lock:
            runtimes = list(self.manager.runtimes.items())
        return [(runtime, runtime.make_plan([s.row if s.adapter is not None and s.adapter.kind == kind
                                             else RowState() for s in sequences]))
                for kind, runtime in runtimes]

    @contextmanager
    def applying(self, plans: list[tuple[KindRuntime, Any]]) -> Iterator[None]:
        """Within the block, every forward of the model applies the plans' adapters to their rows."""
        with ExitStack() as stack:
            for runtime, plan in plans:
                stack.enter_context(runtime.active(plan))
            yield

    @contextmanager
    def applying_to_all(self, adapter: ResidentAdapter) -> Iterator[None]:
        """`adapter` on every row of every forward within the block, whatever the batch size (`hub eval`)."""
        with self.manager.pinned(adapter):
            runtime = self.manager.runtimes[adapter.kind]
            assert adapter.slot is not None, "a pinned adapter is resident, so it has a slot"
            with self.applying([(runtime, runtime.make_plan(None, adapter.slot))]):
                yield


def row_composition(composed: ComposedAdapters | None) -> SlotComposition | None:
    """A bound composition as its row carries it: the members' slots, in the block's order."""
    if composed is None:
        return None
    slots = tuple(member.slot for member in composed.members if member.slot is not None)
    assert len(slots) == len(composed.members), "a composition's adapters are all resident when it binds"
    return SlotComposition(composed.composition.block, slots, composed.composition.weights)


def bind_all_or_release(engine: Engine, sequences: list[Sequence]) -> None:
    """Bind every sequence, waiting for weights from the store (callers outside the server); on any failure
    every sequence is released and the error raised."""
    try:
        for sequence in sequences:
            for adapter in sequence.adapters:
                engine.manager.weights(adapter)
            if not engine.bind(sequence):
                raise CapacityError(f"all {engine.manager.settings.max_resident} resident adapters are busy; "
                                    "try again shortly")
    except BaseException:
        for sequence in sequences:
            engine.release(sequence)
        raise
