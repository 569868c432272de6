"""The adapter math: the formula by hand, `adapters`' SeqBn = the grouped per-row path, mixed batches, slot 0,
memory at each adapter's own rank, hooks that come off, and a second adapter kind plugged in from here."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import adapters
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from hub.serving.batch import decode_to_completion
from hub.adapters import registry
from hub.adapters.base import AdapterKind, KindRuntime, RowState
from hub.adapters.vlm import (AdapterWeights, VlmRuntime, adapter_parameter_count, stack_layers, vlm_adapter,
                              vlm_adapter_config)
from hub.adapters.vlm_plan import DENSE_ROWS
from hub.model.backbone import Backbone, load_backbone
from hub.serving.engine import Engine, SamplingParams
from hub.adapters.vlm_format import adapter_layers
from hub.store.versions import LoadedAdapter
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
        def p(part):
            return state[f"transformer.h.{i}.output_adapters.adapters.t.{part}"]

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
    """Logits of one forward with row b on the VLM adapter in `slots[b]` (0: the plain base)."""
    runtime = engine.manager.runtimes["vlm"]
    with torch.no_grad(), engine.applying([(runtime, runtime.make_plan([RowState(s) for s in slots]))]):
        return engine.backbone.model(input_ids=ids, token_type_ids=types).logits


@pytest.fixture(scope="module")
def engine(tiny_base):
    return Engine(load_backbone(str(tiny_base), "cpu"), make_task)


def test_fused_path_equals_the_adapters_library(tiny_base, engine, ids):
    library = adapters_model(tiny_base, 10, seed=3)
    resident = engine.manager.add_adapter(loaded(library, "lib"))
    vocab = engine.backbone.vocab_size
    with torch.no_grad():
        expected = library(ids).logits
    actual = engine_logits(engine, ids, [resident.slot] * 2)[..., :vocab]
    assert (expected - actual).abs().max() <= 1e-5


def test_slot_zero_rows_equal_the_plain_base(tiny_base, engine, ids):
    engine.manager.add_adapter(loaded(adapters_model(tiny_base, 10, seed=4), "other"))
    plain = GPT2LMHeadModel.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        expected = plain(ids).logits
    actual = engine_logits(engine, ids, [0, 0])[..., : engine.backbone.vocab_size]
    assert torch.equal(expected, actual) or (expected - actual).abs().max() <= 1e-6


def test_mixed_batch_equals_each_request_alone(tiny_base, engine):
    """Rows of different adapters (b 10 and b 100, zero-padded in one bank) and a base row, in one batch."""
    engine.manager.add_adapter(loaded(adapters_model(tiny_base, 10, seed=5), "mix-a", seed=1))
    engine.manager.add_adapter(loaded(adapters_model(tiny_base, 100, seed=6), "mix-b", "text2text", seed=2))
    requests = [("mix-a", "name[The Eagle], food[French]"), ("mix-b", "translate this please"),
                (None, None), ("mix-a", "name[Alimentum], area[city centre], familyFriendly[no]")]

    def sequences():
        made = [engine.new_sequence(task, source, SamplingParams(max_new_tokens=12), prompt_text="The cat sat")
                for task, source in requests]
        assert all(engine.bind(s) for s in made)
        return made

    together = decode_to_completion(engine, sequences())
    alone = [decode_to_completion(engine, [s])[0] for s in sequences()]
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
    with torch.no_grad(), engine.applying(engine.plans(batch)):
        mixed = engine.backbone.model(input_ids=torch.tensor(rows), token_type_ids=torch.tensor(types),
                                      attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    for i, s in enumerate(batch):
        single = engine_logits(engine, torch.tensor([s.prompt_ids]), [slots[i]],
                               torch.tensor([s.prompt_types]) if s.prompt_types else None)[0, -1]
        assert (mixed[i] - single).abs().max() <= 1e-4
    for s in batch:
        engine.release(s)
    assert engine.manager.adapters["mix-a"].in_use == engine.manager.adapters["mix-b"].in_use == 0


class Blocks(nn.Module):
    """A stand-in model for a kind's runtime: `transformer.h` blocks that return their input as a tuple."""

    class Block(nn.Module):
        def forward(self, h):
            return (h,)

    def __init__(self, n_layer: int):
        super().__init__()
        self.config = SimpleNamespace(layer_norm_epsilon=1e-5)
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList(self.Block() for _ in range(n_layer))
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, h):
        return [block(h)[0] for block in self.transformer.h]


def random_weights(n_layer: int, d: int, rank: int, g: torch.Generator) -> AdapterWeights:
    shapes = [(n_layer, d), (n_layer, d), (n_layer, d, rank), (n_layer, rank), (n_layer, rank, d), (n_layer, d)]
    return AdapterWeights(*(torch.randn(shape, generator=g) for shape in shapes))


def test_grouped_rows_equal_the_formula_at_each_adapters_own_rank():
    """Rows of a b=3 and a b=20 adapter and a plain row, in mixed order: each row gets its own adapter's
    formula; the runtime holds exactly the adapters' bytes (nothing padded to the larger rank)."""
    model, g = Blocks(n_layer=2), torch.Generator().manual_seed(0)
    runtime = VlmRuntime(model)
    small, large = random_weights(2, 8, 3, g), random_weights(2, 8, 20, g)
    a, b = runtime.add(small), runtime.add(large)
    own_bytes = 4 * sum(t.numel() for w in (small, large) for t in vars(w).values())
    assert runtime.resident_bytes() == own_bytes - 4 * 2 * 2 * 2 * 8  # LN γ, β folded into the projections
    h = torch.randn(4, 5, 8)
    with runtime.active(runtime.make_plan([RowState(b), RowState(a), RowState(), RowState(b)])):
        out = model(h)[1]  # block 1 sees the unchanged input here: each block's hook acts on its own output

    def by_formula(w, rows):
        return vlm_adapter(h[rows], w.map(lambda t: t[1]), 1e-5)

    assert torch.allclose(out[[0, 3]], by_formula(large, [0, 3]), atol=1e-5)
    assert torch.allclose(out[[1]], by_formula(small, [1]), atol=1e-5)
    assert torch.equal(out[2], h[2])
    with runtime.active(runtime.make_plan(None, a)):  # one adapter for every row, any batch size
        assert torch.allclose(model(h)[0], vlm_adapter(h, small.map(lambda t: t[0]), 1e-5), atol=1e-5)
    runtime.remove(a)
    assert runtime.add(small) == a
    runtime.close()
    assert all(not block._forward_hooks for block in model.transformer.h)


@pytest.mark.parametrize("bank_dtype, tolerance", [(torch.float32, 1e-6), (torch.float16, 1e-2),
                                                   (torch.bfloat16, 3e-2)])
def test_decode_steps_apply_rank_buckets_and_dense_groups_as_the_formula(bank_dtype, tolerance):
    """One token per row: adapters with few rows go through their rank bucket's `F.embedding_bag` pair, one with
    DENSE_ROWS rows or more through dense matmuls; every row equals its own adapter's formula, also after the
    buckets grew (adapters added later) and after an index was freed and reused; a float16/bfloat16 bank within
    its rounding."""
    model, g = Blocks(n_layer=2), torch.Generator().manual_seed(1)
    runtime = VlmRuntime(model, bank_dtype)
    weights = {name: random_weights(2, 8, rank, g) for name, rank in (("a", 3), ("b", 20), ("c", 3), ("d", 3))}
    slots = {name: runtime.add(w) for name, w in weights.items()}
    runtime.remove(slots.pop("d"))
    slots["e"], weights["e"] = runtime.add(weights["d"]), weights["d"]  # reuses d's index in the rank-3 bucket
    for i in range(6):  # grow both buckets well past their first capacity
        runtime.add(random_weights(2, 8, (3, 20)[i % 2], g))
    names = ["a", "c", "b", None, "a", "e", "a", "c", "a", "a"]
    assert names.count("a") >= DENSE_ROWS > names.count("c")
    h = torch.randn(len(names), 1, 8, generator=g)
    plan = runtime.make_plan([RowState(slots[n]) if n else RowState() for n in names])
    assert {type(piece).__name__ for piece in plan.decode} == {"Bag", "tuple"}
    with runtime.active(plan):
        out = model(h)[1]
    for row, name in enumerate(names):
        expected = h[row] if name is None else vlm_adapter(h[row:row + 1], weights[name].map(lambda t: t[1]), 1e-5)[0]
        assert (out[row] - expected).norm() <= tolerance * expected.norm(), (row, name)
    assert {rank: bucket.used for rank, bucket in runtime.buckets.items()} == {3: 6, 20: 4}
    assert all(bucket.capacity <= 1.2 * bucket.used + 1 for bucket in runtime.buckets.values())
    runtime.close()


def test_engines_take_their_hooks_off_the_model(tiny_base):
    """No engine stacks hooks on a shared backbone: closing one restores the plain model exactly."""
    backbone = load_backbone(str(tiny_base), "cpu")
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        plain = backbone.model(ids).logits
    for seed in (1, 2):
        with Engine(backbone, make_task) as engine:
            engine.manager.add_adapter(loaded(adapters_model(tiny_base, 10, seed=seed), "t"))
            assert sum(len(b._forward_hooks) for b in backbone.model.transformer.h) == backbone.model.config.n_layer
            decode_to_completion(engine, [engine.new_sequence("t", "name[The Eagle]", SamplingParams(max_new_tokens=3))])
    assert all(not b._forward_hooks for b in backbone.model.transformer.h)
    with torch.no_grad():
        assert torch.equal(backbone.model(ids).logits, plain)


class ShiftKind(AdapterKind):
    """A second adapter kind, defined only here: adds a learned vector to each block's output."""

    name = "shift-test"

    def load(self, loaded, config) -> torch.Tensor:
        return loaded.adapter_tensors["shift"]  # [L, d]

    def parameter_count(self, bundle) -> int:
        return bundle.numel()

    def runtime(self, model, bank_dtype=torch.float32) -> KindRuntime:
        return ShiftRuntime(model)


class ShiftRuntime(KindRuntime):
    def __init__(self, model):
        super().__init__(model)
        self.shifts: dict[int, torch.Tensor] = {}
        for layer, block in enumerate(model.transformer.h):
            self.hooks.add(block, lambda module, args, output, layer=layer: self.apply(layer, output))

    def add(self, bundle) -> int:
        slot = len(self.shifts) + 1
        self.shifts[slot] = bundle
        return slot

    def remove(self, slot: int) -> None:
        del self.shifts[slot]

    def make_plan(self, rows, slot=0):
        return [r.slot for r in rows] if rows is not None else None

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shifts.values())

    def apply(self, layer: int, output):
        if self.plan is None:
            return output
        zero = torch.zeros_like(output[0][0, 0])
        shift = torch.stack([self.shifts[s][layer] if s else zero for s in self.plan])[:, None]
        return (output[0] + shift,) + tuple(output[1:])


@pytest.fixture
def shift_kind():
    vlm = registry.kind_spec("vlm")
    registry.register(dataclasses.replace(vlm, stored=dataclasses.replace(vlm.stored, name=ShiftKind.name),
                                          implementation=ShiftKind))
    yield
    registry.unregister(ShiftKind.name)


def test_a_second_adapter_kind_plugs_in_without_touching_the_engine(tiny_base, shift_kind):
    backbone = load_backbone(str(tiny_base), "cpu")
    config = backbone.model.config
    template = loaded(adapters_model(tiny_base, 10), "t", seed=3)
    direction = torch.randn(config.n_layer, config.n_embd, generator=torch.Generator().manual_seed(0))

    def shift_adapter(name: str, scale: float):
        meta = dataclasses.replace(template.meta, adapter_kind="shift-test")
        return dataclasses.replace(template, name=name, meta=meta, adapter_tensors={"shift": direction * scale})

    mr = "name[The Eagle], food[French]"
    with Engine(backbone, make_task) as engine:
        engine.manager.add_adapter(loaded(adapters_model(tiny_base, 10, seed=9), "vlm"))
        assert engine.manager.add_adapter(shift_adapter("shifted", 3.0)).parameter_count == config.n_layer * config.n_embd
        engine.manager.add_adapter(shift_adapter("unshifted", 0.0))
        requests = [("shifted", mr), ("unshifted", mr), ("vlm", mr), (None, None), ("shifted", "name[Zizzi]")]

        def sequences():
            return [engine.new_sequence(t, src, SamplingParams(max_new_tokens=8), prompt_text="The cat")
                    for t, src in requests]

        together = [s.output_ids for s in decode_to_completion(engine, sequences())]
        assert together == [decode_to_completion(engine, [s])[0].output_ids for s in sequences()]
        assert together[0] != together[1], "the shift kind's weights change the output"
        assert set(engine.manager.runtimes) == {"vlm", "shift-test"}
    assert all(not b._forward_hooks for b in backbone.model.transformer.h)


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
