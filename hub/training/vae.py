"""Training a sentence VAE bundle on the frozen backbone: AdaVAE's recipe, Park & Lee's two phases, or no remedy.

Every remedy is its own option (`VAETrainConfig`); a recipe only chooses their defaults (`RECIPES`). The
skeleton is the VLM trainer's (`hub.training.trainer`): a `RunDir` (`run_config.json`, `checkpoint.pt` to
resume, `train_log.json`, here `vae_curves.png`, and `best/`, the lowest held-out −ELBO's export that `hub
publish` reads, kind `sentence_vae`), an `Optimization` (here with a warm-up) and `epoch_batches`.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hub.adapters.vae import SentenceVAE, VAEConfig, encode_sentences, pad_rows
from hub.errors import HubError
from hub.evaluation.vae_metrics import active_units, kl_per_dim, mutual_information
from hub.model.backbone import Backbone
from hub.plots import vae_curves_png
from hub.store.export import write_export
from hub.adapters.vae_kind import MAX_LENGTH, SENTENCE_VAE, VAE_WEIGHTS
from hub.training.batches import epoch_batches
from hub.training.optimization import Optimization
from hub.training.run_dir import RunDir
from hub.training.vae_objectives import (BETA_SCHEDULES, KL_FLOORS, NORMALISATIONS, beta_at, delete_tokens,
                                        drop_words, elbo_loss)

VAE_CURVES = "vae_curves.png"

RECIPES: dict[str, dict] = {
    # AdaVAE (spec §3): β cyclical 4 × (25 % zero, 25 % ramp), total hinge at 0.5·nz, decoder adapters from T/6.
    "adavae": {"beta_schedule": "cyclical", "kl_floor": "total_hinge", "kl_lambda": 0.5, "decoder_start": 1 / 6},
    # Park & Lee (spec §4): phase 1 an autoencoder (β 0, decoder side frozen, early stop on held-out Rec), then
    # β annealed linearly over the first half of phase 2, with a per-dimension KL floor.
    "two-phase": {"beta_schedule": "linear", "beta_ratio_increase": 0.5, "phase1": 1 / 3,
                  "phase1_freeze_decoder": True, "kl_floor": "per_dim_clamp", "kl_lambda": 0.5},
    # No remedy: β = 1 from the first step, no floor (the collapse baseline).
    "none": {"beta_schedule": "constant", "kl_floor": "none"},
}


@dataclass
class VAETrainConfig:
    name: str
    data: str
    base: str
    vae: dict
    recipe: str = "adavae"
    lr: float = 1e-3
    batch_size: int = 32
    max_length: int = MAX_LENGTH  # tokens of `<bos> x <eos>`; longer sentences are cut (their EOS kept)
    max_steps: int = 2000
    eval_every: int | None = None  # default: 10 evaluations per run
    max_eval_sentences: int = 500
    warmup_ratio: float = 0.1
    seed: int = 0
    beta_schedule: str = "cyclical"
    beta_max: float = 1.0
    beta_cycles: int = 4
    beta_ratio_zero: float = 0.25
    beta_ratio_increase: float = 0.25
    kl_floor: str = "none"
    kl_lambda: float = 0.5  # nats: per dimension (floors per_dim_*), or per dimension of the total (hinge: λ·nz)
    kl_normalisation: str = "per_sentence"
    denoise: float = 0.0
    word_dropout: float = 0.0  # decoder-input word dropout p (Bowman et al. 2016); not a recipe default
    decoder_start: float = 0.0  # fraction of the steps before the decoder adapters train
    phase1: float = 0.0  # fraction of the steps as a β = 0 autoencoder (ends early on held-out Rec)
    phase1_freeze_decoder: bool = False  # phase 1 trains the encoder side only (P&L "yf")
    phase1_patience: int = 2

    RESUMES_WITH: ClassVar[tuple[str, ...]] = ("name", "base", "vae", "recipe")  # `RunDir.prepare`

    @classmethod
    def for_recipe(cls, recipe: str, **options) -> "VAETrainConfig":
        """The recipe's defaults, then every option given (None = not given)."""
        if recipe not in RECIPES:
            raise HubError(f"recipe must be one of {', '.join(RECIPES)}, not {recipe!r}")
        given = {k: v for k, v in options.items() if v is not None}
        return cls(recipe=recipe, **{**RECIPES[recipe], **given}).validate()

    def validate(self) -> "VAETrainConfig":
        """Every choice and range checked before a run directory is created."""
        for value, allowed, what in ((self.beta_schedule, BETA_SCHEDULES, "--beta-schedule"),
                                     (self.kl_floor, KL_FLOORS, "--kl-floor"),
                                     (self.kl_normalisation, NORMALISATIONS, "--kl-normalisation")):
            if value not in allowed:
                raise HubError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
        fractions = {"--denoise": self.denoise, "--decoder-start": self.decoder_start, "--phase1": self.phase1,
                     "word_dropout": self.word_dropout}
        bad = [name for name, value in fractions.items() if not 0 <= value < 1]
        if bad or self.max_steps < 1 or self.batch_size < 1 or self.max_length < 3:
            raise HubError(f"need 0 <= {', '.join(bad or fractions)} < 1, max_steps and batch_size >= 1, "
                           f"max_length >= 3")
        return self

    def steps(self, fraction: float) -> int:
        return int(round(fraction * self.max_steps))


@dataclass
class VAETrainLog:
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    best_neg_elbo: float | None = None
    best_step: int | None = None
    phase2_start: int = 0  # where β may first be > 0 (after an early-stopped phase 1)
    train_seconds: float = 0.0


class VAETrainer:
    def __init__(self, backbone: Backbone, config: VAETrainConfig, run_dir: Path,
                 on_eval: Callable[["VAETrainer", dict], None] | None = None):
        """`on_eval(trainer, result)` runs after every held-out evaluation (learning-curve benchmarks use it)."""
        self.backbone, self.config, self.run_dir = backbone, config, run_dir
        self.run = RunDir(run_dir)
        self.on_eval = on_eval
        self.model = backbone.model
        torch.manual_seed(config.seed)
        self.vae = SentenceVAE(VAEConfig(**config.vae), self.model.config).to(backbone.device)
        self.tokenizer = backbone.tokenizer
        self.eos_id = self.tokenizer.eos_token_id or 0
        self.log = VAETrainLog(phase2_start=config.steps(config.phase1))
        self.step = 0

    @property
    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.vae.parameters())

    def parameter_report(self) -> dict:
        total = self.backbone.num_parameters
        return {"trainable_params": self.trainable_count, "backbone_params": total,
                "trainable_pct": 100.0 * self.trainable_count / total, "parts": self.vae.parameter_counts()}

    # -- data -----------------------------------------------------------------------------------------------
    def encode(self, sentences: list[str], what: str) -> list[list[int]]:
        rows = encode_sentences(self.tokenizer, sentences, self.config.max_length)
        if not rows:
            raise HubError(f"no usable {what} sentences")
        return rows

    def _batches(self, rows: list[list[int]], rng: random.Random) -> Iterator[list[list[int]]]:
        """Endless shuffled epochs; skips the batches a resumed run has already seen."""
        for batch in epoch_batches(len(rows), self.config.batch_size, rng, skip=self.step):
            yield [rows[i] for i in batch]

    # -- schedule -------------------------------------------------------------------------------------------
    def beta(self, step: int) -> float:
        c = self.config
        return beta_at(step, c.max_steps, c.beta_schedule, c.beta_max, self.log.phase2_start, c.beta_cycles,
                       c.beta_ratio_zero, c.beta_ratio_increase)

    def frozen(self, step: int) -> list[torch.nn.Module]:
        """Parts that do not train at `step`: decoder adapters before `decoder_start`; in a "yf" phase 1 the
        decoder adapters and the injector."""
        parts: list[torch.nn.Module] = []
        in_phase1 = step < self.log.phase2_start
        if step < self.config.steps(self.config.decoder_start) or (in_phase1 and self.config.phase1_freeze_decoder):
            parts.append(self.vae.decoder_adapters)
        if in_phase1 and self.config.phase1_freeze_decoder:
            parts.append(self.vae.injector)
        return parts

    def optimization(self) -> Optimization:
        """The run's optimiser: a warm-up over `warmup_ratio` of the steps, then linear decay."""
        c = self.config
        return Optimization.create(self.vae.parameters(), c.lr, c.max_steps,
                                   warmup_steps=max(1, c.steps(c.warmup_ratio)))

    # -- training -------------------------------------------------------------------------------------------
    def loss(self, rows: list[list[int]], beta: float, rng: random.Random) -> dict[str, torch.Tensor]:
        c, device = self.config, self.backbone.device
        enc_ids, enc_mask = pad_rows([delete_tokens(r, c.denoise, rng) for r in rows], device)
        ids, mask = pad_rows(rows, device)
        inputs = pad_rows([drop_words(r, c.word_dropout, rng, self.eos_id) for r in rows], device)[0] \
            if c.word_dropout > 0 else None
        mu, logvar = self.vae.encode(self.model, enc_ids, enc_mask)
        nll = self.vae.token_nll(self.model, ids, mask, self.vae.reparameterize(mu, logvar), inputs)
        return elbo_loss(nll, mask[:, 1:], mu, logvar, beta, c.kl_floor, c.kl_lambda, c.kl_normalisation)

    def train_step(self, rows: list[list[int]], optimization: Optimization) -> dict:
        """One optimiser step on a batch of sentences (the parts `frozen` at this step keep their weights); the
        step's record, also appended to the log."""
        beta = self.beta(self.step)
        parts = self.loss(rows, beta, random.Random(self.config.seed * 1_000_003 + self.step))
        parts["loss"].backward()
        for module in self.frozen(self.step):
            for p in module.parameters():
                p.grad = None
        lr = optimization.step()
        self.step += 1
        record = {"step": self.step, "beta": beta, "lr": lr, **{k: float(v.detach()) for k, v in parts.items()}}
        self.log.steps.append(record)
        return record

    def train(self, train_sentences: list[str], eval_sentences: list[str]) -> VAETrainLog:
        c = self.config
        train_rows = self.encode(train_sentences, "training")
        eval_rows = self.encode(eval_sentences, "held-out")[: c.max_eval_sentences]
        eval_every = c.eval_every or max(1, c.max_steps // 10)
        optimization = self.optimization()
        self._resume(optimization)
        batches = self._batches(train_rows, random.Random(c.seed))
        self.model.train()
        self.vae.train()
        bar = tqdm(total=c.max_steps, initial=self.step, desc=f"train {c.name}", unit="step")
        started = time.time() - self.log.train_seconds
        while self.step < c.max_steps:
            record = self.train_step(next(batches), optimization)
            bar.set_postfix(loss=f"{record['loss']:.2f}", rec=f"{record['rec']:.2f}", kl=f"{record['kl']:.2f}",
                            beta=f"{record['beta']:.2f}")
            bar.update()
            if self.step % eval_every == 0 or self.step == c.max_steps:
                self.log.train_seconds = time.time() - started
                self._eval_and_checkpoint(eval_rows, optimization, bar)
        bar.close()
        print(f"trained {self.step} steps in {self.log.train_seconds:.0f}s; best held-out -ELBO "
              f"{self.log.best_neg_elbo:.3f} at step {self.log.best_step}")
        return self.log

    @torch.no_grad()
    def evaluate(self, rows: list[list[int]]) -> dict:
        """Held-out −ELBO, Rec and KL per sentence (one z sample, fixed seed), AU and MI of the set."""
        self.model.eval()
        self.vae.eval()
        generator = torch.Generator().manual_seed(self.config.seed)
        rec = kl = 0.0
        mus, logvars = [], []
        for start in range(0, len(rows), 2 * self.config.batch_size):
            ids, mask = pad_rows(rows[start : start + 2 * self.config.batch_size], self.backbone.device)
            mu, logvar = self.vae.encode(self.model, ids, mask)
            z = self.vae.reparameterize(mu.cpu(), logvar.cpu(), generator=generator).to(mu)
            rec += float(self.vae.token_nll(self.model, ids, mask, z).sum())
            kl += float(kl_per_dim(mu, logvar).sum())
            mus.append(mu.float().cpu())
            logvars.append(logvar.float().cpu())
        self.model.train()
        self.vae.train()
        mu, logvar, n = torch.cat(mus), torch.cat(logvars), len(rows)
        return {"step": self.step, "neg_elbo": (rec + kl) / n, "rec": rec / n, "kl": kl / n,
                "au": active_units(mu), "mi": mutual_information(mu, logvar, generator), "beta": self.beta(self.step)}

    def _eval_and_checkpoint(self, eval_rows: list[list[int]], optimization: Optimization, bar: Any) -> None:
        result = self.evaluate(eval_rows)
        self.log.evals.append(result)
        bar.write(f"step {self.step}: held-out -ELBO {result['neg_elbo']:.3f} (Rec {result['rec']:.3f}, "
                  f"KL {result['kl']:.3f}), AU {result['au']}, MI {result['mi']:.2f}, beta {result['beta']:.2f}")
        self._end_phase1_if_stalled()
        if self.step >= self.log.phase2_start and (self.log.best_neg_elbo is None
                                                   or result["neg_elbo"] < self.log.best_neg_elbo):
            self.log.best_neg_elbo, self.log.best_step = result["neg_elbo"], self.step
            self.export(self.run.best, {"held_out": {k: result[k] for k in ("neg_elbo", "rec", "kl", "au", "mi")},
                                        "step": self.step})
        self.run.save_checkpoint(self.step, self.vae.state_dict(), optimization, asdict(self.log))
        self.run.write_log(asdict(self.log), VAE_CURVES, vae_curves_png)
        if self.on_eval:
            self.on_eval(self, result)

    def _end_phase1_if_stalled(self) -> None:
        """Phase 1 stops early once held-out Rec has not improved for `phase1_patience` evaluations."""
        phase1 = [e["rec"] for e in self.log.evals if e["step"] <= self.log.phase2_start]
        if self.step >= self.log.phase2_start or len(phase1) <= self.config.phase1_patience:
            return
        patience = self.config.phase1_patience
        if min(phase1[-patience:]) >= min(phase1[:-patience]) - 1e-3:
            self.log.phase2_start = self.step
            print(f"phase 1 stopped at step {self.step}: held-out reconstruction no longer improves")

    def _resume(self, optimization: Optimization) -> None:
        state = self.run.resume(self.backbone.device, optimization)
        if state is not None:
            self.vae.load_state_dict(state["trainable"])
            self.step, self.log = state["step"], VAETrainLog(**state["log"])

    def export(self, out_dir: Path, metrics: dict) -> None:
        """The bundle (`vae.safetensors`) and its metadata, atomically replacing `out_dir` (`write_export`)."""
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.vae.state_dict().items()}
        vae = self.vae.config
        meta = {"adapter_kind": SENTENCE_VAE, "name": self.config.name, "task_type": SENTENCE_VAE, "vae": vae.as_dict(),
                "nz": vae.nz, "encoder_layers": vae.encoder_layers, "pooling": vae.pooling,
                "injection": vae.injection, "bottleneck": vae.bottleneck, "recipe": self.config.recipe,
                "eos_token": self.tokenizer.eos_token, "max_length": self.config.max_length,
                **self.parameter_report(), "metrics": metrics, "backbone": self.backbone.fingerprint,
                "training": asdict(self.config)}
        write_export(out_dir, meta, lambda folder: save_file(tensors, str(folder / VAE_WEIGHTS)))
