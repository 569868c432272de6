"""Training one task adapter on the frozen backbone, VLM recipe: only the adapter and the task's k rows train.

The skeleton is shared with the sentence VAE's trainer (`hub.training.vae`): the run folder (`run_dir.RunDir`:
`run_config.json`, `checkpoint.pt` to resume, `train_log.json`, here `loss_curve.png`, and `best/`, the export of
the lowest held-out loss that `hub publish` reads), the optimiser and schedule (`optimization.Optimization`), the
batches (`batches`) and data parallelism (`distributed`).
"""

from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

import adapters
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hub.adapters.vlm import adapter_parameter_count, vlm_adapter_config
from hub.interop import prompt_layout, quiet_adapter_activation
from hub.model.backbone import Backbone
from hub.model.task_tokens import install_task_rows, new_task_rows
from hub.plots import training_curve_png
from hub.store.export import write_export
from hub.store.layout import ADAPTER_WEIGHTS, TASK_TOKENS
from hub.task import IGNORE_INDEX, Encoded, Example, Task, TaskCodec, collate
from hub.training import distributed
from hub.training.batches import encode_all, epoch_batches, labelled_tokens
from hub.training.optimization import Optimization
from hub.training.regularizers import build_regularizers, resolve_regularizers
from hub.training.run_dir import RunDir
from hub.training.subset import low_resource_subset

LOSS_CURVE = "loss_curve.png"


@dataclass
class TrainConfig:
    name: str
    task_type: str
    task_config: dict
    data: str
    bottleneck: int
    lr: float
    batch_size: int
    grad_accum: int
    max_length: int
    epochs: int
    max_steps: int | None = None
    eval_every: int | None = None
    seed: int = 0
    base: str = ""
    method: str = "adapter"  # or a baseline of `hub.training.baselines`: "full", "lora"
    patience: int | None = None  # stop after this many held-out evaluations without a new best
    train_examples: int | None = None  # train on a subset of this many examples (`low_resource_subset`)
    data_seed: int = 0  # which subset
    regularizers: dict[str, dict] = field(default_factory=dict)  # `hub.training.regularizers`: {"mvcr": {...}}

    # A run may resume only with what shapes the model and data unchanged (`RunDir.prepare`).
    RESUMES_WITH: ClassVar[tuple[str, ...]] = ("name", "task_type", "task_config", "bottleneck", "base", "method",
                                               "train_examples", "data_seed", "regularizers")


@dataclass
class TrainLog:
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    best_eval_loss: float | None = None
    best_step: int | None = None


def parameter_report(backbone: Backbone, bottleneck: int, num_tokens: int) -> dict:
    """Trainable parameters (adapter + the task's token rows) and their share of the backbone."""
    config = backbone.model.config
    trainable = adapter_parameter_count(config.n_layer, config.n_embd, bottleneck) + num_tokens * config.n_embd
    total = backbone.num_parameters
    return {"trainable_params": trainable, "backbone_params": total, "trainable_pct": 100.0 * trainable / total}


def attach_trainable_adapter(backbone: Backbone, task: Task, name: str, bottleneck: int,
                             seed: int) -> torch.nn.Parameter:
    """Add the VLM adapter (via `adapters`) and the task's trainable rows; everything else stays frozen."""
    model: Any = backbone.model  # `adapters.init` adds the adapter methods to the class at run time
    torch.manual_seed(seed)
    adapters.init(model)
    model.add_adapter(name, config=vlm_adapter_config(model.config.n_embd, bottleneck))
    with quiet_adapter_activation():
        model.train_adapter(name)
    return attach_task_rows(backbone, task, seed)


def attach_task_rows(backbone: Backbone, task: Task, seed: int) -> torch.nn.Parameter:
    """The task's k trainable rows after GPT-2's vocabulary (input and tied output side)."""
    config = backbone.model.config
    generator = torch.Generator().manual_seed(seed)
    rows = new_task_rows(len(task.special_tokens), config.n_embd, config.initializer_range, generator)
    install_task_rows(backbone.model, rows.to(backbone.device))
    return backbone.model.transformer.wte.extra


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Trainer:
    def __init__(self, backbone: Backbone, task: Task, config: TrainConfig, run_dir: Path,
                 on_eval: Callable[["Trainer", dict], None] | None = None):
        """`on_eval(trainer, result)` runs after every held-out evaluation (learning-curve benchmarks use it)."""
        self.backbone, self.task, self.config, self.run_dir = backbone, task, config, run_dir
        self.run = RunDir(run_dir)
        self.on_eval = on_eval
        self.model = backbone.model
        self.rows = self._attach()
        config.regularizers = resolve_regularizers(config.regularizers, self.model)  # recorded as resolved
        self.dist = distributed.join(backbone.device)
        self.regularizers = build_regularizers(config.regularizers, self.model, config.seed,
                                               self.dist.average_gradients)
        self.extra_params = [p for r in self.regularizers for p in r.parameters()]  # outside the model
        self.params = trainable_parameters(self.model) + self.extra_params
        self.train_model = self.dist.prepare(self.model, self.extra_params, config.seed)  # the model, or DDP's
        self.codec = TaskCodec(task, backbone.tokenizer, backbone.vocab_size, config.max_length)
        self.pad_id = backbone.tokenizer.eos_token_id or 0
        self.log = TrainLog()
        self.step = 0
        self.example_source: Any = None  # a training input, shown in the export's prompt layout

    @property
    def trainable_count(self) -> int:
        """What the method trains and exports (training-only regularisers' parameters excluded)."""
        return sum(p.numel() for p in trainable_parameters(self.model))

    def _attach(self) -> torch.nn.Parameter:
        """Make the model trainable the method's way; return the task's trainable rows."""
        cfg = self.config
        return attach_trainable_adapter(self.backbone, self.task, cfg.name, cfg.bottleneck, cfg.seed)

    def _loss(self, batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        logits = self._logits(batch, model or self.model)
        # Computed here: transformers' loss reshapes logits by `config.vocab_size`, which excludes the task rows.
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )

    def _logits(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.backbone.device.type == "cuda")
        with autocast:
            return model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"]).logits

    @torch.no_grad()
    def evaluate(self, encoded: list[Encoded]) -> dict:
        """Token-level loss and perplexity over the held-out examples."""
        self.model.eval()
        total_loss, total_tokens = 0.0, 0.0
        encoded = self.dist.shard(encoded)
        for start in range(0, len(encoded), self.config.batch_size * 2):
            batch = collate(encoded[start : start + self.config.batch_size * 2], self.pad_id, self.backbone.device)
            tokens = labelled_tokens(batch)
            total_loss += float(self._loss(batch)) * tokens
            total_tokens += tokens
        total_loss, total_tokens = self.dist.sum([total_loss, total_tokens])
        self.model.train()
        loss = total_loss / max(1, total_tokens)
        return {"step": self.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    # -- the public step API (`train` uses it; so do benchmarks that time steps) ----------------------------
    def training_set(self, examples: list[Example]) -> list[Encoded]:
        """The examples this run trains on (`train_examples` of them when set), encoded; the task fits its
        generation length to their targets."""
        examples = self._training_subset(examples)
        train_set = encode_all(self.codec, examples, self.task.defaults.max_target_length, "training")
        self.example_source = examples[0].source
        self.task.fit_to_targets([sum(label != IGNORE_INDEX for label in e.labels) for e in train_set])
        return train_set

    def optimization(self, total_steps: int) -> Optimization:
        """The optimiser of a run of `total_steps` steps over the trainable and the regularisers' parameters."""
        return Optimization.create(self.params, self.config.lr, total_steps)

    def train_step(self, micro_batches: Iterable[list[Encoded]], optimization: Optimization) -> dict:
        """One optimiser step over `micro_batches` (`grad_accum` of them in `train`; each this process's slice of
        the global micro-batch), then each regulariser's own step. The step's record, also appended to the log."""
        micro_batches = list(micro_batches)
        loss = 0.0
        for i, examples in enumerate(micro_batches):
            batch = collate(examples, self.pad_id, self.backbone.device)
            share = self.dist.token_share(labelled_tokens(batch))
            micro = self._loss(batch, self.train_model) * share / len(micro_batches)
            with self.dist.no_sync(self.train_model, sync=i == len(micro_batches) - 1):
                self.dist.backward(micro)
            loss += micro.item()
        self.dist.average_gradients(self.extra_params)
        (loss,) = self.dist.sum([loss])
        lr = optimization.step()
        extra = {k: v for regularizer in self.regularizers for k, v in regularizer.after_step().items()}
        self.step += 1
        record = {"step": self.step, "loss": loss, "lr": lr, **extra}
        self.log.steps.append(record)
        return record

    # -- a run ----------------------------------------------------------------------------------------------
    def train(self, train_examples: list[Example], eval_examples: list[Example]) -> TrainLog:
        """Train to `max_steps` (or `epochs`) with the run's regularisers hooked in; they are unhooked on return."""
        cfg = self.config
        train_set = self.training_set(train_examples)
        eval_set = encode_all(self.codec, eval_examples, self.task.defaults.max_target_length, "held-out")
        steps_per_epoch = max(1, len(train_set) // (cfg.batch_size * cfg.grad_accum * self.dist.world_size))
        total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        eval_every = cfg.eval_every or min(steps_per_epoch, total_steps)
        optimization = self.optimization(total_steps)
        self._resume(optimization)
        bar = tqdm(total=total_steps, initial=self.step, desc=f"train {cfg.name}", unit="step",
                   disable=not self.dist.is_main)
        batches = self._batches(train_set, random.Random(cfg.seed))
        started = time.time()
        with ExitStack() as hooked:
            for regularizer in self.regularizers:
                hooked.enter_context(regularizer.attached(self.model))
                if self.step == 0:
                    regularizer.warm_up(lambda: self._forward_passes(train_set), total_steps)
            self.model.train()
            while self.step < total_steps and not self._out_of_patience():
                record = self.train_step([next(batches) for _ in range(cfg.grad_accum)], optimization)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                bar.update()
                if self.step % eval_every == 0 or self.step == total_steps:
                    self._eval_and_checkpoint(eval_set, optimization, bar)
        bar.close()
        if self.dist.is_main:
            print(f"trained {self.step} steps in {time.time() - started:.0f}s; best held-out loss "
                  f"{self.log.best_eval_loss:.4f} at step {self.log.best_step}")
        return self.log

    def _training_subset(self, examples: list[Example]) -> list[Example]:
        size, seed = self.config.train_examples, self.config.data_seed
        if size is None:
            return examples
        if self.dist.is_main:
            print(f"training on {size:,} of {len(examples):,} examples (data seed {seed})")
        return low_resource_subset(examples, size, seed)

    @torch.no_grad()
    def _forward_passes(self, train_set: list[Encoded]) -> Iterator[None]:
        """One eval-mode forward pass per training batch, in order (regularisers' warm-ups watch them)."""
        self.model.eval()
        try:
            for start in range(0, len(train_set), self.config.batch_size):
                self._logits(collate(train_set[start : start + self.config.batch_size], self.pad_id,
                                     self.backbone.device), self.model)
                yield
        finally:
            self.model.train()

    def _out_of_patience(self) -> bool:
        """Early stopping: `patience` evaluations in a row without a lower held-out loss."""
        patience, best = self.config.patience, self.log.best_step
        since_best = sum(e["step"] > best for e in self.log.evals) if best is not None else 0
        return patience is not None and since_best >= patience

    def _batches(self, train_set: list[Encoded], rng: random.Random) -> Iterator[list[Encoded]]:
        """Endless shuffled epochs of micro-batches (this process's slice of the global one, `batch_size` per
        process); skips what a resumed run has already seen."""
        size = self.config.batch_size * self.dist.world_size
        for batch in epoch_batches(len(train_set), size, rng, skip=self.step * self.config.grad_accum):
            yield [train_set[i] for i in self.dist.shard(batch)]

    def _eval_and_checkpoint(self, eval_set: list[Encoded], optimization: Optimization, bar: Any) -> None:
        result = self.evaluate(eval_set)
        self.log.evals.append(result)
        new_best = self.log.best_eval_loss is None or result["eval_loss"] < self.log.best_eval_loss
        if new_best:
            self.log.best_eval_loss, self.log.best_step = result["eval_loss"], self.step
        if not self.dist.is_main:  # every process keeps the log (early stopping); only rank 0 writes
            return
        bar.write(f"step {self.step}: held-out loss {result['eval_loss']:.4f}, perplexity {result['eval_ppl']:.2f}")
        if new_best:
            self.export(self.run.best, {"eval_loss": result["eval_loss"], "eval_ppl": result["eval_ppl"],
                                        "step": self.step})
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        self.run.save_checkpoint(self.step, trainable, optimization, asdict(self.log),
                                 regularizers=[regularizer.state_dict() for regularizer in self.regularizers])
        self.run.write_log(asdict(self.log), LOSS_CURVE, training_curve_png)
        if self.on_eval:
            self.on_eval(self, result)

    def _resume(self, optimization: Optimization) -> None:
        state = self.run.resume(self.backbone.device, optimization)
        if state is None:
            return
        params = dict(self.model.named_parameters())
        for name, value in state["trainable"].items():
            params[name].data.copy_(value)
        for regularizer, saved in zip(self.regularizers, state.get("regularizers", [])):
            regularizer.load_state_dict(saved)
        self.step = state["step"]
        self.log = TrainLog(**state["log"])

    # -- the export -----------------------------------------------------------------------------------------
    def export(self, out_dir: Path, metrics: dict) -> None:
        """Write the adapter as a run export (`hub.store.export`), atomically replacing `out_dir`."""
        write_export(out_dir, self.export_meta(metrics), self._write_payload)

    def export_meta(self, metrics: dict) -> dict:
        """The export's `adapter_meta.json` (validated as an `AdapterMeta` by `write_export`)."""
        return {
            "name": self.config.name,
            "task_type": self.task.type_name,
            "task_config": self.task.config(),
            "special_tokens": list(self.task.special_tokens),
            "eos_token": self.task.eos,
            "bottleneck": self.config.bottleneck,
            **parameter_report(self.backbone, self.config.bottleneck, len(self.task.special_tokens)),
            "metrics": metrics,
            "backbone": self.backbone.fingerprint,
            "training": asdict(self.config),
            "layout": prompt_layout(self.task, self.example_source),
        }

    def _write_payload(self, tmp: Path) -> None:
        name = self.config.name
        model: Any = self.model  # `save_adapter` comes from `adapters.init`
        model.save_adapter(str(tmp), name, with_head=False)
        (tmp / "pytorch_adapter.bin").unlink()
        prefix = f".adapters.{name}."
        tensors = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in self.model.state_dict().items()
            if prefix in k and ".adapter_norm_before." not in k  # an alias of adapter_down.0
        }
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        save_file({"rows": self.rows.detach().to("cpu", torch.float32).contiguous()},
                  str(tmp / TASK_TOKENS))
