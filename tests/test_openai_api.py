"""The OpenAI fields evaluation tools and benchmarks send, against a real `hub serve` (the official `openai` client
and httpx): logprobs, echo with token-id prompts and max_tokens 0, n, lists of prompts, the penalties, chat
content parts, stream_options, /v1/models with parent and version. Each choice is its own row of the fused batch:
a row's settings never touch its neighbours."""

from __future__ import annotations

import json
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from transformers import AutoTokenizer

from tests.test_server import MR, MRS, TASKS, sse_data
from tests.test_server import client, openai_client, second_run, server, store  # noqa: F401  (fixtures)

TOKENS = [464, 3290, 318, 257, 1049, 1110, 11, 290]


def complete(client: httpx.Client, **fields) -> dict:
    response = client.post("/v1/completions", json={"model": "e2e", "max_tokens": 6, "temperature": 0, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_logprobs_and_echo_with_token_ids_score_the_prompt(client, tiny_base):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs 1, max_tokens 0."""
    body = complete(client, prompt=TOKENS, echo=True, logprobs=1, max_tokens=0)
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in TOKENS]
    assert choice["text"] == "".join(logprobs["tokens"])
    assert logprobs["token_logprobs"][0] is None and all(v < 0 for v in logprobs["token_logprobs"][1:])
    assert logprobs["top_logprobs"][0] is None and all(1 <= len(t) <= 2 for t in logprobs["top_logprobs"][1:])
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"][1] == len(logprobs["tokens"][0])
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == len(TOKENS)
    # the same tokens scored while generating after them
    longer = complete(client, prompt=TOKENS, echo=True, logprobs=3, max_tokens=4)["choices"][0]["logprobs"]
    assert longer["token_logprobs"][:len(TOKENS)] == pytest.approx(logprobs["token_logprobs"], abs=1e-5)
    assert len(longer["tokens"]) == len(TOKENS) + 4 and all(len(t) >= 3 for t in longer["top_logprobs"][1:])


def test_logprobs_of_generated_tokens_with_the_official_client(openai_client):
    completion = openai_client.completions.create(model="e2e", prompt=MR, max_tokens=5, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens).lstrip() == completion.choices[0].text
    assert len(logprobs.token_logprobs) == completion.usage.completion_tokens
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        text_tokens = [v for t, v in top.items() if not (t.startswith("<") and t.endswith(">"))]
        assert top[token] == pytest.approx(value) and value == pytest.approx(max(text_tokens))  # greedy
    chat = openai_client.chat.completions.create(model="e2e", messages=[{"role": "user", "content": MR}],
                                                 max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob <= c.top_logprobs[0].logprob + 1e-6 and c.bytes for c in content)


def test_n_and_a_list_of_prompts_give_every_choice_in_order(client):
    solo = [complete(client, prompt=mr)["choices"][0]["text"] for mr in MRS[:3]]
    body = complete(client, prompt=MRS[:3], n=2)
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert [c["text"] for c in body["choices"]] == [t for t in solo for _ in range(2)]
    seeded = complete(client, prompt=MR, n=3, temperature=1.0, seed=5)
    again = complete(client, prompt=MR, n=3, temperature=1.0, seed=5)
    assert [c["text"] for c in seeded["choices"]] == [c["text"] for c in again["choices"]]
    batch = complete(client, prompt=[TOKENS, TOKENS[:4]], max_tokens=2)
    assert len(batch["choices"]) == 2 and batch["usage"]["prompt_tokens"] == len(TOKENS) + 4


def test_penalised_rows_leave_their_neighbours_alone(client):
    """Concurrent requests with and without penalties: the plain ones equal their solo results."""
    plain = {mr: complete(client, prompt=mr, max_tokens=12)["choices"][0]["text"] for mr in MRS[:3]}
    settings = [{"repetition_penalty": 1.8}, {"no_repeat_ngram_size": 2}, {"presence_penalty": 2.0,
                                                                           "frequency_penalty": 1.5}, {}]
    jobs = [(mr, extra) for mr in MRS[:3] for extra in settings]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda job: complete(client, prompt=job[0], max_tokens=12, **job[1])
                              ["choices"][0]["text"], jobs))
    for (mr, extra), text in zip(jobs, texts):
        if not extra:
            assert text == plain[mr]
    generate = client.post("/v1/generate", json={"task": "e2e", "input": MR, "max_new_tokens": 6,
                                                 "repetition_penalty": 1.3, "logprobs": 1, "prompt_logprobs": 0})
    assert generate.status_code == 200
    assert len(generate.json()["logprobs"]) == generate.json()["usage"]["completion_tokens"]
    assert generate.json()["prompt_logprobs"][0]["logprob"] is None


def test_chat_content_parts_and_stream_options(openai_client, client):
    parts = [{"type": "text", "text": "Describe the restaurant."}]
    messages = [{"role": "system", "content": parts}, {"role": "user", "content": [{"type": "text", "text": MR}]}]
    plain = openai_client.chat.completions.create(model="e2e", messages=messages, max_tokens=6, temperature=0)
    as_strings = openai_client.chat.completions.create(
        model="e2e", max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "Describe the restaurant."}, {"role": "user", "content": MR}])
    assert plain.choices[0].message.content == as_strings.choices[0].message.content
    chunks = list(openai_client.chat.completions.create(model="e2e", messages=messages, max_tokens=6,
                                                        temperature=0, stream=True, n=2,
                                                        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2 * plain.usage.completion_tokens
    for index in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1] if c.choices[0].index == index)
        assert text == plain.choices[0].message.content
    response = client.post("/v1/completions", json={"model": "e2e", "prompt": MR, "max_tokens": 3, "stream": True,
                                                    "stream_options": {"include_usage": True,
                                                                       "continuous_usage_stats": True}})
    events = [json.loads(d) for d in sse_data(response) if d != "[DONE]"]
    assert all("usage" in e for e in events) and events[-1]["choices"] == []


@pytest.mark.parametrize("body, words", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "image_url"),
    ({"messages": [{"role": "user", "content": MR}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": MR}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": MR, "logprobs": 21}, "logprobs"),
    ({"prompt": MR, "n": 17}, "n"),
    ({"prompt": MR, "max_tokens": 0}, "max_tokens"),
    ({"prompt": MR, "logprobs": 1, "stream": True}, "logprobs"),
    ({"prompt": [MR] * 33, "n": 2}, "n"),
    ({"prompt": [[1, -2]]}, "prompt"),
    ({"prompt": [1, 10**9]}, "token ids"),
    ({"prompt": MR, "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": MR, "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": MR, "no_repeat_ngram_size": 99}, "no_repeat_ngram_size"),
])
def test_bad_fields_are_422_naming_the_field(client, body, words):
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = client.post(route, json={"model": "e2e", **body})
    assert response.status_code == 422, response.text
    assert words in json.dumps(response.json())


def test_models_name_their_parent_and_version(client, tiny_base):
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == list(TASKS)
    assert all(m["parent"] == tiny_base.name and m["version"] == "1" for m in data)


def test_metrics_follow_the_model_server_protocol(client):
    """A scrape parsed as the inference gateway reads it: every protocol metric with its type and labels; while a
    request streams, it is counted as running and its adapter is named in vllm:lora_requests_info."""
    from prometheus_client.parser import text_string_to_metric_families

    from server.prometheus import MODEL_SERVER_PROTOCOL

    def scrape() -> dict:
        return {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}

    body = {"model": "e2e-b", "prompt": MR, "max_tokens": 100, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        next(response.iter_lines())
        during = scrape()
    for name, (kind, labels) in MODEL_SERVER_PROTOCOL.items():
        assert during[name].type == kind and len(during[name].samples) == 1
        assert set(during[name].samples[0].labels) == set(labels)
    info = during["vllm:lora_requests_info"].samples[0]
    assert "e2e-b" in info.labels["running_lora_adapters"].split(",")
    assert int(info.labels["max_lora"]) >= 1 and info.value > 0
    assert during["vllm:num_requests_running"].samples[0].value >= 1
    assert 0 < during["vllm:kv_cache_usage_perc"].samples[0].value <= 1
    residency = {(s.labels["task"], s.labels["tier"]) for s in during["hub_adapter_tier"].samples if s.value}
    assert ("e2e-b", "device") in residency and {task for task, _ in residency} == set(TASKS)
    assert {s.labels["task"] for s in during["hub_requests"].samples} >= {"e2e-b"}


def test_tokenize_and_detokenize_round_trip(client, tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    body = client.post("/tokenize", json={"model": "e2e", "prompt": "The Eagle is a coffee shop."}).json()
    assert body["tokens"] == tokenizer.encode("The Eagle is a coffee shop.") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 128
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {
        "prompt": "The Eagle is a coffee shop."}
    assert client.post("/detokenize", json={"tokens": [10**7]}).status_code == 422


def test_vllm_load_and_unload_lora_adapter(client, store, trained_run, tmp_path):
    """A run directory and an AdapterHub folder (`hub export`) are published and served at once; unloading stops
    serving; all behind the admin token."""
    from hub.interop import export_adapterhub
    from hub.store.local import AdapterStore
    from tests.test_server import AUTH

    assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(trained_run)}
                       ).status_code == 401
    folder = export_adapterhub(Path(AdapterStore(store).show("e2e").path), tmp_path / "adapterhub")
    for name, path in (("loaded-run", trained_run), ("loaded-hub", folder)):
        response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                               headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["version"] == "1"
        assert complete(client, model=name, prompt=MR)["choices"][0]["text"] == complete(
            client, prompt=MR)["choices"][0]["text"]
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["loaded-hub"]["version"] == "1" and models["loaded-hub"]["parent"]
    missing = client.post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": str(tmp_path / "none")},
                          headers=AUTH)
    assert missing.status_code == 422 and "not a folder" in missing.json()["detail"]
    for name in ("loaded-run", "loaded-hub"):
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=AUTH).status_code == 200
        assert client.post("/v1/completions", json={"model": name, "prompt": MR}).status_code == 404
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "never"}, headers=AUTH).status_code == 404
