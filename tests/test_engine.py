"""The engine and scheduler: joins between steps, per-row stopping and sampling, cancellation, limits, tiers,
waiting for a busy slot, chunked prefill, min_tokens / ignore_eos, incremental text."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from hub.serving.batch import decode_to_completion
from hub.errors import AdapterLoadError, HubError, IntegrityError, NotFoundError
from hub.model.backbone import load_backbone
from hub.serving.batch import DecodeBatch
from hub.serving.detokenize import IncrementalText
from hub.serving.engine import Engine
from hub.serving.tiers import ManagerSettings
from hub.serving.sampling import SamplingParams, sampling_params
from hub.serving.scheduler import QueueFullError, Scheduler
from hub.serving.service import ServiceSettings
from tasks import make_task
from tests.test_adapter import adapters_model, loaded

MRS = ["name[The Eagle], food[French]", "name[Alimentum], area[city centre]", "name[The Mill], near[Café Rouge]"]


@pytest.fixture(scope="module")
def engine(tiny_base):
    engine = Engine(load_backbone(str(tiny_base), "cpu"), make_task)
    for i, name in enumerate(["a", "b", "c"]):
        engine.manager.add_adapter(loaded(adapters_model(tiny_base, 10, seed=10 + i), name, seed=i))
    return engine


def greedy(engine, task, source, n=10):
    return engine.new_sequence(task, source, SamplingParams(max_new_tokens=n))


def test_sequences_joining_mid_decode_match_their_solo_runs(engine):
    """Iteration-level scheduling: later arrivals join a running batch (their cache merged in)."""
    solo = [decode_to_completion(engine, [greedy(engine, t, mr)])[0].output_ids for t, mr in zip("abc", MRS)]
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
    plain = decode_to_completion(engine, [greedy(engine, "a", MRS[0], 12)])[0]
    assert plain.finish_reason == "length" and len(plain.output_ids) == 12
    word = engine.backbone.tokenizer.decode(plain.output_ids[5:7])
    stopped = engine.new_sequence("a", MRS[0], SamplingParams(max_new_tokens=12, stop=(word,)))
    sampled = [engine.new_sequence("b", MRS[1], SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9,
                                                                top_k=50, seed=7)) for _ in range(2)]
    decode_to_completion(engine, [stopped, *sampled])
    assert stopped.finish_reason == "stop" and word not in stopped.text and plain.text.startswith(stopped.text)
    assert sampled[0].output_ids == sampled[1].output_ids, "same seed, same sample"
    other = engine.new_sequence("b", MRS[1], SamplingParams(max_new_tokens=8, temperature=1.0, seed=8))
    assert decode_to_completion(engine, [other])[0].output_ids != sampled[0].output_ids


def test_no_task_token_but_the_rows_own_eos_can_be_generated(engine):
    vocab = engine.backbone.vocab_size
    for s in decode_to_completion(engine, [greedy(engine, t, mr, 30) for t, mr in zip("abc", MRS)]):
        assert all(t < vocab for t in s.output_ids)


def test_cancelled_sequences_leave_and_release_their_adapter(engine):
    scheduler = Scheduler(engine, max_batch=4)
    sequence = greedy(engine, "a", MRS[0], 100)
    before = engine.manager.adapters["a"].in_use
    finished = threading.Event()
    sequence.on_update = lambda s: (len(s.output_ids) == 2 and setattr(s, "cancelled", True),
                                    s.finished and finished.set())
    scheduler.start()
    scheduler.submit(sequence)
    assert finished.wait(30)
    scheduler.stop(10)
    assert sequence.finish_reason == "cancelled" and len(sequence.output_ids) < 100
    assert engine.manager.adapters["a"].in_use == before - 1


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
    engine = Engine(load_backbone(str(tiny_base), "cpu"), make_task, ManagerSettings(max_resident=2))
    for i, name in enumerate(["x", "y", "z"]):
        engine.manager.add_adapter(loaded(adapters_model(tiny_base, 10, seed=20 + i), name, seed=i))
    assert engine.manager.resident_count() == 2 and engine.manager.adapters["x"].slot is None
    reference = Engine(load_backbone(str(tiny_base), "cpu"), make_task)
    reference.manager.add_adapter(loaded(adapters_model(tiny_base, 10, seed=20), "x", seed=0))
    expected = decode_to_completion(reference, [greedy(reference, "x", MRS[0])])[0].output_ids
    assert decode_to_completion(engine, [greedy(engine, "x", MRS[0])])[0].output_ids == expected  # loaded back transparently
    assert engine.manager.adapters["x"].slot is not None and engine.manager.adapters["y"].slot is None
    assert engine.manager.resident_count() == 2


def test_replacing_a_version_keeps_running_sequences_on_the_old_one(tiny_base):
    engine = Engine(load_backbone(str(tiny_base), "cpu"), make_task)
    engine.manager.add_adapter(loaded(adapters_model(tiny_base, 10, seed=30), "t", seed=0))
    old = engine.manager.adapters["t"]
    running = greedy(engine, "t", MRS[0])
    new = dataclasses.replace(loaded(adapters_model(tiny_base, 10, seed=31), "t", seed=1), version="2")
    engine.manager.add_adapter(new)
    assert old.retired and old.slot is not None, "still used by a running sequence"
    decode_to_completion(engine, [running])
    assert old.slot is None and engine.manager.adapters["t"].version == "2"
    assert torch.equal(engine.manager.runtimes["vlm"].layer_weights(engine.manager.adapters["t"].slot, 0).up_bias,
                       new.adapter_tensors["transformer.h.0.output_adapters.adapters.t.adapter_up.bias"])


def test_min_tokens_and_ignore_eos_fix_output_lengths(engine):
    """Adapter "b" ends after one token here; vLLM's min_tokens and ignore_eos keep it going."""
    plain = decode_to_completion(engine, [greedy(engine, "b", MRS[0], 20)])[0]
    assert plain.finish_reason == "stop" and len(plain.output_ids) < 5, "the test needs an early EOS"
    at_least = engine.new_sequence("b", MRS[0], sampling_params(max_new_tokens=20, min_tokens=5))
    no_eos = engine.new_sequence("b", MRS[0], sampling_params(max_new_tokens=12, ignore_eos=True))
    decode_to_completion(engine, [at_least, no_eos])
    assert len(at_least.output_ids) >= 5
    assert no_eos.finish_reason == "length" and len(no_eos.output_ids) == 12
    with pytest.raises(HubError, match="min_tokens"):
        sampling_params(max_new_tokens=4, min_tokens=5)


def test_stop_strings_count_only_after_min_tokens(engine):
    plain = decode_to_completion(engine, [greedy(engine, "c", MRS[0], 12)])[0]
    word = engine.backbone.tokenizer.decode(plain.output_ids[1:2]).strip()
    assert plain.text.find(word) < 6, "the stop string occurs early in the plain text"
    late = decode_to_completion(engine, [engine.new_sequence("c", MRS[0], sampling_params(max_new_tokens=12, stop=word,
                                                                          min_tokens=6))])[0]
    assert len(late.output_ids) >= 6 and late.text.startswith(plain.text[:6])


def test_a_request_for_a_non_resident_adapter_waits_for_a_busy_slot(tiny_base):
    """One resident slot, held by a long sequence: a request for another adapter queues (no 429) and runs
    once the slot frees, with the output it has alone."""
    engine = Engine(load_backbone(str(tiny_base), "cpu"), make_task, ManagerSettings(max_resident=1))
    for i, name in enumerate(["x", "y"]):
        engine.manager.add_adapter(loaded(adapters_model(tiny_base, 10, seed=40 + i), name, seed=i))
    expected = decode_to_completion(engine, [greedy(engine, "y", MRS[1], 4)])[0].output_ids
    scheduler = Scheduler(engine, max_batch=4)
    long = greedy(engine, "x", MRS[0], 30)
    finished_at, done, later = {}, threading.Event(), []

    def on_update(seq):
        if seq is long and len(seq.output_ids) == 2:  # x holds the only slot now
            later.append(greedy(engine, "y", MRS[1], 4))
            later[0].on_update = on_update
            scheduler.submit(later[0])
        if seq.finished:
            finished_at[seq.id] = scheduler.steps
            done.set() if len(finished_at) == 2 else None

    long.on_update = on_update
    scheduler.start()
    scheduler.submit(long)
    assert done.wait(60)
    scheduler.stop(10)
    short = later[0]
    assert long.finish_reason == "length" and short.output_ids == expected
    assert finished_at[short.id] > finished_at[long.id], "y waited for x's slot"
    assert engine.manager.adapters["x"].in_use == engine.manager.adapters["y"].in_use == 0


def test_long_prompts_prefill_in_chunks_while_running_rows_decode(engine):
    long_mr = "name[The Mill], customer rating[5 out of 5], area[riverside], food[Italian], near[Café Sicilia]"
    solo = [decode_to_completion(engine, [greedy(engine, t, mr, 8)])[0].output_ids for t, mr in (("a", MRS[0]), ("b", long_mr))]
    batch = DecodeBatch(engine, prefill_chunk=4)
    running, joining = greedy(engine, "a", MRS[0], 8), greedy(engine, "b", long_mr, 8)
    assert engine.bind(running) and engine.bind(joining) and len(joining.prompt_ids) > 12
    batch.join([running])
    batch.step()
    batch.join([joining])
    decoded_while_prefilling = 0
    while batch.prefilling:
        before = len(running.output_ids)
        batch.step()
        decoded_while_prefilling += len(running.output_ids) - before
    assert decoded_while_prefilling >= 2
    while batch.busy:
        batch.step()
    assert [running.output_ids, joining.output_ids] == solo


def test_incremental_text_equals_decoding_everything(engine):
    tokenizer = engine.backbone.tokenizer
    ids = tokenizer.encode("Café Rouge, 日本語 and 🙂 near the riverside.")
    text = IncrementalText(tokenizer)
    for n in range(1, len(ids) + 1):
        partial = text.extend(ids[:n])
        assert "\ufffd" not in partial and tokenizer.decode(ids).startswith(partial)
    assert text.extend(ids) == text.final(ids) == tokenizer.decode(ids)


def test_adapters_beyond_the_cpu_tier_are_read_from_the_store_when_needed(tiny_base):
    """`add_stored` reads nothing; a request reads the weights; beyond `max_cpu_adapters` the least recently
    used adapters off the device drop their CPU copy and are read again, with the same outputs."""
    engine = Engine(load_backbone(str(tiny_base), "cpu"), make_task, ManagerSettings(max_resident=1, max_cpu_adapters=1))
    reads: list[str] = []
    weights = {name: loaded(adapters_model(tiny_base, 10, seed=50 + i), name, seed=i)
               for i, name in enumerate(["x", "y", "z"])}

    def fetch(name):
        reads.append(name)
        return weights[name]

    for name, adapter in weights.items():
        engine.manager.add_stored(name, adapter.version, adapter.meta, lambda name=name: fetch(name))
    assert reads == [] and all(a.bundle is None for a in engine.manager.adapters.values())
    reference = Engine(load_backbone(str(tiny_base), "cpu"), make_task)
    for adapter in weights.values():
        reference.manager.add_adapter(adapter)
    expected = {n: decode_to_completion(reference, [greedy(reference, n, MRS[0])])[0].output_ids for n in weights}
    for name in ["x", "y", "z", "x"]:
        assert decode_to_completion(engine, [greedy(engine, name, MRS[0])])[0].output_ids == expected[name]
    assert reads == ["x", "y", "z", "x"], "x's CPU copy was dropped (LRU) while z ran and y kept it"
    held = [n for n, a in engine.manager.adapters.items() if a.bundle is not None and a.slot is None]
    assert len(held) <= 1 and engine.manager.resident_count() == 1


def test_an_adapter_that_no_longer_loads_fails_its_request_alone(tiny_base):
    engine = Engine(load_backbone(str(tiny_base), "cpu"), make_task, ManagerSettings(max_cpu_adapters=0))
    good = loaded(adapters_model(tiny_base, 10, seed=60), "good", seed=0)

    def broken():
        raise IntegrityError("adapter.safetensors of 'bad@1' is corrupted or modified (sha256 mismatch)")

    engine.manager.add_stored("good", good.version, good.meta, lambda: good)
    engine.manager.add_stored("bad", good.version, good.meta, broken)
    scheduler = Scheduler(engine, max_batch=4)
    sequences = [greedy(engine, "bad", MRS[0], 4), greedy(engine, "good", MRS[1], 4)]
    done = threading.Event()
    for sequence in sequences:
        sequence.on_update = lambda s: done.set() if all(q.finished for q in sequences) else None
    scheduler.start()
    for sequence in sequences:
        scheduler.submit(sequence)
    assert done.wait(60)
    scheduler.stop(10)
    bad, ok = sequences
    assert bad.finish_reason == "error" and isinstance(bad.error, AdapterLoadError)
    assert "bad@1 could not be loaded" in str(bad.error) and "sha256" in str(bad.error)
    assert ok.finish_reason in ("stop", "length") and ok.output_ids
    assert engine.manager.adapters["bad"].in_use == engine.manager.adapters["good"].in_use == 0


def test_a_half_precision_bank_decodes_like_a_float32_one(tiny_base):
    """`--bank-dtype float16`: half the bytes per decode step; the tiny model's greedy tokens stay the same."""
    outputs = {}
    for dtype in (torch.float32, torch.float16):
        engine = Engine(load_backbone(str(tiny_base), "cpu"), make_task, ManagerSettings(bank_dtype=dtype))
        for i, name in enumerate(["x", "y", "z"]):
            engine.manager.add_adapter(loaded(adapters_model(tiny_base, 10, seed=70 + i), name, seed=i))
        outputs[dtype] = [s.output_ids for s in decode_to_completion(engine, [greedy(engine, n, MRS[0]) for n in "xyz"])]
        assert {b.down[0].dtype for b in engine.manager.runtimes["vlm"].buckets.values()} == {dtype}
        engine.close()
    assert outputs[torch.float16] == outputs[torch.float32]
    with pytest.raises(HubError, match="bank_dtype must be one of float32, bfloat16, float16"):
        ServiceSettings(bank_dtype="int8")
