"""The adapter math: the formula by hand, `adapters`' SeqBn = the fused per-row path, mixed batches, slot 0."""

from __future__ import annotations

import math

import adapters
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from hub.adapters.vlm import AdapterBank, AdapterWeights, adapter_parameter_count, stack_layers, vlm_adapter, vlm_adapter_config
from hub.model.backbone import Backbone, load_backbone
from hub.serving.engine import Engine, SamplingParams
from hub.store.catalog import LoadedAdapter, adapter_layers
from hub.store.format import AdapterMeta
from tasks import make_task


def adapters_model(base, bottleneck: int, name: str = "t", seed: int = 0) -> GPT2LMHeadModel:
    """The tiny backbone with a VLM adapter added by `adapters`, weights randomised so W_up is not ~0."""
    model = GPT2LMHeadModel.from_pretrained(base).eval()
    adapters.init(model)
    model.add_adapter(name, config=vlm_adapter_config(model.config.n_embd, bottleneck))
    model.set_active_adapters(name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".adapters.{name}." in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + (1.0 if key.endswith("0.weight") else 0))
    return model


def adapter_state(model, name: str = "t") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if f".adapters.{name}." in k and "adapter_norm_before" not in k}


def loaded(model, name: str, task_type: str = "e2e", seed: int = 0) -> LoadedAdapter:
    k = len(make_task(task_type).special_tokens)
    rows = torch.randn(k, model.config.n_embd, generator=torch.Generator().manual_seed(seed)) * 0.5
    meta = AdapterMeta.unpublished(name, task_type, make_task(task_type).special_tokens, bottleneck=0)
    tensors = {k.replace(".adapters.t.", f".adapters.{name}."): v for k, v in adapter_state(model, "t").items()}
    return LoadedAdapter(name, "1", meta, None, tensors, rows)


@pytest.fixture(scope="module")
def ids():
    return torch.tensor([[5, 17, 300, 42, 7, 99], [8, 8, 1000, 2, 64, 3]])


def test_reduction_factor_gives_the_exact_bottleneck():
    for d, b in [(768, 300), (1024, 100), (1024, 10), (1280, 224), (1600, 48), (768, 100), (32, 10)]:
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=d, n_head=4 if d % 4 == 0 else 1, vocab_size=10))
        adapters.init(model)
        model.add_adapter("t", config=vlm_adapter_config(d, b))
        layer = model.transformer.h[0].output_adapters.adapters["t"]
        assert layer.adapter_down[1].out_features == b


def test_parameter_count_formula_matches_the_library(tiny_base):
    model = adapters_model(tiny_base, 10)
    trainable = sum(v.numel() for v in adapter_state(model).values())
    assert trainable == adapter_parameter_count(model.config.n_layer, model.config.n_embd, 10)


def test_library_adapter_equals_the_formula_by_hand(tiny_base, ids):
    """`adapters`' SeqBn block output = h + W_up·ReLU(W_down·LN(h) + b_d) + b_u at every block (fp32)."""
    library = adapters_model(tiny_base, 10)
    plain = GPT2LMHeadModel.from_pretrained(tiny_base).eval()
    state = adapter_state(library)

    def by_hand(i):
        p = lambda part: state[f"transformer.h.{i}.output_adapters.adapters.t.{part}"]  # noqa: E731

        def hook(module, args, output):
            h = output[0]
            mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
            x = (h - mu) / torch.sqrt(var + 1e-5) * p("adapter_down.0.weight") + p("adapter_down.0.bias")
            z = torch.clamp(x @ p("adapter_down.1.weight").T + p("adapter_down.1.bias"), min=0)
            return (h + z @ p("adapter_up.weight").T + p("adapter_up.bias"),) + output[1:]
        return hook

    for i, block in enumerate(plain.transformer.h):
        block.register_forward_hook(by_hand(i))
    with torch.no_grad():
        expected, actual = plain(ids).logits, library(ids).logits
        assert (actual - plain.transformer.h[0].mlp.c_fc.weight.new_zeros(1)).abs().max() > 0
        effect = (library(ids).logits - GPT2LMHeadModel.from_pretrained(tiny_base).eval()(ids).logits).abs().max()
    assert effect > 0.1, "the adapter must change the output for this test to mean anything"
    assert (expected - actual).abs().max() <= 1e-5
    # and one block in isolation, to the 1e-6 of the spec
    h = torch.randn(2, 5, 32)
    layer = stack_layers(adapter_layers(state, "t")).map(lambda t: t[0])
    by_formula = h + torch.relu(F.layer_norm(h, (32,), layer.ln_weight, layer.ln_bias, 1e-5) @ layer.down_weight
                                + layer.down_bias) @ layer.up_weight + layer.up_bias
    assert (vlm_adapter(h, layer, 1e-5) - by_formula).abs().max() <= 1e-6


def engine_logits(engine: Engine, ids: torch.Tensor, slots: list[int], types=None) -> torch.Tensor:
    engine.hooks.rows = engine.bank.gather(torch.tensor(slots))
    try:
        with torch.no_grad():
            return engine.backbone.model(input_ids=ids, token_type_ids=types).logits
    finally:
        engine.hooks.rows = None


@pytest.fixture(scope="module")
def engine(tiny_base):
    return Engine(load_backbone(str(tiny_base), "cpu"), make_task)


def test_fused_path_equals_the_adapters_library(tiny_base, engine, ids):
    library = adapters_model(tiny_base, 10, seed=3)
    resident = engine.add_adapter(loaded(library, "lib"))
    vocab = engine.backbone.vocab_size
    with torch.no_grad():
        expected = library(ids).logits
    actual = engine_logits(engine, ids, [resident.slot] * 2)[..., :vocab]
    assert (expected - actual).abs().max() <= 1e-5


def test_slot_zero_rows_equal_the_plain_base(tiny_base, engine, ids):
    engine.add_adapter(loaded(adapters_model(tiny_base, 10, seed=4), "other"))
    plain = GPT2LMHeadModel.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        expected = plain(ids).logits
    actual = engine_logits(engine, ids, [0, 0])[..., : engine.backbone.vocab_size]
    assert torch.equal(expected, actual) or (expected - actual).abs().max() <= 1e-6


def test_mixed_batch_equals_each_request_alone(tiny_base, engine):
    """Rows of different adapters (b 10 and b 100, zero-padded in one bank) and a base row, in one batch."""
    engine.add_adapter(loaded(adapters_model(tiny_base, 10, seed=5), "mix-a", seed=1))
    engine.add_adapter(loaded(adapters_model(tiny_base, 100, seed=6), "mix-b", "text2text", seed=2))
    requests = [("mix-a", "name[The Eagle], food[French]"), ("mix-b", "translate this please"),
                (None, None), ("mix-a", "name[Alimentum], area[city centre], familyFriendly[no]")]

    def sequences():
        return [engine.new_sequence(task, source, SamplingParams(max_new_tokens=12), prompt_text="The cat sat")
                for task, source in requests]

    together = engine.run(sequences())
    alone = [engine.run([s])[0] for s in sequences()]
    assert [s.output_ids for s in together] == [s.output_ids for s in alone]
    assert all(s.output_ids for s in together)

    # one prefill forward: fp32 logits of each row equal its single-row logits
    batch = sequences()
    width = max(len(s.prompt_ids) for s in batch)
    rows = [[0] * (width - len(s.prompt_ids)) + s.prompt_ids for s in batch]
    no_type = engine.no_type_id
    types = [[0] * (width - len(s.prompt_ids)) + (s.prompt_types or [no_type] * len(s.prompt_ids)) for s in batch]
    mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in batch])
    slots = [s.adapter.slot if s.adapter else 0 for s in batch]
    engine.hooks.rows = engine.bank.gather(torch.tensor(slots))
    with torch.no_grad():
        mixed = engine.backbone.model(input_ids=torch.tensor(rows), token_type_ids=torch.tensor(types),
                                      attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    engine.hooks.rows = None
    for i, s in enumerate(batch):
        single = engine_logits(engine, torch.tensor([s.prompt_ids]), [slots[i]],
                               torch.tensor([s.prompt_types]) if s.prompt_types else None)[0, -1]
        assert (mixed[i] - single).abs().max() <= 1e-4
    for s in batch + together + alone:
        if s.adapter and not s.finished:
            engine.release(s.adapter)


def test_bank_padding_is_exact():
    bank = AdapterBank(n_layer=2, hidden_size=8, device=torch.device("cpu"), dtype=torch.float32, capacity=2)
    g = torch.Generator().manual_seed(0)
    small = AdapterWeights(*(torch.randn(shape, generator=g) for shape in
                             [(2, 8), (2, 8), (2, 8, 3), (2, 3), (2, 3, 8), (2, 8)]))
    large = AdapterWeights(*(torch.randn(shape, generator=g) for shape in
                             [(2, 8), (2, 8), (2, 8, 20), (2, 20), (2, 20, 8), (2, 8)]))
    a, b = bank.add(small), bank.add(large)  # the second grows the rank and the capacity
    h = torch.randn(3, 4, 8)
    rows = bank.gather(torch.tensor([a, b, 0]))
    fused = vlm_adapter(h, rows.map(lambda t: t[:, 1]), 1e-5)
    assert torch.allclose(fused[0], vlm_adapter(h[:1], small.map(lambda t: t[1]), 1e-5)[0], atol=1e-6)
    assert torch.allclose(fused[1], vlm_adapter(h[1:2], large.map(lambda t: t[1]), 1e-5)[0], atol=1e-6)
    assert torch.equal(fused[2], h[2])
    bank.remove(a)
    assert bank.add(small) == a


def test_parameter_share_for_gpt2_small_at_bottleneck_100():
    """GPT2Config() (124 M): a bottleneck-100 adapter plus 4 task rows is about 1.5 % of the backbone."""
    from hub.training.trainer import parameter_report

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    backbone = Backbone(model, None, "gpt2", torch.device("meta"), torch.float32, {},
                        sum(p.numel() for p in model.parameters()))
    report = parameter_report(backbone, 100, 4)
    assert report["backbone_params"] == 124_439_808
    assert report["trainable_params"] == 1_872_048 + 4 * 768
    assert math.isclose(report["trainable_pct"], 1.507, abs_tol=0.01)
