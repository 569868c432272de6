"""Serving core v3 at its seams: loading apart from slotting (a cold or hung adapter stalls nobody), failing
alone and never silently (a dying engine thread, task rows of the wrong width, a slot copy that raises), VAE
requests queued all or none, object-store hot publishing, transient load errors retried, negative lookups
cached, and the batched sampler equal to the per-row one."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

from hub.errors import AdapterLoadError, CapacityError, IntegrityError, NotFoundError
from hub.model.backbone import load_backbone
from hub.serving.batch import DecodeBatch, decode_to_completion
from hub.serving.engine import Engine
from hub.serving.loading import LoadState
from hub.serving.tiers import ManagerSettings
from hub.serving.output import filtered_logits
from hub.serving.sampling import SamplingParams
from hub.serving.scheduler import EngineStoppedError, QueueFullError, Scheduler
from hub.serving.sync import StoreSync
from hub.serving.token_rows import TokenRowTable
from tasks import make_task
from tests.test_adapter import adapters_model, loaded

MR = "name[The Eagle], food[French]"


@pytest.fixture(scope="module")
def weights(tiny_base):
    return {name: loaded(adapters_model(tiny_base, 10, seed=80 + i), name, seed=i)
            for i, name in enumerate(["hot", "cold", "other"])}


def new_engine(tiny_base, **settings) -> Engine:
    return Engine(load_backbone(str(tiny_base), "cpu"), make_task, ManagerSettings(**settings))


def run_all(scheduler: Scheduler, sequences, timeout: float = 60) -> None:
    done = threading.Event()
    for sequence in sequences:
        sequence.on_update = lambda s: done.set() if all(q.finished for q in sequences) else None
    scheduler.submit_all(sequences)
    assert done.wait(timeout)


def test_a_cold_adapter_loads_off_the_lock_while_running_streams_keep_decoding(tiny_base, weights):
    """The store read of a cold adapter (slowed to 1.5 s) runs on the loader pool: the manager's lock stays free,
    the running stream's gaps between tokens stay far below the load time, and the cold request then runs."""
    engine = new_engine(tiny_base, max_cpu_adapters=0)
    engine.manager.add_adapter(weights["hot"])
    reading = threading.Event()

    def slow_fetch():
        reading.set()
        time.sleep(1.5)
        return weights["cold"]

    engine.manager.add_stored("cold", "1", weights["cold"].meta, slow_fetch)
    scheduler = Scheduler(engine, max_batch=8, prefill_chunk=None)
    scheduler.start()
    hot = engine.new_sequence("hot", MR, SamplingParams(max_new_tokens=110, ignore_eos=True))
    stamps: list[float] = []
    hot.on_update = lambda s: (stamps.append(time.monotonic()), time.sleep(0.02))  # a stream of ~2.5 s
    scheduler.submit(hot)
    while len(stamps) < 3:
        time.sleep(0.01)
    cold = engine.new_sequence("cold", MR, SamplingParams(max_new_tokens=4))
    finished = threading.Event()
    cold.on_update = lambda s: s.finished and finished.set()
    scheduler.submit(cold)
    assert reading.wait(5)
    assert engine.manager.lock.acquire(timeout=0.2), "the manager's lock is free while the store is read"
    engine.manager.lock.release()
    assert finished.wait(30) and cold.finish_reason in ("stop", "length")
    assert not hot.finished, "the stream was still running when the cold adapter's request finished"
    while not hot.finished:
        time.sleep(0.01)
    scheduler.stop(10)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert max(gaps) < 0.75, f"a running stream stalled {max(gaps):.2f}s while an adapter loaded"
    assert engine.manager.adapters["cold"].in_use == engine.manager.adapters["hot"].in_use == 0


def test_a_hung_store_read_fails_its_requests_after_the_timeout_and_others_go_on(tiny_base, weights):
    engine = new_engine(tiny_base, max_cpu_adapters=0, load_timeout=0.5)
    engine.manager.add_adapter(weights["hot"])
    hang = threading.Event()
    engine.manager.add_stored("cold", "1", weights["cold"].meta, lambda: hang.wait(30) or weights["cold"])
    scheduler = Scheduler(engine, max_batch=8)
    scheduler.start()
    try:
        sequences = [engine.new_sequence("cold", MR, SamplingParams(max_new_tokens=4)),
                     engine.new_sequence("hot", MR, SamplingParams(max_new_tokens=4))]
        started = time.monotonic()
        run_all(scheduler, sequences, timeout=10)
        cold, hot = sequences
        assert cold.finish_reason == "error" and isinstance(cold.error, AdapterLoadError)
        assert "did not answer within 0.5s" in str(cold.error) and time.monotonic() - started < 5
        assert hot.finish_reason in ("stop", "length") and scheduler.alive
    finally:
        hang.set()
        scheduler.stop(10)


def test_wrong_width_task_rows_fail_only_their_request_and_the_engine_keeps_serving(tiny_base, weights):
    """A version whose task-token rows are 7 wider than the backbone (checksums valid) used to kill the engine
    thread: every later request to any task timed out while /readyz said ready."""
    engine = new_engine(tiny_base, max_cpu_adapters=0)
    wide = dataclasses.replace(weights["cold"], token_rows=torch.randn(weights["cold"].token_rows.shape[0], 32 + 7))
    engine.manager.add_stored("wide", "1", wide.meta, lambda: wide)
    engine.manager.add_adapter(weights["hot"])
    scheduler = Scheduler(engine, max_batch=8)
    scheduler.start()
    try:
        bad = engine.new_sequence("wide", MR, SamplingParams(max_new_tokens=4))
        run_all(scheduler, [bad])
        assert bad.finish_reason == "error" and isinstance(bad.error, AdapterLoadError)
        assert "task-token rows of shape" in str(bad.error) and "hidden size is 32" in str(bad.error)
        later = [engine.new_sequence("hot", MR, SamplingParams(max_new_tokens=4)) for _ in range(2)]
        run_all(scheduler, later)
        assert all(s.finish_reason in ("stop", "length") for s in later) and scheduler.alive
        assert engine.manager.token_rows.used[TokenRowTable.ZERO_ROW] == 1, "row 0 stays reserved"
    finally:
        scheduler.stop(10)


def test_make_resident_is_all_or_nothing(tiny_base, weights, monkeypatch):
    engine = new_engine(tiny_base)
    engine.manager.add_adapter(weights["hot"])
    runtime = engine.manager.runtimes["vlm"]
    before = dict(engine.manager.token_rows.used)
    engine.manager.add_stored("cold", "1", weights["cold"].meta, lambda: weights["cold"])
    cold = engine.manager.adapters["cold"]
    engine.manager.weights(cold)
    monkeypatch.setattr(runtime, "add", lambda bundle: (_ for _ in ()).throw(MemoryError("no device memory")))
    with pytest.raises(MemoryError):
        engine.manager.make_resident(cold)
    assert cold.slot is None and engine.manager.token_rows.used == before
    monkeypatch.undo()
    assert engine.manager.make_resident(cold) and cold.slot is not None


def test_the_zero_row_is_never_freed():
    table = TokenRowTable(4, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="reserved"):
        table.free(TokenRowTable.ZERO_ROW)
    with pytest.raises(Exception, match="hidden size 4"):
        table.allocate(torch.zeros(2, 5))
    assert table.used == {0: 1}


def test_a_dying_engine_thread_is_reported_and_ends_every_held_request(tiny_base, weights, monkeypatch):
    engine = new_engine(tiny_base)
    engine.manager.add_adapter(weights["hot"])
    scheduler = Scheduler(engine, max_batch=8)
    monkeypatch.setattr(scheduler, "_take_waiting", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    sequence = engine.new_sequence("hot", MR, SamplingParams(max_new_tokens=4))
    finished = threading.Event()
    sequence.on_update = lambda s: s.finished and finished.set()
    scheduler.submit(sequence)
    scheduler.start()
    assert finished.wait(10)
    assert sequence.finish_reason == "error" and isinstance(sequence.error, EngineStoppedError)
    assert not scheduler.alive and "RuntimeError: boom" in scheduler.failure
    with pytest.raises(EngineStoppedError, match="boom"):
        scheduler.submit(engine.new_sequence("hot", MR, SamplingParams(max_new_tokens=4)))
    assert engine.manager.adapters["hot"].in_use == 0


def test_a_failed_load_is_retried_after_its_backoff(tiny_base, weights, monkeypatch):
    monkeypatch.setattr("hub.serving.loading.RETRY_BACKOFF", (0.3, 1.0))
    engine = new_engine(tiny_base, max_cpu_adapters=0)
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise ConnectionError("connection reset by peer")
        return weights["cold"]

    adapter = engine.manager.add_stored("cold", "1", weights["cold"].meta, flaky)
    with pytest.raises(AdapterLoadError, match="connection reset"):
        engine.manager.weights(adapter)
    assert engine.manager.request_weights(adapter) is LoadState.FAILED, "within the backoff: failed at once"
    time.sleep(0.35)
    assert engine.manager.weights(adapter) is not None and len(calls) == 2


class FlakyStore:
    """A store whose first `load` of a version fails with a network error (a local store underneath)."""

    def __init__(self, store):
        self.store, self.failed = store, set()

    def __getattr__(self, name):
        return getattr(self.store, name)

    def load(self, ref, backbone=None):
        if ref not in self.failed:
            self.failed.add(ref)
            raise OSError("the store did not answer (connection timed out)")
        return self.store.load(ref, backbone)


def test_store_sync_retries_a_transient_failure_and_refuses_a_corrupt_version(tiny_base, trained_run, tmp_path,
                                                                             monkeypatch):
    from hub.store.local import AdapterStore

    monkeypatch.setattr("hub.serving.sync.RETRY_FIRST", 0.2)
    store = AdapterStore(tmp_path / "store")
    store.publish(trained_run / "best", name="e2e")
    engine = Engine(load_backbone(str(tiny_base), "cpu"), make_task)
    sync = StoreSync(FlakyStore(store), engine.manager)
    first = sync.sync()
    assert "e2e@1" in first.refused and "e2e@1" not in sync.refused and not sync.retry_due()
    time.sleep(0.25)
    assert sync.retry_due() and sync.sync().loaded == ["e2e@1"] and engine.manager.get("e2e") is not None
    bad = StoreSync(store, Engine(load_backbone(str(tiny_base), "cpu"), make_task).manager)
    monkeypatch.setattr(store, "load", lambda ref, backbone=None: (_ for _ in ()).throw(IntegrityError("sha256")))
    bad.sync()
    assert "e2e@1" in bad.refused and not bad.retries


def test_the_batched_sampler_equals_the_per_row_rule():
    """Temperature, top-k and top-p per row over [B, V] equal the same steps done row by row."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.8),
              SamplingParams(temperature=1.0, top_k=10, top_p=0.5), SamplingParams(temperature=2.0)]

    def one_row(row, p):
        row = (row.double() - row.double().max()) / p.temperature
        if p.top_k:
            row = row.masked_fill(row < torch.topk(row, p.top_k).values[-1], float("-inf"))
        if p.top_p < 1.0:
            ordered, order = row.sort(descending=True)
            probs = ordered.softmax(-1)
            row = row.scatter(0, order, ordered.masked_fill(probs.cumsum(-1) - probs > p.top_p, float("-inf")))
        return row

    batched = filtered_logits(logits, params)
    for i, p in enumerate(params):
        assert torch.equal(batched[i].isinf(), one_row(logits[i], p).isinf())
        kept = ~batched[i].isinf()
        assert torch.allclose(batched[i][kept], one_row(logits[i], p)[kept])
    assert int((~batched[0].isinf()).sum()) == 5


def test_seeded_rows_give_the_same_tokens_alone_and_in_a_mixed_batch(tiny_base, weights):
    engine = new_engine(tiny_base)
    for adapter in weights.values():
        engine.manager.add_adapter(adapter)

    def seeded():
        return engine.new_sequence("hot", MR, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, seed=7))

    alone = decode_to_completion(engine, [seeded()])[0].output_ids
    mixed = decode_to_completion(engine, [engine.new_sequence("other", MR, SamplingParams(max_new_tokens=10)),
                                          seeded(), engine.new_sequence("cold", MR, SamplingParams(
                                              max_new_tokens=10, temperature=0.8, seed=3))])
    assert mixed[1].output_ids == alone


def test_queueing_is_all_or_nothing(tiny_base, weights):
    """A VAE request's rows (or any group) enter the queue together or not at all; a refusal releases them all."""
    engine = new_engine(tiny_base)
    engine.manager.add_adapter(weights["hot"])
    scheduler = Scheduler(engine, max_batch=4, max_queue=3)
    rows = [engine.new_sequence("hot", MR, SamplingParams(max_new_tokens=2)) for _ in range(5)]
    with pytest.raises(QueueFullError):
        scheduler.submit_all(rows)
    assert not scheduler.waiting and engine.manager.adapters["hot"].in_use == 0
    assert isinstance(QueueFullError("x"), CapacityError)


def test_unknown_names_are_cached_so_they_cannot_force_listings(monkeypatch):
    """The Ray ingress lists the store off the event loop; a flood of unknown names lists it at most once per
    MIN_RELIST, and a name found unknown is answered from the negative cache."""
    from server.ray.ingress import RemoteService
    from server.ray.options import RayServeOptions

    class CountingStore:
        listings = 0

        def list(self):
            CountingStore.listings += 1
            return []

    service = RemoteService(None, CountingStore(), RayServeOptions(store="memory://x"))

    async def flood():
        await service.start()
        for i in range(200):
            with pytest.raises(NotFoundError):
                await service.resolve(f"nope-{i % 5}")

    started = time.monotonic()
    asyncio.run(flood())
    assert CountingStore.listings <= 2 + (time.monotonic() - started) / 0.5
    service.stop()


def test_build_app_without_the_vae_capability_says_so_in_openapi(tiny_base):
    from fastapi.testclient import TestClient

    from server.app import NO_VAE_NOTE, build_app
    from server.ray.ingress import RemoteService
    from server.ray.options import RayServeOptions

    class EmptyStore:
        def list(self):
            return []

    app = build_app(RemoteService(None, EmptyStore(), RayServeOptions(store="memory://x")))
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
        assert not [p for p in schema["paths"] if p.startswith("/v1/vae")]
        assert schema["info"]["description"] == NO_VAE_NOTE
        assert client.post("/v1/vae/x/encode", json={"texts": ["a"]}).status_code == 404


def test_a_burst_of_cold_adapters_loads_each_once_within_the_tiers(tiny_base, weights):
    """Ten requests for ten adapters in no tier, one device slot, two CPU copies: loads start only as the tiers
    have room, and a copy loaded for a waiting request is not dropped before that request runs (no thrash:
    each adapter is read once), and the CPU tier never holds more than its size plus the loads for waiters."""
    engine = new_engine(tiny_base, max_resident=1, max_cpu_adapters=2, loader_threads=2)
    reads: list[str] = []
    held: list[int] = []
    source = weights["cold"]

    def fetch(name):
        reads.append(name)
        held.append(len(engine.manager.cpu))
        return source

    for i in range(10):
        engine.manager.add_stored(f"c{i}", "1", source.meta, lambda i=i: fetch(f"c{i}"))
    scheduler = Scheduler(engine, max_batch=8)
    scheduler.start()
    try:
        sequences = [engine.new_sequence(f"c{i}", MR, SamplingParams(max_new_tokens=2)) for i in range(10)]
        run_all(scheduler, sequences)
    finally:
        scheduler.stop(10)
    assert all(s.finish_reason in ("stop", "length") for s in sequences)
    assert sorted(reads) == sorted(f"c{i}" for i in range(10)), "each adapter read exactly once"
    assert max(held) <= 2 + 2 and len(engine.manager.cpu) <= 2


def test_loads_queued_behind_hung_ones_fail_after_the_timeout_too(tiny_base, weights):
    """Both loader threads hang on the store: a third adapter's load cannot start, and its request gets the
    503 reason after the load timeout instead of waiting for the request timeout."""
    engine = new_engine(tiny_base, max_cpu_adapters=0, load_timeout=0.5, loader_threads=2)
    hang = threading.Event()
    for name in ("h1", "h2", "third"):
        engine.manager.add_stored(name, "1", weights["cold"].meta, lambda: hang.wait(30) or weights["cold"])
    scheduler = Scheduler(engine, max_batch=8)
    scheduler.start()
    try:
        sequences = [engine.new_sequence(n, MR, SamplingParams(max_new_tokens=2)) for n in ("h1", "h2", "third")]
        run_all(scheduler, sequences, timeout=10)
        assert all(s.finish_reason == "error" for s in sequences)
        assert "no loader was free" in str(sequences[2].error)
    finally:
        hang.set()
        scheduler.stop(10)


def test_a_burst_of_joiners_shares_one_prefill_budget_per_step(tiny_base, weights):
    """Eight rows joining together with a budget of 16 prompt tokens per step prefill 2 columns a step (16 / 8),
    so no step prefills more than the budget, however many rows arrive; their tokens equal their solo runs."""
    engine = new_engine(tiny_base)
    engine.manager.add_adapter(weights["hot"])
    solo = decode_to_completion(engine, [engine.new_sequence("hot", MR, SamplingParams(max_new_tokens=4))])
    batch = DecodeBatch(engine, prefill_chunk=16)
    rows = [engine.new_sequence("hot", MR, SamplingParams(max_new_tokens=4)) for _ in range(8)]
    assert all(engine.bind(r) for r in rows)
    batch.join(rows)
    widths = []
    while batch.prefilling:
        before = batch.prefilling[0].done
        batch.step()
        widths.append((batch.prefilling[0].done if batch.prefilling else len(rows[0].prompt_ids)) - before)
    assert max(widths) == 2 and len(widths) >= len(rows[0].prompt_ids) // 2
    while batch.busy:
        batch.step()
    assert all(r.output_ids == solo[0].output_ids for r in rows)


def test_cold_adapters_are_copied_into_slots_a_few_per_step(tiny_base, weights, monkeypatch):
    monkeypatch.setattr("hub.serving.scheduler.NEW_SLOTS_PER_PASS", 2)
    engine = new_engine(tiny_base)
    for i in range(6):
        engine.manager.add_stored(f"s{i}", "1", weights["cold"].meta, lambda: weights["cold"])
    for i in range(6):
        engine.manager.weights(engine.manager.adapters[f"s{i}"])
    scheduler = Scheduler(engine, max_batch=16)
    for i in range(6):
        scheduler.waiting.append(engine.new_sequence(f"s{i}", MR, SamplingParams(max_new_tokens=2)))
    taken = scheduler._take_waiting()
    assert len(taken) == 2 and engine.manager.resident_count() == 2 and len(scheduler.waiting) == 4
    for sequence in [*taken, *scheduler.waiting]:
        engine.release(sequence)
