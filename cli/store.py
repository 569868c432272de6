"""`hub publish | list | show | export | rm | store gc`: the adapter store from the command line."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from cli.common import StoreOption, open_store, print_json
from hub.errors import HubError
from hub.store.layout import STALE_AFTER_S


class ExportFormat(str, Enum):
    """What `hub export` writes: `adapterhub`, a folder plain transformers + adapters load (`hub.interop`)."""

    adapterhub = "adapterhub"


def publish(
    run_dir: Path = typer.Argument(..., help="a run directory (its best/ is published) or an export folder"),
    name: Optional[str] = typer.Option(None, "--name"),
    version: Optional[str] = typer.Option(None, "--version"),
    store: str = StoreOption,
) -> None:
    """Publish a trained adapter into the store (atomic; versions are kept)."""
    from hub.store.export import export_dir

    export = export_dir(run_dir)
    if (export / "task_meta.json").is_file():  # hub.training.baselines.BASELINE_META, not imported: it loads slowly
        raise HubError(f"{run_dir} is a --method full or lora baseline (a separate model), not an adapter: the "
                       f"store holds adapters only. Evaluate it with: hub eval --model {run_dir} --data ...")
    stored = open_store(store).publish(export, name=name, version=version)
    typer.echo(f"published {stored.ref} to {stored.path}")


def list_adapters(store: str = StoreOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """List published adapters and their versions."""
    rows = [_list_row(s) for s in open_store(store).list()]
    if as_json:
        return print_json(rows)
    if not rows:
        typer.echo(f"no adapters in {store}")
    for r in rows:
        if r["versions"]:
            typer.echo(f"{r['name']:<24} {r['task_type']:<10} b={r['bottleneck']:<4} {r['trainable_pct']:.2f}%  "
                       f"versions {', '.join(r['versions'])}")
        for skipped in r["skipped"]:
            typer.echo(f"{r['name']:<24} skipped {skipped['version'] or '(all)'}: {skipped['reason']}")


def _list_row(summary) -> dict:
    """One `hub list` row: the newest usable version's metadata, and every skipped version with its reason."""
    skipped = [{"version": k.version, "reason": k.reason} for k in summary.skipped]
    row = {"name": summary.name, "versions": [v.version for v in summary.versions], "skipped": skipped}
    if summary.versions:
        meta = summary.latest.meta
        row.update(latest=summary.latest.version, task_type=meta.task_type, bottleneck=meta.bottleneck,
                   trainable_pct=round(meta.trainable_pct, 3))
    return row


def show(ref: str = typer.Argument(..., help="NAME or NAME@VERSION"), store: str = StoreOption,
         as_json: bool = typer.Option(False, "--json"),
         plot: bool = typer.Option(False, "--plot", help="also write the training curve (its train_log.json) as PNG"),
         plot_out: Optional[Path] = typer.Option(None, "--plot-out", help="PNG path (default NAME-VERSION-curve.png)"),
         ) -> None:
    """Show one adapter version's metadata (and, with --plot, draw its training curve)."""
    adapter_store = open_store(store)
    stored = adapter_store.show(ref)
    if as_json:
        print_json(stored.meta.to_dict())
    else:
        _print_version(stored)
    if plot:
        from hub.plots import training_curve_png, write_png
        from hub.store.refs import Ref

        stored, log = adapter_store.training_log(stored.ref)
        path = write_png(training_curve_png(log, f"{stored.ref}: training curve"),
                         plot_out or Path(f"{Ref(stored.name, stored.version).slug}-curve.png"))
        typer.echo(f"training curve written to {path}", err=as_json)


def _print_version(stored) -> None:
    from hub.adapters.registry import kind_spec

    meta = stored.meta
    typer.echo(f"{stored.ref}  ({meta.task_type}, created {meta.created_at})\n"
               f"  bottleneck {meta.bottleneck}, {meta.trainable_params:,} trainable parameters "
               f"({meta.trainable_pct:.2f}% of the backbone)\n"
               f"  {kind_spec(meta.adapter_kind).describe(meta)}\n"
               f"  backbone {meta.backbone.get('source', '?')}\n  metrics {json.dumps(meta.to_dict()['metrics'])}")
    for name, settings in meta.to_dict().get("training", {}).get("regularizers", {}).items():
        typer.echo(f"  trained with {name} {json.dumps(settings)}")


def export(ref: str = typer.Argument(..., help="NAME or NAME@VERSION"),
           out: Path = typer.Option(..., "--out", help="folder to write (new or empty)"),
           export_format: ExportFormat = typer.Option(ExportFormat.adapterhub, "--format"),
           store: str = StoreOption) -> None:
    """Export a stored version for use outside the hub: load it with hub.interop.load_into_adapters."""
    from hub.interop import export_adapterhub

    loaded = open_store(store).load(ref)  # verifies the checksums first
    if not isinstance(loaded.path, Path):
        raise HubError(f"hub export reads a local store; {store} is an object store: publish the run to a local "
                       f"store (hub publish RUN --store FOLDER) and export from there")
    path = export_adapterhub(loaded.path, out)
    typer.echo(f"exported {loaded.ref} ({export_format.value}) to {path}; load it with:\n"
               f"  task = hub.interop.load_into_adapters(GPT2LMHeadModel.from_pretrained(BASE), '{path}')")


def rm(ref: str = typer.Argument(..., help="NAME (all versions) or NAME@VERSION"), store: str = StoreOption) -> None:
    """Remove an adapter version, or all versions of a name."""
    for removed in open_store(store).remove(ref):
        typer.echo(f"removed {removed}")


store_app = typer.Typer(no_args_is_help=True, help="Store maintenance.")


@store_app.command("gc")
def store_gc(store: str = StoreOption,
             older_than: float = typer.Option(STALE_AFTER_S, "--older-than", help="seconds; younger leftovers may "
                                              "be a publish in progress")) -> None:
    """Remove staging and trash folders left by killed publishes and removals."""
    removed = open_store(store).gc(older_than)
    for path in removed:
        typer.echo(f"removed {path}")
    typer.echo(f"{len(removed)} leftovers removed from {store}")


def register(app: typer.Typer) -> None:
    """Add the store commands to the `hub` app."""
    app.command()(publish)
    app.command("list")(list_adapters)
    app.command()(show)
    app.command("export")(export)
    app.command()(rm)
    app.add_typer(store_app, name="store")
