"""The generation engine: many task adapters resident on one frozen GPT-2, decoded in fused mixed-task batches.

Each adapter kind in use (`hub.adapters.registry`) has one runtime on the backbone, whose hooks the engine
removes on `close`. A resident adapter owns a slot in its kind's runtime and a block of rows in the task-token
table. A `DecodeBatch` (`hub.serving.batch`) runs one forward per step over all its sequences, whatever their
task; sequences join and leave between steps (iteration-level scheduling). `Engine.run` decodes a list of
sequences to completion; the server's scheduler drives `DecodeBatch` itself.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch

from hub.adapters.base import KindRuntime, RowState
from hub.adapters.registry import get_kind
from hub.errors import AdapterLoadError, CapacityError, HubError, NotFoundError
from hub.model.backbone import Backbone
from hub.model.task_tokens import install_task_rows
from hub.serving.detokenize import IncrementalText
from hub.serving.sampling import SamplingParams, new_generator
from hub.serving.sequence import ResidentAdapter, Sequence
from hub.store.catalog import LoadedAdapter
from hub.store.format import AdapterMeta
from hub.task import Task, TaskCodec

__all__ = ["Engine", "ResidentAdapter", "SamplingParams", "Sequence"]




class TokenRowTable:
    """Task-token rows of every resident adapter in one table after GPT-2's vocabulary (first-fit blocks).

    Row 0 stays zero: the token type of plain-base rows in a batch whose other rows carry task types.
    """

    ZERO_ROW = 0
    NO_ROWS = -1

    def __init__(self, hidden_size: int, device: torch.device, dtype: torch.dtype, capacity: int = 64):
        self.table = torch.zeros(capacity, hidden_size, device=device, dtype=dtype)
        self.used: dict[int, int] = {self.ZERO_ROW: 1}  # offset -> length

    def allocate(self, rows: torch.Tensor) -> int:
        if rows.shape[0] == 0:  # an adapter without task tokens (a sentence VAE) holds no block
            return self.NO_ROWS
        offset = self._first_fit(rows.shape[0])
        if offset + rows.shape[0] > self.table.shape[0]:
            grown = torch.zeros(2 * max(self.table.shape[0], offset + rows.shape[0]), self.table.shape[1],
                                device=self.table.device, dtype=self.table.dtype)
            grown[: self.table.shape[0]] = self.table
            self.table = grown
        self.table[offset : offset + rows.shape[0]] = rows.to(self.table)
        self.used[offset] = rows.shape[0]
        return offset

    def _first_fit(self, length: int) -> int:
        position = 0
        for offset, used in sorted(self.used.items()):
            if offset - position >= length:
                return position
            position = offset + used
        return position

    def free(self, offset: int) -> None:
        if offset != self.NO_ROWS:
            self.used.pop(offset)


class Engine:
    """Resident adapters on one frozen backbone, and fused mixed-task decoding.

    `lock` guards the adapter table (adding, evicting, binding sequences); forwards run without it, since a
    running sequence pins its adapter's slot and rows (`in_use`). Use as a context manager, or call `close`,
    to take every hook and the task-token table off the model again.
    """

    def __init__(self, backbone: Backbone, make_task: Callable[[str, dict], Task], max_resident: int | None = None,
                 max_cpu_adapters: int | None = None, bank_dtype: torch.dtype = torch.float32):
        self.backbone = backbone
        self.make_task = make_task
        self.max_resident = max_resident
        self.max_cpu_adapters = max_cpu_adapters
        self.bank_dtype = bank_dtype  # what resident adapter weights are stored in (arithmetic stays float32)
        model = backbone.model
        self.runtimes: dict[str, KindRuntime] = {}
        self.token_rows = TokenRowTable(model.config.n_embd, backbone.device, backbone.dtype)
        self._plain_heads = (model.transformer.wte, model.lm_head)
        self.embedding = install_task_rows(model, self.token_rows.table)
        self.no_type_id = backbone.vocab_size + TokenRowTable.ZERO_ROW
        self.adapters: OrderedDict[str, ResidentAdapter] = OrderedDict()  # by name, least recently used first
        self.lock = threading.RLock()

    def close(self) -> None:
        """Remove every kind's hooks and restore the model's own embedding and LM head."""
        for runtime in self.runtimes.values():
            runtime.close()
        self.runtimes.clear()
        self.backbone.model.transformer.wte, self.backbone.model.lm_head = self._plain_heads

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- adapters -------------------------------------------------------------------------------------------
    def add_adapter(self, loaded: LoadedAdapter) -> ResidentAdapter:
        """Make a stored adapter servable under its name; a newer version replaces the older one. It becomes
        resident now if a slot is free, else when a request needs it."""
        adapter = self._known(loaded.name, loaded.version, loaded.meta, None)
        self._take_weights(adapter, loaded)
        return self._register(adapter, make_resident=True)

    def add_stored(self, name: str, version: str, meta: AdapterMeta,
                   fetch: Callable[[], LoadedAdapter]) -> ResidentAdapter:
        """Know a stored adapter by its metadata only; `fetch` reads its weights when a request first needs them
        (and again after the CPU tier dropped them: `max_cpu_adapters`). Nothing is read from the store here."""
        return self._register(self._known(name, version, meta, fetch), make_resident=False)

    def _known(self, name: str, version: str, meta: AdapterMeta, fetch) -> ResidentAdapter:
        task = self.make_task(meta.task_type, dict(meta.task_config))
        encoder = TaskCodec(task, self.backbone.tokenizer, self.backbone.vocab_size, self.backbone.n_positions)
        return ResidentAdapter(name, version, task, meta, meta.adapter_kind, None, None, encoder,
                               meta.trainable_params, fetch=fetch)

    def _register(self, adapter: ResidentAdapter, make_resident: bool) -> ResidentAdapter:
        with self.lock:
            previous = self.adapters.pop(adapter.name, None)
            if previous is not None:
                self._retire(previous)
            self.adapters[adapter.name] = adapter
            if make_resident:
                self.make_resident(adapter)
        return adapter

    def _take_weights(self, adapter: ResidentAdapter, loaded: LoadedAdapter) -> None:
        kind = get_kind(adapter.kind)
        adapter.bundle = kind.load(loaded, self.backbone.model.config)
        adapter.rows = loaded.token_rows.float()
        adapter.parameter_count = kind.parameter_count(adapter.bundle)

    def weights(self, adapter: ResidentAdapter) -> Any:
        """The adapter's bundle on the CPU, read from the store first if the CPU tier does not hold it."""
        with self.lock:
            if adapter.bundle is None:
                try:
                    self._take_weights(adapter, adapter.fetch())
                except Exception as err:  # a store file changed or went bad since it was listed
                    raise AdapterLoadError(f"adapter {adapter.ref} could not be loaded: {err}") from err
                self._trim_cpu_tier(keep=adapter)
            return adapter.bundle

    def _trim_cpu_tier(self, keep: ResidentAdapter | None = None) -> None:
        """Drop the CPU weights of the least recently used adapters without a slot beyond `max_cpu_adapters`
        (only those the store can give back: `add_stored`)."""
        if self.max_cpu_adapters is None:
            return
        held = [a for a in self.adapters.values() if a.bundle is not None and a.slot is None and a.fetch]
        for adapter in held[: max(0, len(held) - self.max_cpu_adapters)]:
            if adapter is not keep:
                adapter.bundle = adapter.rows = None

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise NotFoundError(f"no adapter {name!r} is loaded")
            self._retire(self.adapters.pop(name))

    def resolve(self, name: str) -> ResidentAdapter:
        """The adapter serving `name` (most recently used from now on); it may still wait on the CPU."""
        with self.lock:
            if name not in self.adapters:
                available = ", ".join(sorted(self.adapters)) or "none"
                raise NotFoundError(f"unknown task {name!r}; available: {available}")
            self.adapters.move_to_end(name)
            return self.adapters[name]

    def resident_count(self) -> int:
        return sum(1 for a in self.adapters.values() if a.slot is not None)

    def resident_bytes(self) -> int:
        """Device bytes of every kind's resident adapter weights (the 'bank')."""
        return sum(runtime.resident_bytes() for runtime in self.runtimes.values())

    def make_resident(self, adapter: ResidentAdapter) -> bool:
        """Give `adapter` a slot and token rows, evicting least recently used idle adapters to the CPU if
        --max-resident is reached; False when every resident adapter is busy."""
        with self.lock:
            if adapter.slot is not None:
                return True
            if not self._room_for_one():
                return False
            adapter.slot = self._runtime(adapter.kind).add(self.weights(adapter))
            adapter.row_offset = self.token_rows.allocate(adapter.rows)
            self.embedding.extra.data = self.token_rows.table
            return True

    def _runtime(self, kind: str) -> KindRuntime:
        if kind not in self.runtimes:
            self.runtimes[kind] = get_kind(kind).runtime(self.backbone.model, self.bank_dtype)
        return self.runtimes[kind]

    def _room_for_one(self) -> bool:
        if self.max_resident is None:
            return True
        resident = [a for a in self.adapters.values() if a.slot is not None]
        for adapter in list(resident):
            if len(resident) < self.max_resident:
                break
            if adapter.in_use == 0:
                self._free_slot(adapter)
                resident.remove(adapter)
        return len(resident) < self.max_resident

    def _free_slot(self, adapter: ResidentAdapter) -> None:
        self.runtimes[adapter.kind].remove(adapter.slot)
        self.token_rows.free(adapter.row_offset)
        adapter.slot = None
        self._trim_cpu_tier()

    def _retire(self, adapter: ResidentAdapter) -> None:
        adapter.retired = True
        if adapter.in_use == 0 and adapter.slot is not None:
            self._free_slot(adapter)

    def release(self, sequence: Sequence) -> None:
        """The one place a sequence gives its adapter back (finished, cancelled, failed or refused); safe to
        call more than once."""
        adapter = sequence.adapter
        if adapter is None or sequence.released:
            return
        with self.lock:
            if sequence.released:
                return
            sequence.released = True
            adapter.in_use -= 1
            if adapter.retired and adapter.in_use == 0 and adapter.slot is not None:
                self._free_slot(adapter)

    # -- sequences ------------------------------------------------------------------------------------------
    def new_sequence(self, task_name: str | None, source, params: SamplingParams,
                     prompt_text: str | None = None) -> Sequence:
        """Encode a request's prompt for its task (or raw text for the base model, task_name None).

        The engine lock is held only to find the adapter and count the request against it; parsing and
        tokenizing run outside it, so they never hold up the decode loop.
        """
        params.validate()
        limit = self.backbone.n_positions
        if params.max_new_tokens >= limit:
            raise HubError(f"max_new_tokens must be below the model's context of {limit} tokens")
        if task_name is None:
            ids = self.backbone.tokenizer.encode(prompt_text or "")
            if not ids or len(ids) + params.max_new_tokens > limit:
                raise HubError(f"the prompt needs 1 to {limit - params.max_new_tokens} tokens "
                               f"(context {limit} minus max_new_tokens), got {len(ids)}")
            return self._sequence(None, ids, None, params, self.backbone.tokenizer.eos_token_id or 0)
        with self.lock:
            adapter = self.resolve(task_name)
            refusal = get_kind(adapter.kind).text_input_error
            if refusal:
                raise HubError(f"task {task_name!r} takes no text input: {refusal}")
            adapter.in_use += 1
        sequence = self._sequence(adapter, [], None, params, adapter.encoder.eos_id)
        try:
            source = adapter.task.parse_input(source)
            sequence.prompt_ids, sequence.prompt_types, sequence.input_tokens_dropped = \
                adapter.encoder.encode_request(source, params.max_new_tokens,
                                               refuse_cuts=not adapter.task.truncates_input)
        except BaseException:
            self.release(sequence)
            raise
        return sequence

    def new_state_sequence(self, task_name: str, prompt_ids: list[int], eos_id: int, params: SamplingParams,
                           extra: dict[str, torch.Tensor]) -> Sequence:
        """A sequence with a ready prompt whose row carries kind-specific state (`RowState.extra`, e.g. a
        sentence VAE's latent slot): no task layout, the kind decides what the row means."""
        params.validate()
        with self.lock:
            adapter = self.resolve(task_name)
            adapter.in_use += 1
        sequence = self._sequence(adapter, prompt_ids, None, params, eos_id)
        sequence.row.extra = extra
        return sequence

    def _sequence(self, adapter, ids, types, params: SamplingParams, eos_id: int) -> Sequence:
        return Sequence(adapter, ids, types, params, eos_id, generator=new_generator(params),
                        detokenizer=IncrementalText(self.backbone.tokenizer))

    def bind(self, sequence: Sequence) -> bool:
        """Make the sequence's adapter resident and shift its task-token ids to the adapter's rows; False
        (nothing changed) while every resident slot is busy."""
        if sequence.bound:
            return True
        adapter = sequence.adapter
        if adapter is not None:
            with self.lock:
                if not self.make_resident(adapter):
                    return False
                shift = lambda ids: [i + adapter.row_offset if i >= self.backbone.vocab_size else i  # noqa: E731
                                     for i in ids]
                sequence.prompt_ids = shift(sequence.prompt_ids)
                sequence.prompt_types = shift(sequence.prompt_types) if sequence.prompt_types else None
                sequence.eos_id = shift([sequence.eos_id])[0]
                sequence.row.slot = adapter.slot  # keeps the row's kind-specific state (`RowState.extra`)
        sequence.bound = True
        return True

    @torch.inference_mode()
    def run(self, sequences: list[Sequence]) -> list[Sequence]:
        """Decode the sequences to completion in one fused batch."""
        from hub.serving.batch import DecodeBatch

        for sequence in sequences:
            if not self.bind(sequence):
                self.release(sequence)
                raise CapacityError(f"all {self.max_resident} resident adapters are busy; try again shortly")
        batch = DecodeBatch(self)
        batch.join(sequences)
        while batch.busy:
            batch.step()
        return sequences

    def decode_text(self, ids: list[int]) -> str:
        return self.backbone.tokenizer.decode(ids, skip_special_tokens=False)

    # -- forwards -------------------------------------------------------------------------------------------
    def plans(self, sequences: list[Sequence]) -> list[tuple[KindRuntime, Any]]:
        """Each kind's plan for a batch of (bound) sequences: rows of other kinds get NO_SLOT."""
        return [(runtime, runtime.make_plan([s.row if s.adapter is not None and s.adapter.kind == kind
                                             else RowState() for s in sequences]))
                for kind, runtime in self.runtimes.items()]

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
        if not self.make_resident(adapter):
            raise CapacityError(f"all {self.max_resident} resident adapters are busy")
        runtime = self.runtimes[adapter.kind]
        with self.applying([(runtime, runtime.make_plan(None, adapter.slot))]):
            yield
