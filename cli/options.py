"""CLI options shared by `cli.main` and `cli.vae`."""

from __future__ import annotations

import os

import typer

DEFAULT_STORE = os.environ.get("HUB_STORE", "adapters_store")
StoreOption = typer.Option(DEFAULT_STORE, "--store", help="adapter store: a folder, or an fsspec URL such as "
                           "s3://bucket/prefix (env HUB_STORE)")
DeviceOption = typer.Option("auto", "--device", help="auto | cpu | cuda")
BaseOption = typer.Option(None, "--base", help="GPT-2 HF id or local folder (env HUB_BASE)")
TrainBaseOption = typer.Option("gpt2", "--base", envvar="HUB_BASE", show_default=True,
                               help="GPT-2 to train on: a local folder (offline: ../shared/models/gpt2-standin) "
                                    "or a Hugging Face id, downloaded when online (env HUB_BASE)")
