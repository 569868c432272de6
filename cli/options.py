"""CLI options shared by `cli.main` and `cli.vae`."""

from __future__ import annotations

import os

import typer

DEFAULT_STORE = os.environ.get("HUB_STORE", "adapters_store")
StoreOption = typer.Option(DEFAULT_STORE, "--store", help="adapter store folder (env HUB_STORE)")
DeviceOption = typer.Option("auto", "--device", help="auto | cpu | cuda")
BaseOption = typer.Option(None, "--base", help="GPT-2 HF id or local folder (env HUB_BASE)")
