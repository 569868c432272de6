"""Baselines trained by the same `Trainer` as the VLM adapter: full fine-tuning and LoRA (`hub train --method`).

Same data pipeline, loss, held-out evaluation, run-dir files and resuming; only what trains and what is
exported differ. Neither goes into the adapter store:

- `full`: every weight of the run's own in-memory copy of the backbone trains, plus the task's k rows, at VGLM's
  full fine-tuning learning rate (spec §4). `best/` is a standalone HF model folder (`save_pretrained`, the
  vocabulary extended by the k task tokens, the tokenizer with those tokens added) plus `task_meta.json`.
- `lora`: PEFT LoRA on the frozen backbone's `c_attn` (GPT-2's fused q/k/v projection, PEFT's default target
  for GPT-2; LoRA adapts attention weights), rank chosen so its parameter count is as close as possible to the
  VLM adapter's at `--bottleneck`, α = 32, no LoRA dropout; the task rows train as in the adapter method, and
  LoRA at the same (adapter) lr. `best/` holds PEFT's
  `adapter_config.json` + `adapter_model.safetensors`, `task_tokens.safetensors` and `task_meta.json`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GPT2LMHeadModel

from hub.adapters.vlm import adapter_parameter_count
from hub.model.backbone import Backbone, default_dtype, load_backbone, resolve_base, resolve_device
from hub.errors import HubError
from hub.evaluation.decode import TaskModel
from hub.store.export import export_dir, staging
from hub.store.fingerprint import check_backbone
from hub.store.layout import TASK_TOKENS
from hub.task import Task, TaskCodec, TaskFactory
from hub.model.task_tokens import install_task_rows
from hub.training.trainer import TrainConfig, Trainer, attach_task_rows

BASELINE_META = "task_meta.json"
LORA_TARGETS = ["c_attn"]
# LoRA's GPT-2 E2E setting (microsoft/LoRA examples/NLG: --lora_alpha 32); α stays fixed as r varies, so the
# update scale α/r needs no retuning (LoRA paper §4.1). The lr is the adapter's, shared with the task rows.
LORA_ALPHA = 32
# VGLM `run.sh`, full GPT-2 fine-tuning (spec §4); other task types take the most common value.
FULL_FINETUNE_LR = {"e2e": 5e-5, "summarize": 8e-5, "translate": 6.25e-5, "coqa": 6.25e-5, "persona": 6.25e-5}


def default_lr(task: Task, method: str) -> float:
    return FULL_FINETUNE_LR.get(task.type_name, 6.25e-5) if method == "full" else task.defaults.lr


def lora_rank(n_layer: int, hidden_size: int, bottleneck: int) -> int:
    """Rank whose LoRA count on `c_attn` (L·r·(d + 3d)) is nearest the VLM adapter's L·(3d + 2db + b)."""
    per_rank = n_layer * 4 * hidden_size
    return max(1, round(adapter_parameter_count(n_layer, hidden_size, bottleneck) / per_rank))


class FullFineTuneTrainer(Trainer):
    """Every weight of the backbone (the run's own in-memory copy) and the task's rows train."""

    def _attach(self) -> torch.nn.Parameter:
        for param in self.model.parameters():
            param.requires_grad_(True)
        return attach_task_rows(self.backbone, self.task, self.config.seed)

    def export(self, out_dir: Path, metrics: dict) -> None:
        """A plain GPT2LMHeadModel whose vocabulary ends with the task tokens, loadable with `from_pretrained`."""
        with staging(out_dir) as tmp:
            plain_model(self.model).save_pretrained(tmp)
            tokenizer = copy.deepcopy(self.backbone.tokenizer)
            tokenizer.add_special_tokens({"additional_special_tokens": list(self.task.special_tokens)})
            tokenizer.save_pretrained(tmp)
            write_meta(tmp, self, metrics)


class LoraTrainer(Trainer):
    """LoRA on the frozen backbone's `c_attn` at the rank matching the VLM adapter's size, plus the task's rows."""

    def _attach(self) -> torch.nn.Parameter:
        config = self.config
        self.rank = lora_rank(self.model.config.n_layer, self.model.config.n_embd, config.bottleneck)
        torch.manual_seed(config.seed)
        lora = LoraConfig(r=self.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                          fan_in_fan_out=True)  # GPT-2's Conv1D stores weights as [in, out]
        self.peft = get_peft_model(self.model, lora)  # injects in place; freezes all but LoRA, so rows come after
        return attach_task_rows(self.backbone, self.task, config.seed)

    def export(self, out_dir: Path, metrics: dict) -> None:
        with staging(out_dir) as tmp:
            self.peft.save_pretrained(str(tmp))
            save_file({"rows": self.rows.detach().to("cpu", torch.float32).contiguous()}, str(tmp / TASK_TOKENS))
            write_meta(tmp, self, metrics, lora={"rank": self.rank, "alpha": LORA_ALPHA, "targets": LORA_TARGETS})


TRAINERS: dict[str, type[Trainer]] = {"adapter": Trainer, "full": FullFineTuneTrainer, "lora": LoraTrainer}


def make_trainer(backbone: Backbone, task: Task, config: TrainConfig, run_dir: Path,
                 on_eval: Callable[[Trainer, dict], None] | None = None) -> Trainer:
    if config.method not in TRAINERS:
        raise HubError(f"unknown --method {config.method!r}; use one of {', '.join(TRAINERS)}")
    return TRAINERS[config.method](backbone, task, config, run_dir, on_eval)


def describe_trainable(trainer: Trainer) -> str:
    """The trainable count; for LoRA also the VLM adapter's at the same bottleneck, which it is matched to."""
    count, backbone_params = trainer.trainable_count, trainer.backbone.num_parameters
    line = f"trainable {count:,} parameters = {100 * count / backbone_params:.2f}% of {backbone_params:,}"
    if isinstance(trainer, LoraTrainer):
        config, rows, b = trainer.model.config, trainer.rows.numel(), trainer.config.bottleneck
        adapter = adapter_parameter_count(config.n_layer, config.n_embd, b)
        line += (f" (LoRA rank {trainer.rank} on {', '.join(LORA_TARGETS)}: {count - rows:,} + {rows:,} task-row "
                 f"weights; the VLM adapter at b={b}: {adapter:,} + {rows:,} = {adapter + rows:,}; "
                 f"{100 * (count - adapter - rows) / (adapter + rows):+.1f}%)")
    return line


# -- export helpers -----------------------------------------------------------------------------------------

def plain_model(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """The trained model with its task rows appended to `wte` (vocabulary V + k, head still tied)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    wte = torch.cat([state.pop("transformer.wte.base.weight"), state.pop("transformer.wte.extra")])
    config = copy.deepcopy(model.config)
    config.vocab_size = wte.shape[0]
    plain = GPT2LMHeadModel(config)
    plain.load_state_dict({**state, "transformer.wte.weight": wte, "lm_head.weight": wte})
    return plain


def write_meta(folder: Path, trainer: Trainer, metrics: dict, **extra) -> None:
    task = trainer.task
    meta = {
        "method": trainer.config.method,
        "name": trainer.config.name,
        "task_type": task.type_name,
        "task_config": task.config(),
        "special_tokens": list(task.special_tokens),
        "eos_token": task.eos,
        "first_token_id": trainer.backbone.vocab_size,
        "trainable_params": trainer.trainable_count,
        "metrics": metrics,
        "backbone": trainer.backbone.fingerprint,
        "training": asdict(trainer.config),
        **extra,
    }
    (folder / BASELINE_META).write_text(json.dumps(meta, indent=2))


# -- reading a baseline run back ----------------------------------------------------------------------------

def read_meta(run_dir: Path) -> dict:
    path = export_dir(run_dir) / BASELINE_META
    if not path.is_file():
        raise HubError(f"{run_dir} is not a full fine-tuning or LoRA run (no {BASELINE_META}); evaluate an "
                       f"adapter with `hub eval NAME` or `hub eval --run RUN_DIR`")
    return json.loads(path.read_text())


def load_baseline(run_dir: Path, base: str | None, device: str, make_task: TaskFactory) -> TaskModel:
    """A full fine-tuning or LoRA run's `best/` as a `TaskModel` (decoded like an adapter)."""
    meta, path = read_meta(run_dir), export_dir(run_dir)
    task = make_task(meta["task_type"], meta["task_config"])
    if meta["method"] == "full":
        torch_device = resolve_device(device)
        model = GPT2LMHeadModel.from_pretrained(path, dtype=default_dtype(torch_device)).to(torch_device)
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        backbone = load_backbone(resolve_base(base, meta["backbone"]), device)
        check_backbone(meta["backbone"], backbone.fingerprint, f"LoRA run '{run_dir}'")
        rows = load_file(path / TASK_TOKENS)["rows"].to(backbone.device, backbone.dtype)
        install_task_rows(backbone.model, rows)
        model = PeftModel.from_pretrained(backbone.model, path).get_base_model()
        tokenizer = backbone.tokenizer
    codec = TaskCodec(task, tokenizer, meta["first_token_id"], model.config.n_positions)
    return TaskModel(model.eval(), codec, meta["first_token_id"], str(run_dir))
