"""Log-probabilities, echo and repetition controls in the fused batch: the numbers equal a plain forward pass of
the same adapter (the `adapters` library's model with its task rows), and every row keeps its own settings
whatever shares its batch."""

from __future__ import annotations

import pytest
import torch

from hub.errors import HubError
from hub.serving.batch import decode_to_completion
from hub.serving.penalties import banned_ngram_tokens
from hub.serving.sampling import SamplingParams, sampling_params
from hub.serving.sequence import TokenPrompt
from tests.test_adapter import adapters_model, loaded
from tests.test_serving_core import MR, new_engine

PROMPT = TokenPrompt((464, 3290, 318, 257, 1049, 1110, 11, 290))
TOL = 1e-4


@pytest.fixture(scope="module")
def reference(tiny_base):
    """The plain model of adapter "hot" and its task rows."""
    model = adapters_model(tiny_base, 10, seed=80)
    return model, loaded(model, "hot", seed=0)


@pytest.fixture(scope="module")
def engine(tiny_base, reference):
    engine = new_engine(tiny_base)
    engine.manager.add_adapter(reference[1])
    for i, name in enumerate(["other", "third"], start=1):
        engine.manager.add_adapter(loaded(adapters_model(tiny_base, 10, seed=80 + i), name, seed=i))
    return engine


def plain_log_probs(reference, ids: list[int]) -> torch.Tensor:
    """Every position's log-probabilities over the base vocabulary and the adapter's own task tokens."""
    model, adapter = reference
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        task = out.hidden_states[-1][0] @ adapter.token_rows.T
    return torch.cat([out.logits[0], task], dim=-1).log_softmax(-1)


def test_generated_and_prompt_logprobs_equal_a_plain_forward_pass_in_a_mixed_batch(engine, reference):
    params = sampling_params(max_new_tokens=6, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    neighbours = [engine.new_sequence("other", MR, sampling_params(max_new_tokens=6, temperature=1.0, seed=1,
                                                                   repetition_penalty=1.5, logprobs=5)),
                  engine.new_sequence("third", PROMPT, sampling_params(max_new_tokens=3, presence_penalty=2.0))]
    seq = engine.new_sequence("hot", PROMPT, params)
    decode_to_completion(engine, [neighbours[0], seq, neighbours[1]])
    ids = list(PROMPT.ids) + seq.output_ids
    expected = plain_log_probs(reference, ids)
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(PROMPT.ids)
    scored = seq.prompt_logprobs[1:] + seq.logprobs
    assert len(seq.logprobs) == 6 == len(seq.output_ids)
    for position, entry in enumerate(scored):
        row = expected[position]
        assert entry.id == ids[position + 1]
        assert abs(entry.logprob - float(row[entry.id])) < TOL
        top_values, top_ids = row.topk(len(entry.top))
        assert [i for i, _ in entry.top] == top_ids.tolist()
        assert all(abs(v - float(t)) < TOL for (_, v), t in zip(entry.top, top_values))
    assert len(seq.logprobs[0].top) == 3 and len(seq.prompt_logprobs[1].top) == 2
    assert len(neighbours[0].logprobs[0].top) == 5 and not neighbours[1].logprobs


def test_task_tokens_are_numbered_and_named_as_in_the_adapters_own_model(engine):
    from hub.serving.logprobs import rendered, rendered_logprobs

    seq = engine.new_sequence("hot", MR, sampling_params(max_new_tokens=3, prompt_logprobs=1, logprobs=1))
    decode_to_completion(engine, [seq])
    vocab = engine.backbone.vocab_size
    task = seq.adapter.task
    marker = seq.prompt_logprobs[1]  # the first slot's marker follows the task's BOS
    assert marker.id >= vocab and rendered(seq, marker).token == task.special_tokens[marker.id - vocab]
    text = rendered(seq, seq.prompt_logprobs[2])
    assert text.token == engine.backbone.tokenizer.decode([seq.prompt_ids[2]]) and text.bytes
    assert text.token in dict(text.top)
    fields = rendered_logprobs(seq)
    assert fields["prompt_logprobs"][0].token == task.bos and fields["prompt_logprobs"][0].logprob is None
    assert len(fields["prompt_logprobs"]) == len(seq.prompt_ids) and len(fields["logprobs"]) == len(seq.output_ids)


def test_echo_with_no_new_tokens_scores_the_prompt_only(engine, reference):
    seq = engine.new_sequence("hot", PROMPT, sampling_params(max_new_tokens=0, prompt_logprobs=1))
    other = engine.new_sequence("other", MR, sampling_params(max_new_tokens=4))
    decode_to_completion(engine, [seq, other])
    assert seq.finish_reason == "length" and seq.output_ids == [] and len(seq.prompt_logprobs) == len(PROMPT.ids)
    assert other.output_ids
    expected = plain_log_probs(reference, list(PROMPT.ids))
    assert abs(seq.prompt_logprobs[-1].logprob - float(expected[-2, PROMPT.ids[-1]])) < TOL
    with pytest.raises(HubError, match="max_new_tokens"):
        sampling_params(max_new_tokens=0)


def test_chunked_prefill_gives_the_same_prompt_logprobs(tiny_base, engine, reference):
    from hub.serving.batch import DecodeBatch
    from hub.serving.engine import bind_all_or_release

    seq = engine.new_sequence("hot", PROMPT, sampling_params(max_new_tokens=1, prompt_logprobs=0))
    bind_all_or_release(engine, [seq])
    batch = DecodeBatch(engine, prefill_chunk=3)
    batch.join([seq])
    while batch.busy:
        batch.step()
    expected = plain_log_probs(reference, list(PROMPT.ids))
    for position, entry in enumerate(seq.prompt_logprobs[1:]):
        assert abs(entry.logprob - float(expected[position, entry.id])) < TOL


def test_penalties_change_only_their_own_row(engine):
    def greedy(**fields):
        return engine.new_sequence("hot", PROMPT, sampling_params(max_new_tokens=12, ignore_eos=True, **fields))

    alone = decode_to_completion(engine, [greedy()])[0].output_ids
    rows = decode_to_completion(engine, [greedy(no_repeat_ngram_size=1), greedy(),
                                         greedy(frequency_penalty=2.0, presence_penalty=2.0),
                                         greedy(repetition_penalty=3.0)])
    assert rows[1].output_ids == alone
    assert len(set(rows[0].output_ids)) == len(rows[0].output_ids)  # no token twice
    assert len(set(rows[2].output_ids)) >= len(set(alone))


def test_no_repeat_ngram_rule():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_ngram_tokens([1, 2, 3], 3) == []
    assert banned_ngram_tokens([5, 5, 6], 1) == [5, 6]


@pytest.mark.parametrize("field, value", [("logprobs", 21), ("prompt_logprobs", -1), ("presence_penalty", 2.5),
                                          ("frequency_penalty", float("nan")), ("repetition_penalty", 0.0),
                                          ("no_repeat_ngram_size", 33)])
def test_out_of_range_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(HubError, match=field):
        SamplingParams(**{field: value}).validate()


def test_token_prompts_are_checked_against_the_vocabulary(engine):
    with pytest.raises(HubError, match="token ids"):
        engine.new_sequence("hot", TokenPrompt((1, 10**9)), sampling_params(max_new_tokens=2))
