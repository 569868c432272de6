"""MVCR (`hub train --mvcr`): training-only autoencoders that leave no trace in the export or in serving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.main import app
from hub.errors import HubError
from hub.evaluation.decode import from_run
from hub.model.backbone import load_backbone
from hub.store.layout import ADAPTER_META
from hub.task import Example
from hub.training.baselines import make_trainer
from hub.training.regularizers.mvcr import (MVCR, HierarchicalAutoencoder, sample_views, view_probabilities)
from hub.training.subset import low_resource_subset
from hub.training.run_dir import RunDir
from hub.training.trainer import TrainConfig
from tasks import make_task

STEPS = 4


def invoke(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def cli_error(*args) -> str:
    """The message of the `HubError` the CLI stops with (`hub` prints it as one `error:` line)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert isinstance(result.exception, HubError), result.output
    return str(result.exception)


def train_args(base: Path, data: Path, out: Path, *extra) -> list:
    return ["train", "e2e", "--base", base, "--data", data, "--max-steps", STEPS, "--eval-every", STEPS,
            "--batch-size", 4, "--grad-accum", 1, "--device", "cpu", "--out", out, *extra]


@pytest.fixture(scope="module")
def plain_run(tiny_base, e2e_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("plain") / "run"
    invoke(*train_args(tiny_base, e2e_dir, run))
    return run


@pytest.fixture(scope="module")
def mvcr_trainer(tiny_base, e2e_dir, tmp_path_factory):
    """A trainer that has trained with MVCR (evaluated once, at the last step, so best/ is the final model)."""
    task = make_task("e2e")
    backbone = load_backbone(str(tiny_base), "cpu", dtype=torch.float32)
    config = TrainConfig(name="e2e", task_type="e2e", task_config={}, data=str(e2e_dir), bottleneck=10, lr=5e-3,
                         batch_size=4, grad_accum=1, max_length=128, epochs=1, max_steps=STEPS, eval_every=STEPS,
                         base=str(tiny_base), regularizers={"mvcr": {"dims": [8, 16], "pretrain_epochs": 1}})
    run = tmp_path_factory.mktemp("mvcr") / "run"
    trainer = make_trainer(backbone, task, config, run)
    RunDir(run).prepare(config)
    trainer.train(task.load_examples(str(e2e_dir), "train"), task.load_examples(str(e2e_dir), "validation"))
    return trainer


def hooked_mlps(model: torch.nn.Module) -> list[int]:
    return [i for i, block in enumerate(model.transformer.h) if block.mlp._forward_hooks]


# -- the autoencoders and the views ---------------------------------------------------------------------------

def test_hierarchical_autoencoder_shapes():
    ae = HierarchicalAutoencoder(32, 8)
    assert ae(torch.randn(2, 5, 32)).shape == (2, 5, 32)
    assert [m.weight.shape for m in ae.inner[0] if isinstance(m, torch.nn.Linear)] == [(4, 8), (8, 4)]
    assert ae.encode[0].weight.shape == (8, 32) and ae.decode.weight.shape == (32, 8)


class Constant(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.full_like(h, self.value)


def test_views_are_drawn_per_position_with_mvcr_frequencies():
    """K = 3: each HAE 1/5 of the positions, the identity 2/5; one draw per position for the whole batch."""
    torch.manual_seed(0)
    autoencoders = torch.nn.ModuleList([Constant(1.0), Constant(2.0), Constant(3.0)])
    views = sample_views(torch.zeros(3, 20000, 4), autoencoders)  # identity keeps 0
    assert torch.equal(views[0], views[1]) and torch.equal(views[0], views[2])
    frequencies = torch.bincount(views[0, :, 0].long(), minlength=4).float() / views.shape[1]
    expected = torch.tensor([view_probabilities(3)[-1], *view_probabilities(3)[:3]])
    assert torch.allclose(frequencies, expected, atol=0.015)
    assert view_probabilities(3) == pytest.approx([0.2, 0.2, 0.2, 0.4])


def test_eval_mode_is_the_identity_and_training_mode_is_not(tiny_base):
    model = load_backbone(str(tiny_base), "cpu", dtype=torch.float32).model
    settings = MVCR.resolve({"layers": [0, 1], "dims": [8], "noise": 0.5}, model)
    mvcr = MVCR(settings, model, seed=0)
    ids = torch.randint(0, 8000, (2, 7))
    with torch.no_grad():
        expected = model.eval()(ids).logits
        with mvcr.attached(model):
            assert torch.equal(model.eval()(ids).logits, expected)
            torch.manual_seed(1)
            with_views = model.train()(ids).logits
        torch.manual_seed(1)
        without = model.train()(ids).logits
    assert not torch.allclose(with_views, without)
    assert hooked_mlps(model) == []


def test_defaults_scale_with_the_model(tiny_base):
    model = load_backbone(str(tiny_base), "cpu", dtype=torch.float32).model  # 2 blocks, d = 32
    settings = MVCR.resolve({}, model)
    assert settings == {"layers": [1], "dims": [5, 11, 21], "noise": 0.002, "pretrain_epochs": 4, "ae_lr": 1e-3,
                        "p_identity": 0.4}


def test_reconstruction_step_touches_only_the_autoencoders(tiny_base):
    model = load_backbone(str(tiny_base), "cpu", dtype=torch.float32).model
    for param in model.parameters():
        param.requires_grad_(True)  # as in full fine-tuning: the model could take gradients, but must not
    mvcr = MVCR(MVCR.resolve({"layers": [0, 1], "dims": [8, 6]}, model), model, seed=0)
    model_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    outer = [ae.decode.weight for aes in mvcr.autoencoders.values() for ae in aes]  # used by every draw
    outer_before = [p.detach().clone() for p in outer]
    with mvcr.attached(model):
        model.train()(torch.randint(0, 8000, (2, 7)))  # a task step's forward pass stores the MLP outputs
        logged = mvcr.after_step()
    assert logged["reconstruction_loss"] > 0
    assert all(torch.equal(p, model_before[n]) and p.grad is None for n, p in model.named_parameters())
    assert all(not torch.equal(p, before) for p, before in zip(outer, outer_before))
    optimised = {id(p) for opt in mvcr.optimizers.values() for group in opt.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in mvcr.parameters()}


def _reconstruct_on_own_data(rank: int, world_size: int, base: str, port: int, out: str) -> None:
    """One data-parallel process, joined as under a launcher: MVCR's reconstruction steps on its own batches."""
    import os

    import torch.distributed as dist

    from hub.training import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    process = distributed.join("cpu")
    assert process.world_size == world_size
    torch.manual_seed(100 + rank)  # each rank's own data and noise, as in training
    model = load_backbone(base, "cpu", dtype=torch.float32).model
    mvcr = MVCR(MVCR.resolve({"layers": [1], "dims": [8, 6]}, model), model, seed=0,
                average_gradients=process.average_gradients)
    with mvcr.attached(model):
        for _ in range(3):
            model.train()(torch.randint(0, 8000, (2, 7)))
            mvcr.after_step()
    torch.save([p.detach() for p in mvcr.parameters()], f"{out}.{rank}")
    dist.destroy_process_group()


def test_data_parallel_processes_keep_equal_autoencoders(tiny_base, tmp_path):
    """Each process steps the autoencoders on its own batches; gradients averaged first, they stay equal."""
    import torch.multiprocessing as mp

    from tests.test_distributed import free_port

    out = str(tmp_path / "params")
    mp.spawn(_reconstruct_on_own_data, args=(2, str(tiny_base), free_port(), out), nprocs=2)
    first, second = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    single = MVCR(MVCR.resolve({"layers": [1], "dims": [8, 6]}, load_backbone(str(tiny_base), "cpu").model),
                  load_backbone(str(tiny_base), "cpu").model, seed=0).parameters()
    assert any(not torch.equal(a, b) for a, b in zip(first, single)), "the steps changed the autoencoders"


# -- plugged out after training -------------------------------------------------------------------------------

def test_hooks_are_gone_after_training(mvcr_trainer):
    assert hooked_mlps(mvcr_trainer.model) == []
    steps = mvcr_trainer.log.steps
    assert len(steps) == STEPS and all(s["reconstruction_loss"] > 0 for s in steps)


def test_served_export_gives_the_trained_models_logits(mvcr_trainer, tiny_base):
    model = mvcr_trainer.model.eval()
    ids = torch.randint(0, 8000, (2, 9))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    served = from_run(mvcr_trainer.run_dir, str(tiny_base), "cpu", make_task)  # a fresh backbone on the serving engine
    assert hooked_mlps(served.model) == []
    with torch.no_grad(), served.activate():
        actual = served.model(input_ids=ids).logits
    vocab = served.base_vocab
    assert torch.allclose(actual[..., :vocab], trained[..., :vocab], atol=1e-4)


def test_export_has_the_files_keys_and_shapes_of_a_plain_one(mvcr_trainer, plain_run):
    mvcr_best, plain_best = mvcr_trainer.run_dir / "best", plain_run / "best"
    assert sorted(p.name for p in mvcr_best.iterdir()) == sorted(p.name for p in plain_best.iterdir())
    for path in plain_best.glob("*.safetensors"):
        mine, plain = load_file(mvcr_best / path.name), load_file(path)
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in plain.items()}
    assert (mvcr_best / "adapter_config.json").read_bytes() == (plain_best / "adapter_config.json").read_bytes()
    meta = json.loads((mvcr_best / ADAPTER_META).read_text())
    assert meta["training"]["regularizers"]["mvcr"] == {"layers": [1], "dims": [8, 16], "noise": 0.002,
                                                        "pretrain_epochs": 1, "ae_lr": 1e-3, "p_identity": 1 / 3}
    assert json.loads((plain_best / ADAPTER_META).read_text())["training"]["regularizers"] == {}


def test_cli_mvcr_run_publishes_and_shows_its_settings(tiny_base, e2e_dir, tmp_path):
    run, store = tmp_path / "run", tmp_path / "store"
    invoke(*train_args(tiny_base, e2e_dir, run, "--mvcr", "--mvcr-layers", "0,1", "--mvcr-dims", "6",
                       "--mvcr-pretrain-epochs", 1, "--train-examples", 12, "--data-seed", 3))
    invoke("publish", run, "--store", store)
    meta = json.loads(invoke("show", "e2e", "--store", store, "--json"))
    assert meta["training"]["regularizers"]["mvcr"]["layers"] == [0, 1]
    assert (meta["training"]["train_examples"], meta["training"]["data_seed"]) == (12, 3)
    assert "trained with mvcr" in invoke("show", "e2e", "--store", store)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_baselines_train_with_mvcr(method, tiny_base, e2e_dir, tmp_path):
    invoke(*train_args(tiny_base, e2e_dir, tmp_path / "run", "--method", method, "--mvcr", "--mvcr-dims", "6",
                       "--mvcr-pretrain-epochs", 1))
    meta = json.loads((tmp_path / "run" / "best" / "task_meta.json").read_text())
    assert meta["training"]["regularizers"]["mvcr"]["dims"] == [6]


@pytest.mark.parametrize("options, words", [
    (["--mvcr", "--mvcr-layers", "2"], ["--mvcr-layers [2]", "0..1"]),
    (["--mvcr", "--mvcr-layers", "0,0"], ["distinct"]),
    (["--mvcr", "--mvcr-layers", "six"], ["--mvcr-layers 'six'", "whole numbers"]),
    (["--mvcr", "--mvcr-dims", "1,8"], ["--mvcr-dims [1, 8]", "> 1"]),
    (["--mvcr", "--mvcr-noise", "-1"], ["--mvcr-noise"]),
    (["--mvcr", "--mvcr-ae-lr", "0"], ["--mvcr-ae-lr"]),
    (["--mvcr-noise", "0.1"], ["without --mvcr"]),
    (["--train-examples", "0"], ["--train-examples 0"]),
    (["--train-examples", "100000"], ["only 24"]),
])
def test_bad_options_give_clear_errors(options, words, tiny_base, e2e_dir, tmp_path):
    message = cli_error(*train_args(tiny_base, e2e_dir, tmp_path / "run", *options))
    assert all(word in message for word in words), message
    assert not (tmp_path / "run").exists()  # refused before the run folder is made: a corrected retry works


# -- low-resource subsets -------------------------------------------------------------------------------------

def test_subset_takes_whole_inputs_in_a_seeded_order():
    examples = [Example(f"mr {i}", f"ref {i}.{j}") for i in range(10) for j in range(4)]
    subset = low_resource_subset(examples, 10, seed=1)
    assert len(subset) == 10 and len({e.source for e in subset}) == 3  # 4 + 4 + 2 references
    assert subset == low_resource_subset(examples, 10, seed=1)
    assert subset != low_resource_subset(examples, 10, seed=2)
    full_inputs = [s for s in {e.source for e in subset} if sum(e.source == s for e in subset) == 4]
    assert len(full_inputs) == 2


def test_subset_of_examples_without_inputs_is_a_random_sample():
    texts = [Example(None, f"sentence {i}") for i in range(100)]
    subset = low_resource_subset(texts, 10, seed=0)
    assert len({e.target for e in subset}) == 10 and subset != texts[:10]


def test_mvcr_on_a_sentence_vae_is_refused_clearly(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["train", "sentence_vae", "--data", str(tmp_path), "--mvcr", "--out",
                                      str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "sentence_vae training does not support --mvcr" in result.output + str(result.exception)
    assert not (tmp_path / "run").exists()
