"""Fair admission (`hub.serving.fairness`): the virtual token counter's order on its own, and in the runner a
light client's request overtaking a flooding client's queue (first come, first served made it wait for all of it)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from hub.serving.fairness import FairAdmission, VirtualCounters
from hub.serving.sampling import SamplingParams
from hub.serving.scheduler import Scheduler
from hub.serving.sequence import Sequence
from tasks import make_task
from tests.test_serving_core import MR, new_engine
from tests.test_serving_core import weights  # noqa: F401  (fixture)


def seq(client: str, adapter: str, prompt: int = 4) -> Sequence:
    return Sequence(SimpleNamespace(name=adapter), [1] * prompt, None, SamplingParams(client=client), 0)


def admit_all(sequence: Sequence) -> bool:
    return True


def test_a_newcomer_is_admitted_before_a_flooding_client_queue():
    fair = FairAdmission()
    running = [seq("flood", "a") for _ in range(4)]
    fair.admit([], running, 0, admit_all)
    for _ in range(10):
        fair.charge_decoded(running)
    waiting = [seq("flood", "a") for _ in range(50)] + [seq("light", "b")]
    taken = fair.admit(waiting, running, 1, admit_all)
    assert [s.params.client for s in taken] == ["light"]


def test_two_busy_clients_share_the_batch_evenly_and_adapters_within_a_client_too():
    fair = FairAdmission()
    waiting = [seq("x", "a") for _ in range(20)] + [seq("x", "b") for _ in range(20)] + \
              [seq("y", "c") for _ in range(40)]
    taken = fair.admit(waiting, [], 8, admit_all)
    by_client = [s.params.client for s in taken]
    assert by_client.count("x") == by_client.count("y") == 4
    assert sorted(s.adapter.name for s in taken if s.params.client == "x") == ["a", "a", "b", "b"]


def test_a_flow_whose_adapter_is_not_ready_is_passed_over_in_order():
    fair = FairAdmission()
    loading = [seq("x", "cold") for _ in range(3)]
    ready = [seq("x", "hot") for _ in range(3)]
    taken = fair.admit(loading + ready, [], 4, lambda s: s.adapter.name == "hot")
    assert taken == ready


def test_idle_time_banks_no_credit():
    counters: VirtualCounters[str] = VirtualCounters()
    counters.activate({"busy", "other"})
    counters.charge("busy", 100.0)
    counters.charge("other", 50.0)
    counters.activate({"busy", "other", "back"})
    assert counters.get("back") == 50.0, "a member coming back starts at the smallest active counter"
    counters.activate(set())
    counters.activate({"busy"})
    assert counters.get("busy") == 0.0, "an idle server starts everyone again from 0"


def test_in_the_runner_a_light_clients_request_overtakes_a_flood(tiny_base, weights):  # noqa: F811
    engine = new_engine(tiny_base)
    engine.manager.add_adapter(weights["hot"])
    engine.manager.add_adapter(weights["other"])
    scheduler = Scheduler(engine, max_batch=2, prefill_chunk=None)
    order: list[str] = []
    done = threading.Event()

    def track(sequence: Sequence) -> None:
        if sequence.finished and sequence.finish_reason != "cancelled":
            order.append(sequence.params.client)
            if len(order) == 31:
                done.set()

    def new(name: str, client: str) -> Sequence:
        sequence = engine.new_sequence(name, MR, SamplingParams(max_new_tokens=8, ignore_eos=True, client=client))
        sequence.on_update = track
        return sequence

    scheduler.submit_all([new("hot", "flood") for _ in range(30)])
    scheduler.submit(new("other", "light"))  # queued behind all 30
    scheduler.start()
    try:
        assert done.wait(60)
    finally:
        scheduler.stop(10)
    assert order.index("light") <= 3, f"the light request finished {order.index('light') + 1}th of 31"


@pytest.mark.parametrize("clients", [1, 3])
def test_every_request_is_served_whatever_the_mix(tiny_base, weights, clients):  # noqa: F811
    engine = new_engine(tiny_base, max_resident=1)
    for name in ("hot", "other"):
        engine.manager.add_adapter(weights[name])
    scheduler = Scheduler(engine, max_batch=3, prefill_chunk=None)
    sequences = [engine.new_sequence(("hot", "other")[i % 2], MR,
                                     SamplingParams(max_new_tokens=3, client=str(i % clients))) for i in range(12)]
    finished = threading.Event()
    for sequence in sequences:
        sequence.on_update = lambda s: all(q.finished for q in sequences) and finished.set()
    scheduler.submit_all(sequences)
    scheduler.start()
    try:
        assert finished.wait(60)
    finally:
        scheduler.stop(10)
    assert all(s.finish_reason in ("stop", "length") for s in sequences)


def test_the_admission_order_is_a_server_setting(tiny_base, tmp_path):
    from hub.errors import HubError
    from hub.serving.fairness import FirstComeFirstServed
    from hub.serving.service import HubService, ServiceSettings
    from hub.store.local import AdapterStore

    with pytest.raises(HubError, match="admission must be one of fair, fcfs"):
        ServiceSettings(admission="lottery")
    engine = new_engine(tiny_base)
    service = HubService(engine.backbone, AdapterStore(tmp_path / "store"), make_task,
                         ServiceSettings(admission="fcfs"))
    try:
        assert isinstance(service.scheduler.fairness, FirstComeFirstServed)
        assert isinstance(HubService(engine.backbone, service.store, make_task).scheduler.fairness, FairAdmission)
    finally:
        engine.close()
