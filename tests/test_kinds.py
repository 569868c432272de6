"""A third adapter kind, defined in this file only: one `KindSpec` registered, and the store publishes, checks
and loads it, the engine decodes its rows in the same batch as the plain model's; nothing else in the hub
changes (`hub.adapters.spec`, docs/ARCHITECTURE.md "An adapter kind")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from hub.adapters import registry
from hub.adapters.base import NO_SLOT, AdapterKind, KindRuntime, RowState
from hub.adapters.spec import KindSpec
from hub.errors import HubError, IntegrityError
from hub.model.backbone import load_backbone
from hub.serving.batch import decode_to_completion
from hub.serving.engine import Engine
from hub.serving.sampling import SamplingParams
from hub.store.export import write_export
from hub.store.kinds import StoredKind
from hub.store.local import AdapterStore
from hub.task import Example, Segment, Task, TaskDefaults
from tasks import make_task

TOY = "final-bias"
TOY_WEIGHTS = "bias.safetensors"


class BiasTask(Task):
    """The task a final-bias version serves under: its rows start from a given prompt, no special tokens."""

    type_name = TOY
    description = "a vector added to the final hidden state"
    special_tokens = ()
    defaults = TaskDefaults(bottleneck=1, lr=0.0, epochs=1, batch_size=1, grad_accum=1, max_new_tokens=6)
    metric = "sacrebleu"

    def load_examples(self, data: str, split: str) -> list[Example]:
        return []

    def prompt_segments(self, source: Any) -> list[Segment]:
        return []


class BiasKind(AdapterKind):
    """Adds its stored vector [d] to the final hidden state of its rows."""

    name = TOY
    text_input_error = "its rows start from token ids"

    def load(self, loaded, config) -> torch.Tensor:
        bias = loaded.adapter_tensors.get("bias")
        if bias is None or tuple(bias.shape) != (config.n_embd,):
            raise IntegrityError(f"{TOY_WEIGHTS} of '{loaded.name}' holds no bias [{config.n_embd}]")
        return bias

    def parameter_count(self, bundle: torch.Tensor) -> int:
        return bundle.numel()

    def runtime(self, model, bank_dtype=torch.float32) -> KindRuntime:
        return BiasRuntime(model)

    def task(self, meta) -> Task:
        return BiasTask()


class BiasRuntime(KindRuntime):
    def __init__(self, model):
        super().__init__(model)
        self.hooks.add(model.transformer.ln_f, self.apply)

    def add(self, bundle: torch.Tensor) -> int:
        return self.claim(bundle.to(next(self.model.parameters()).device))

    def make_plan(self, rows: list[RowState] | None, slot: int = NO_SLOT) -> Any:
        return [row.slot for row in rows] if rows is not None else slot

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.slots.values())

    def apply(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if self.plan is None:
            return output
        slots = self.plan if isinstance(self.plan, list) else [self.plan] * output.shape[0]
        zero = torch.zeros_like(output[0, 0])
        return output + torch.stack([self.slots[s] if s != NO_SLOT else zero for s in slots])[:, None]


def _scale_problems(data: dict) -> list[str]:
    scale = data["scale"]
    return [] if isinstance(scale, (int, float)) and scale > 0 else ["scale must be a positive number"]


SPEC = KindSpec(
    stored=StoredKind(TOY, (TOY_WEIGHTS,), TOY_WEIGHTS, has_task_tokens=False, required_fields=("scale",),
                      meta_problems=_scale_problems),
    implementation=BiasKind,
    description="a vector added to the final hidden state",
)


@pytest.fixture
def toy_kind():
    registry.register(SPEC)
    yield
    registry.unregister(TOY)


def bias_meta(backbone, bias: torch.Tensor, **meta: Any) -> dict:
    return {"name": "biased", "task_type": TOY, "adapter_kind": TOY, "scale": 1.0, "bottleneck": 1,
            "trainable_params": bias.numel(), "trainable_pct": 0.0, "metrics": {}, "backbone": backbone.fingerprint,
            **meta}


def export_bias(run: Path, meta: dict, bias: torch.Tensor) -> None:
    write_export(run, meta, lambda folder: save_file({"bias": bias}, str(folder / TOY_WEIGHTS)))


def test_a_kind_registered_in_one_file_is_published_loaded_and_decoded(tiny_base, tmp_path, toy_kind):
    backbone = load_backbone(str(tiny_base), "cpu")
    bias = 20 * torch.randn(backbone.model.config.n_embd, generator=torch.Generator().manual_seed(0))
    export_bias(tmp_path / "run", bias_meta(backbone, bias), bias)
    store = AdapterStore(tmp_path / "store")
    stored = store.publish(tmp_path / "run")
    assert sorted(stored.meta.files) == [TOY_WEIGHTS] and not stored.meta.has_task_tokens
    assert json.loads((Path(stored.path) / "hub.json").read_text())["scale"] == 1.0
    loaded = store.load("biased", backbone.fingerprint)
    assert torch.equal(loaded.adapter_tensors["bias"], bias) and loaded.token_rows.shape[0] == 0

    prompt = backbone.tokenizer.encode("The cat")
    eos = backbone.tokenizer.eos_token_id or 0
    with Engine(backbone, make_task) as engine:
        adapter = engine.manager.add_adapter(loaded)
        assert adapter.parameter_count == bias.numel() and adapter.task.type_name == TOY

        def sequences():
            params = SamplingParams(max_new_tokens=adapter.task.defaults.max_new_tokens)
            return [engine.new_state_sequence(adapter, prompt, eos, params, {}),
                    engine.new_sequence(None, None, SamplingParams(max_new_tokens=6), prompt_text="The cat")]

        together = [s.output_ids for s in decode_to_completion(engine, sequences())]
        assert together == [decode_to_completion(engine, [s])[0].output_ids for s in sequences()]
        assert together[0] != together[1], "the bias changes what its rows decode, and only theirs"
        with pytest.raises(HubError, match="takes no text input: its rows start from token ids"):
            engine.new_sequence(adapter, "some text", SamplingParams(max_new_tokens=2))
    assert not backbone.model.transformer.ln_f._forward_hooks


def test_the_kinds_metadata_check_refuses_a_bad_export(tiny_base, tmp_path, toy_kind):
    backbone = load_backbone(str(tiny_base), "cpu")
    bias = torch.zeros(backbone.model.config.n_embd)
    with pytest.raises(IntegrityError, match="scale must be a positive number"):
        export_bias(tmp_path / "run", bias_meta(backbone, bias, scale=-1), bias)
    unscaled = bias_meta(backbone, bias)
    del unscaled["scale"]
    with pytest.raises(IntegrityError, match="lacks scale"):
        export_bias(tmp_path / "run", unscaled, bias)
    assert not (tmp_path / "run").exists()
