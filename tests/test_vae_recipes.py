"""The sentence-VAE recipes by their mechanics, through `VAETrainer.train`: which parts of the bundle receive a
gradient at which optimiser step (AdaVAE's decoder start; the two-phase recipe's phase 1 without the decoder
adapters and the injector), β at every step as the loss applies it, and phase 1 ending early once the held-out
reconstruction stalls."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from torch.optim.optimizer import register_optimizer_step_pre_hook

from hub.model.backbone import load_backbone
from hub.training.run_dir import RunDir
from hub.training.vae import VAETrainConfig, VAETrainer

SENTENCES = ["a man walks a dog .", "two people sit on a bench .", "a woman reads a book .", "the kids play outside .",
             "a dog runs in the park .", "a man rides a bike .", "the girl eats an apple .", "a cat sleeps ."]
ENCODER_SIDE = {"encoder_adapters", "pooling", "heads"}
EVERY_PART = ENCODER_SIDE | {"decoder_adapters", "injector"}


@pytest.fixture(scope="module")
def backbone(tiny_base):
    return load_backbone(str(tiny_base), "cpu")


def make_trainer(backbone, run_dir: Path, recipe: str, trainer_class=VAETrainer, **options) -> VAETrainer:
    options = {"batch_size": 4, "max_steps": 12, "eval_every": 100, "max_eval_sentences": 4, "warmup_ratio": 0.0,
               **options}
    config = VAETrainConfig.for_recipe(recipe, name="v", data="-", base="-",
                                       vae={"nz": 4, "encoder_layers": 1, "bottleneck": 3}, **options)
    RunDir(run_dir).prepare(config)
    return trainer_class(backbone, config, run_dir)


@contextmanager
def parts_with_gradient(trainer: VAETrainer) -> Iterator[list[set[str]]]:
    """Per optimiser step, the parts of the bundle holding a non-zero gradient when the optimiser steps."""
    seen: list[set[str]] = []

    def record(optimizer, args, kwargs) -> None:
        seen.append({name for name, part in trainer.vae.parts().items()
                     if any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())})

    handle = register_optimizer_step_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def train(trainer: VAETrainer) -> list[set[str]]:
    with parts_with_gradient(trainer) as seen:
        trainer.train(SENTENCES * 4, SENTENCES[:4])
    assert len(seen) == trainer.config.max_steps
    return seen


def betas(trainer: VAETrainer) -> list[float]:
    return [s["beta"] for s in trainer.log.steps]


def test_adavae_trains_the_decoder_adapters_from_decoder_start(backbone, tmp_path):
    # 12 steps, decoder_start 1/6: the decoder adapters are frozen at steps 0 and 1 and train from step 2;
    # everything else trains from step 0.
    trainer = make_trainer(backbone, tmp_path / "run", "adavae")
    seen = train(trainer)
    assert seen[:2] == [EVERY_PART - {"decoder_adapters"}] * 2
    assert seen[2:] == [EVERY_PART] * 10


def test_adavae_beta_per_step_as_the_loss_applies_it(backbone, tmp_path):
    # 32 steps = 4 cycles of 8: position k/8 in a cycle, 0 below 1/4, then a ramp over 1/4, then 1:
    # k = 0, 1, 2 -> 0; k = 3 -> 0.5; k = 4..7 -> 1.
    trainer = make_trainer(backbone, tmp_path / "run", "adavae", max_steps=32)
    train(trainer)
    assert betas(trainer) == pytest.approx([0, 0, 0, 0.5, 1, 1, 1, 1] * 4)
    # total hinge at λ·nz = 0.5 · 4 = 2 nats: loss = Rec + β · max(KL, 2) (per-sentence normalisation)
    for s in trainer.log.steps:
        assert s["loss"] == pytest.approx(s["rec"] + s["beta"] * max(s["kl"], 2.0), rel=1e-5)


def test_two_phase_phase1_is_an_encoder_side_autoencoder(backbone, tmp_path):
    # 12 steps, phase 1 = 1/3 = 4 steps (held-out evaluation only at the end, so it cannot stop early):
    # β 0 and only the encoder side trains ("yf": decoder adapters and injector frozen); then everything trains
    # and β rises linearly over half of the 8 phase-2 steps.
    trainer = make_trainer(backbone, tmp_path / "run", "two-phase")
    seen = train(trainer)
    assert seen[:4] == [ENCODER_SIDE] * 4
    assert seen[4:] == [EVERY_PART] * 8
    assert betas(trainer) == pytest.approx([0, 0, 0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1, 1])
    for s in trainer.log.steps[:5]:
        assert s["loss"] == pytest.approx(s["rec"])  # β = 0: the KL term is absent, not merely small


def test_two_phase_phase1_trains_the_decoder_side_when_asked(backbone, tmp_path):
    # P&L "nf": nothing frozen in phase 1 (β still 0)
    trainer = make_trainer(backbone, tmp_path / "run", "two-phase", phase1_freeze_decoder=False)
    assert train(trainer) == [EVERY_PART] * 12
    assert betas(trainer)[:5] == [0.0] * 5


class ScriptedReconstruction(VAETrainer):
    """Held-out evaluations whose Rec follows a script, so phase 1's stopping rule sees a known sequence."""

    script: list[float] = []

    def evaluate(self, rows: list[list[int]]) -> dict:
        return {**super().evaluate(rows), "rec": self.script[len(self.log.evals)]}


@pytest.mark.parametrize("script, phase2_start", [
    ([5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0], 8),  # no better than 4.0 for 2 evaluations after step 4: ends at 8
    ([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1], 12),  # still improving: phase 1 runs its 12 steps
])
def test_phase1_ends_when_held_out_reconstruction_stalls(backbone, tmp_path, script, phase2_start):
    # 16 steps, phase 1 = 3/4 = 12 steps, evaluated every 2 steps, patience 2.
    trainer = make_trainer(backbone, tmp_path / "run", "two-phase", trainer_class=ScriptedReconstruction,
                           max_steps=16, phase1=0.75, eval_every=2)
    trainer.script = script
    seen = train(trainer)
    assert trainer.log.phase2_start == phase2_start
    assert seen[:phase2_start] == [ENCODER_SIDE] * phase2_start
    assert seen[phase2_start:] == [EVERY_PART] * (16 - phase2_start)
    beta = betas(trainer)
    assert beta[: phase2_start + 1] == [0.0] * (phase2_start + 1) and all(b > 0 for b in beta[phase2_start + 1:])
