"""Per-request composition (AdapterHub's Average and Stack) in the fused batch: the kind's arithmetic equals the
`adapters` library row by row (prefill and decode paths), composed requests decode the same greedy tokens as a
plain transformers + adapters model with the same block, and the HTTP routes check what they are given."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from adapters.composition import Average, Stack
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from hub.adapters.base import AVERAGE, STACK, RowState, SlotComposition
from hub.adapters.vlm import VlmRuntime, stack_layers, vlm_adapter_config
from hub.adapters.vlm_format import adapter_layers
from hub.errors import HubError
from hub.interop import load_composition, quiet_adapter_activation
from hub.model.backbone import load_backbone
from hub.serving.batch import decode_to_completion
from hub.serving.composition import Composition, check_members, resolve_composition
from hub.serving.engine import Engine, SamplingParams
from hub.serving.service import ServiceSettings
from hub.store.local import AdapterStore
from tasks import make_task

RANKS = {"a": 8, "b": 4, "c": 6}


@pytest.fixture(scope="module")
def library_model():
    """A tiny GPT-2 with three VLM adapters of different bottlenecks (random, large enough to matter)."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    base = GPT2LMHeadModel(config).eval()
    model = GPT2LMHeadModel(config).eval()
    model.load_state_dict(base.state_dict())
    import adapters

    adapters.init(model)
    for name, rank in RANKS.items():
        model.add_adapter(name, config=vlm_adapter_config(config.n_embd, rank))
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if ".adapters." in key:
                parameter.copy_(torch.randn_like(parameter) * 0.3)
    state = model.state_dict()
    bundles = {name: stack_layers(adapter_layers(
        {k: v for k, v in state.items() if f".adapters.{name}." in k and "norm_before" not in k}, name))
        for name in RANKS}
    return base, model, bundles


def library_logits(model, setup, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), quiet_adapter_activation():
        model.set_active_adapters(setup)
        return model(ids).logits


ROWS = [  # (setup for the library, the hub's row)
    ("a", None),
    (Average("a", "b", weights=[2.0, 1.0]), (AVERAGE, ("a", "b"), (2 / 3, 1 / 3))),
    (Stack("b", "c"), (STACK, ("b", "c"), (1.0, 1.0))),
    (None, None),
    (Average("a", "b", "c"), (AVERAGE, ("a", "b", "c"), (1 / 3,) * 3)),
    (Stack("c", "a", "b"), (STACK, ("c", "a", "b"), (1.0,) * 3)),
    ("b", None),
]


@pytest.mark.parametrize("length", [7, 1], ids=["prefill", "decode-step"])
def test_composed_rows_equal_the_adapters_library_in_one_batch(library_model, length):
    base, model, bundles = library_model
    runtime = VlmRuntime(base)
    slots = {name: runtime.add(bundle) for name, bundle in bundles.items()}
    rows = []
    for setup, composed in ROWS:
        if composed is None:
            rows.append(RowState(slots[setup]) if setup else RowState())
        else:
            block, names, weights = composed
            rows.append(RowState(slots[names[0]], composition=SlotComposition(
                block, tuple(slots[n] for n in names), weights)))
    ids = torch.randint(0, 100, (len(ROWS), length), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad(), runtime.active(runtime.make_plan(rows)):
            fused = base(ids).logits
        assert not any(block.mlp._forward_hooks for block in base.transformer.h), "FFN hooks only while averaging"
    finally:
        runtime.close()
    for i, (setup, _) in enumerate(ROWS):
        if setup is None:
            with torch.no_grad():
                expected = base(ids[i : i + 1]).logits
        else:
            expected = library_logits(model, setup, ids[i : i + 1])
        assert torch.allclose(fused[i : i + 1], expected, atol=1e-5), (i, setup)


def test_the_blocks_differ_from_their_plausible_alternatives(library_model):
    """What the test above tells apart: a weighted sum of the deltas is not the library's Average (it divides the
    FFN output by k too), the weights are normalised, and a stack is not an average."""
    base, model, bundles = library_model
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(2))
    average = library_logits(model, Average("a", "b", weights=[2.0, 1.0]), ids)
    assert torch.allclose(average, library_logits(model, Average("a", "b", weights=[4.0, 2.0]), ids), atol=1e-6)
    assert (average - library_logits(model, Average("a", "b"), ids)).abs().max() > 1e-3
    assert (average - library_logits(model, Stack("a", "b"), ids)).abs().max() > 1e-3
    runtime = VlmRuntime(base)
    a, b = runtime.add(bundles["a"]), runtime.add(bundles["b"])
    try:  # h + Σ w̄_i δ_i(h): the composed row's stage with factors w̄_i and without the FFN term
        plan = runtime.make_plan([RowState(a, composition=SlotComposition(AVERAGE, (a, b), (4 / 3, 2 / 3)))])
        with torch.no_grad(), runtime.active(dataclasses.replace(plan, averaged=None)):
            weighted_sum = base(ids).logits
    finally:
        runtime.close()
    assert (average - weighted_sum).abs().max() > 1e-3


# -- the value a request carries ---------------------------------------------------------------------------------
def test_a_composition_is_checked_and_normalised():
    composition = Composition.build("average", ["a", "b"], [0.7, 0.7])
    assert composition.weights == (0.5, 0.5) and composition.layout == "a"
    assert Composition.build("stack", ["a", "b"], layout="b").layout == "b"
    for args, message in [(("mix", ["a", "b"]), "one of average, stack"),
                          (("stack", ["a"]), "2 to 4 adapters"),
                          (("stack", list("abcde")), "2 to 4 adapters"),
                          (("average", ["a", "a"]), "once"),
                          (("average", ["a", "b"], [1.0]), "need 2 weights"),
                          (("average", ["a", "b"], [1.0, 0.0]), "above 0"),
                          (("average", ["a", "b"], [1.0, float("nan")]), "finite"),
                          (("average", ["a", "b"], [1e308, 1e308]), "sum to a finite number"),
                          (("stack", ["a", "b"], [2.0, 1.0]), "no weights")]:
        with pytest.raises(HubError, match=message):
            Composition.build(*args)
    with pytest.raises(HubError, match="not one of the composed adapters"):
        Composition.build("stack", ["a", "b"], layout="c")


def test_members_must_share_a_prompt_layout_and_be_composable():
    composition = Composition.build("stack", ["x", "y"])
    e2e, persona, translate, summarize = (make_task(t) for t in ("e2e", "persona", "translate", "summarize"))
    check_members(Composition.build("stack", ["t", "s"]), ["vlm", "vlm"], [translate, summarize], None)
    with pytest.raises(HubError, match="must share a prompt layout: 'x' is e2e, 'y' is persona"):
        check_members(composition, ["vlm", "vlm"], [e2e, persona], None)
    with pytest.raises(HubError, match="sentence_vae adapter, which cannot be composed"):
        check_members(composition, ["vlm", "sentence_vae"], [e2e, e2e], None)
    with pytest.raises(HubError, match="needs as many device slots; this server has 1"):
        check_members(composition, ["vlm", "vlm"], [e2e, e2e], 1)


# -- stored adapters: the engine against plain transformers + adapters ------------------------------------------
def perturbed_export(run_export, out, seed: int):
    """The trained run's export with other weights (a 6-step adapter is near zero: compositions would not show)."""
    shutil.copytree(run_export, out)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(out / "adapter.safetensors")
    save_file({k: (v + torch.randn(v.shape, generator=generator) * 1.5).contiguous() for k, v in tensors.items()},
              out / "adapter.safetensors")
    rows = load_file(out / "task_tokens.safetensors")
    save_file({k: (v + torch.randn(v.shape, generator=generator)).contiguous() for k, v in rows.items()},
              out / "task_tokens.safetensors")
    return out


@pytest.fixture(scope="module")
def composed_store(trained_run, tmp_path_factory) -> AdapterStore:
    root = tmp_path_factory.mktemp("compose")
    store = AdapterStore(root / "store")
    for seed, name in enumerate(("style_a", "style_b", "style_c")):
        store.publish(perturbed_export(trained_run / "best", root / name, seed), name=name)
    return store


def plain_logprobs(plain, source, output_ids: list[int]) -> torch.Tensor:
    """Log-probabilities of the generated tokens in the plain model (new tokens typed by the last prompt type)."""
    inputs = plain.encode(source, MAX_NEW)
    ids, types = inputs["input_ids"], inputs["token_type_ids"]
    width = ids.shape[1]
    ids = torch.cat([ids, torch.tensor([output_ids])], 1)
    types = torch.cat([types, types[:, -1:].repeat(1, len(output_ids))], 1)
    with torch.no_grad():
        logits = plain.model(input_ids=ids, token_type_ids=types).logits[0, width - 1 : -1]
    return logits.log_softmax(-1)[torch.arange(len(output_ids)), torch.tensor(output_ids)]


CASES = [  # block, adapters, weights, layout index
    (STACK, ("style_a", "style_b"), (1.0, 1.0), 0),
    (AVERAGE, ("style_a", "style_b"), (0.7, 0.3), 0),
    (AVERAGE, ("style_c", "style_a", "style_b"), (1.0, 2.0, 1.0), 1),
    (STACK, ("style_b", "style_c", "style_a"), (1.0, 1.0, 1.0), 2),
]
MAX_NEW = 10


def test_composed_requests_in_one_batch_decode_as_plain_adapters(composed_store, tiny_base, e2e_dir):
    sources = list(dict.fromkeys(e.source for e in make_task("e2e").load_examples(str(e2e_dir), "test")))[:4]
    engine = Engine(load_backbone(tiny_base, "cpu"), make_task)
    for name in ("style_a", "style_b", "style_c"):
        engine.manager.add_adapter(composed_store.load(name))
    sequences, expected, references = [], [], []
    for block, names, weights, layout in CASES:
        composition = Composition.build(block, names, weights if block == AVERAGE else None, names[layout])
        composed = resolve_composition(composition, engine.manager.resolve, None)
        paths = [composed_store.show(n).path for n in names]
        plain = load_composition(GPT2LMHeadModel.from_pretrained(tiny_base), block, paths,
                                 composition.weights, layout)
        for source in sources:
            sequences.append(engine.new_sequence(None, source, SamplingParams(max_new_tokens=MAX_NEW, logprobs=0),
                                                 composed=composed))
            expected.append(plain.generate_ids(source, MAX_NEW))
            references.append(plain_logprobs(plain, source, expected[-1]))
    singles = [engine.new_sequence("style_a", s, SamplingParams(max_new_tokens=MAX_NEW)) for s in sources]
    done = decode_to_completion(engine, sequences + singles)  # one fused batch: compositions beside plain rows
    assert [s.output_ids for s in done[: len(expected)]] == expected
    for sequence, reference in zip(done, references):  # and the numbers behind the tokens, to 1e-4
        assert [e.id for e in sequence.logprobs] == sequence.output_ids
        assert torch.allclose(torch.tensor([e.logprob for e in sequence.logprobs]), reference, atol=1e-4)
    assert len({tuple(ids) for ids in expected}) > 2  # the compositions decode differently from each other
    assert all(a.in_use == 0 and a.active == 0 for a in engine.manager.known())


# -- through HTTP ------------------------------------------------------------------------------------------------
MR = "name[The Eagle], eatType[coffee shop], food[French]"


@pytest.fixture(scope="module")
def client(composed_store, tiny_base, tmp_path_factory):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.keys import KeySpec, digest, write_keys

    keys = tmp_path_factory.mktemp("compose-keys") / "keys.toml"
    write_keys(keys, [KeySpec("all", digest("all-secret"), ("style_*",)),
                      KeySpec("one", digest("one-secret"), ("style_a",))])
    app = create_app(load_backbone(tiny_base, "cpu"), composed_store, ServiceSettings(max_resident=3), keys=keys)
    with TestClient(app, headers={"Authorization": "Bearer all-secret"}) as client:
        yield client


def plain_text(store, base, block, names, weights, layout=0) -> str:
    paths = [store.show(n).path for n in names]
    composition = Composition.build(block, names, weights if block == AVERAGE else None)
    plain = load_composition(GPT2LMHeadModel.from_pretrained(base), block, paths, composition.weights, layout)
    return plain.generate(MR, MAX_NEW)


def test_generate_with_a_composition_answers_what_plain_adapters_decode(client, composed_store, tiny_base):
    body = {"input": MR, "max_new_tokens": MAX_NEW,
            "compose": {"average": [{"task": "style_a", "weight": 0.7}, {"task": "style_b", "weight": 0.3}]}}
    answer = client.post("/v1/generate", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["task"] == "style_a" and result["composed"] == ["style_a@1", "style_b@1"]
    assert result["text"] == plain_text(composed_store, tiny_base, AVERAGE, ("style_a", "style_b"), (0.7, 0.3))
    stacked = client.post("/v1/generate", json={**body, "task": "style_b",
                                                "compose": {"stack": ["style_a", "style_b"]}}).json()
    assert stacked["task"] == "style_b"
    assert stacked["text"] == plain_text(composed_store, tiny_base, STACK, ("style_a", "style_b"), None, layout=1)
    events = client.post("/v1/generate", json={**body, "stream": True}).text
    assert '"composed": ["style_a@1", "style_b@1"]' in events


def test_the_openai_routes_take_compose_as_an_extra_field(client):
    compose = {"stack": ["style_c", "style_a"]}
    completion = client.post("/v1/completions", json={"model": "style_c", "prompt": MR, "max_tokens": 4,
                                                      "temperature": 0, "compose": compose})
    assert completion.status_code == 200, completion.text
    assert completion.json()["model"] == "style_c"
    chat = client.post("/v1/chat/completions", json={"model": "style_a", "max_tokens": 4, "compose": compose,
                                                     "messages": [{"role": "user", "content": MR}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == "style_a"


@pytest.mark.parametrize("body, status, message", [
    ({"compose": {"average": [{"task": "style_a"}, {"task": "style_b"}], "stack": ["style_a", "style_b"]}}, 422,
     "exactly one of"),
    ({"compose": {"stack": ["style_a", "style_b", "style_c", "style_a", "style_b"]}}, 422, "at most 4"),
    ({"compose": {"stack": ["style_a", "style_a"]}}, 422, "once"),
    ({"compose": {"average": [{"task": "style_a", "weight": 0}, {"task": "style_b"}]}}, 422, "greater than 0"),
    ({"compose": {"stack": ["style_a", "style_b"], "fuse": True}}, 422, "xtra"),
    ({"task": "style_c", "compose": {"stack": ["style_a", "style_b"]}}, 422, "not one of the composed adapters"),
    ({}, 422, "name a 'task'"),
    ({"compose": {"stack": ["style_a", "style_nope"]}}, 404, "unknown task 'style_nope'"),
])
def test_bad_compositions_are_refused_with_the_reason(client, body, status, message):
    answer = client.post("/v1/generate", json={"input": MR, "max_new_tokens": 2, **body})
    assert answer.status_code == status, answer.text
    assert message in answer.text


def test_a_key_may_compose_only_adapters_in_its_scope(client):
    one = {"Authorization": "Bearer one-secret"}
    body = {"input": MR, "max_new_tokens": 2}
    assert client.post("/v1/generate", json={**body, "task": "style_a"}, headers=one).status_code == 200
    refused = client.post("/v1/generate", json={**body, "compose": {"stack": ["style_a", "style_b"]}}, headers=one)
    assert refused.status_code == 403 and "style_b" in refused.text


def test_compositions_sharing_two_slots_never_wait_for_each_other(composed_store, tiny_base):
    """Three compositions over three adapters and two device slots, beside single requests: every one finishes
    (a composition's adapters are made resident all at once, evicting adapters only waiting requests hold), and
    every adapter is given back."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from server.app import create_app

    service_settings = ServiceSettings(max_resident=2, max_batch=4, request_timeout=60)  # a deadlock: 504s
    app = create_app(load_backbone(tiny_base, "cpu"), composed_store, service_settings)
    pairs = [("style_a", "style_b"), ("style_b", "style_c"), ("style_c", "style_a")]
    bodies = [{"input": MR, "max_new_tokens": 3, "ignore_eos": True, "compose": {"stack": list(p)}} for p in pairs]
    bodies += [{"input": MR, "max_new_tokens": 3, "ignore_eos": True, "task": name} for pair in pairs for name in pair]
    with TestClient(app) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: client.post("/v1/generate", json=body), bodies * 3))
        assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers if a.status_code != 200]
        manager = app.state.hub.manager
        assert all(a.in_use == 0 and a.active == 0 for a in manager.known())
        assert manager.resident_count() <= 2
    too_wide = Composition.build("stack", ["style_a", "style_b", "style_c"])
    with pytest.raises(HubError, match="needs as many device slots; this server has 2"):
        resolve_composition(too_wide, manager.resolve, 2)
