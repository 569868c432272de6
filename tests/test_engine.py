"""The engine and scheduler: joins between steps, per-row stopping and sampling, cancellation, limits, tiers."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from hub.model.backbone import load_backbone
from hub.serving.engine import Engine, SamplingParams
from hub.errors import HubError, NotFoundError
from hub.serving.scheduler import QueueFullError, Scheduler
from tasks import make_task
from tests.test_adapter import adapters_model, loaded

MRS = ["name[The Eagle], food[French]", "name[Alimentum], area[city centre]", "name[The Mill], near[Café Rouge]"]


@pytest.fixture(scope="module")
def engine(tiny_base):
    engine = Engine(load_backbone(str(tiny_base), "cpu"), make_task)
    for i, name in enumerate(["a", "b", "c"]):
        engine.add_adapter(loaded(adapters_model(tiny_base, 10, seed=10 + i), name, seed=i))
    return engine


def greedy(engine, task, source, n=10):
    return engine.new_sequence(task, source, SamplingParams(max_new_tokens=n))


def test_sequences_joining_mid_decode_match_their_solo_runs(engine):
    """Iteration-level scheduling: later arrivals join a running batch (their cache merged in)."""
    solo = [engine.run([greedy(engine, t, mr)])[0].output_ids for t, mr in zip("abc", MRS)]
    scheduler = Scheduler(engine, max_batch=8)
    sequences = [greedy(engine, t, mr) for t, mr in zip("abc", MRS)]
    done = threading.Event()
    remaining = [len(sequences)]

    def on_update(seq):
        if seq is sequences[0] and len(seq.output_ids) == 3:
            scheduler.submit(sequences[1])  # joins after three steps of the first
        if seq is sequences[1] and seq.output_ids == solo[1][:1]:
            scheduler.submit(sequences[2])  # joins as soon as the second has its first token
        if seq.finished:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

    for s in sequences:
        s.on_update = on_update
    scheduler.start()
    scheduler.submit(sequences[0])
    assert done.wait(60)
    scheduler.stop(10)
    assert [s.output_ids for s in sequences] == solo
    assert scheduler.steps < len(solo[0]) + len(solo[2]) - 2, "the sequences shared decode steps"


def test_stop_strings_length_and_sampling_are_per_row(engine):
    plain = engine.run([greedy(engine, "a", MRS[0], 12)])[0]
    assert plain.finish_reason == "length" and len(plain.output_ids) == 12
    word = engine.decode_text(plain.output_ids[5:7])
    stopped = engine.new_sequence("a", MRS[0], SamplingParams(max_new_tokens=12, stop=(word,)))
    sampled = [engine.new_sequence("b", MRS[1], SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9,
                                                                top_k=50, seed=7)) for _ in range(2)]
    engine.run([stopped, *sampled])
    assert stopped.finish_reason == "stop" and word not in stopped.text and plain.text.startswith(stopped.text)
    assert sampled[0].output_ids == sampled[1].output_ids, "same seed, same sample"
    other = engine.new_sequence("b", MRS[1], SamplingParams(max_new_tokens=8, temperature=1.0, seed=8))
    assert engine.run([other])[0].output_ids != sampled[0].output_ids


def test_no_task_token_but_the_rows_own_eos_can_be_generated(engine):
    vocab = engine.backbone.vocab_size
    for s in engine.run([greedy(engine, t, mr, 30) for t, mr in zip("abc", MRS)]):
        assert all(t < vocab for t in s.output_ids)


def test_cancelled_sequences_leave_and_release_their_adapter(engine):
    scheduler = Scheduler(engine, max_batch=4)
    sequence = greedy(engine, "a", MRS[0], 100)
    before = engine.adapters["a"].in_use
    finished = threading.Event()
    sequence.on_update = lambda s: (len(s.output_ids) == 2 and setattr(s, "cancelled", True),
                                    s.finished and finished.set())
    scheduler.start()
    scheduler.submit(sequence)
    assert finished.wait(30)
    scheduler.stop(10)
    assert sequence.finish_reason == "cancelled" and len(sequence.output_ids) < 100
    assert engine.adapters["a"].in_use == before - 1


def test_a_full_queue_is_refused(engine):
    scheduler = Scheduler(engine, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    scheduler.submit(greedy(engine, "a", MRS[0]))
    with pytest.raises(QueueFullError):
        scheduler.submit(greedy(engine, "a", MRS[0]))


def test_bad_requests_are_clear_errors(engine):
    with pytest.raises(NotFoundError, match="available: a, b, c"):
        engine.new_sequence("zzz", MRS[0], SamplingParams())
    with pytest.raises(HubError, match="limit of 128"):
        engine.new_sequence("a", f"name[{'very long name ' * 80}]", SamplingParams(max_new_tokens=10))
    with pytest.raises(HubError, match="max_new_tokens"):
        engine.new_sequence("a", MRS[0], SamplingParams(max_new_tokens=0))


def test_least_recently_used_adapters_wait_on_the_cpu(tiny_base):
    engine = Engine(load_backbone(str(tiny_base), "cpu"), make_task, max_resident=2)
    for i, name in enumerate(["x", "y", "z"]):
        engine.add_adapter(loaded(adapters_model(tiny_base, 10, seed=20 + i), name, seed=i))
    assert engine.resident_count() == 2 and engine.adapters["x"].slot is None
    reference = Engine(load_backbone(str(tiny_base), "cpu"), make_task)
    reference.add_adapter(loaded(adapters_model(tiny_base, 10, seed=20), "x", seed=0))
    expected = reference.run([greedy(reference, "x", MRS[0])])[0].output_ids
    assert engine.run([greedy(engine, "x", MRS[0])])[0].output_ids == expected  # loaded back transparently
    assert engine.adapters["x"].slot is not None and engine.adapters["y"].slot is None
    assert engine.resident_count() == 2


def test_replacing_a_version_keeps_running_sequences_on_the_old_one(tiny_base):
    engine = Engine(load_backbone(str(tiny_base), "cpu"), make_task)
    engine.add_adapter(loaded(adapters_model(tiny_base, 10, seed=30), "t", seed=0))
    old = engine.adapters["t"]
    running = greedy(engine, "t", MRS[0])
    new = dataclasses.replace(loaded(adapters_model(tiny_base, 10, seed=31), "t", seed=1), version="2")
    engine.add_adapter(new)
    assert old.retired and old.slot is not None, "still used by a running sequence"
    engine.run([running])
    assert old.slot is None and engine.adapters["t"].version == "2"
    assert torch.equal(engine.bank.weights.up_bias[engine.adapters["t"].slot, 0],
                       new.adapter_tensors["transformer.h.0.output_adapters.adapters.t.adapter_up.bias"])
