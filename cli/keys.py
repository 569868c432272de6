"""`hub keys add|list|remove|hash`: the API keys file of `hub serve --keys` (docs/TENANTS.md). A new key is
printed once; the file keeps only its SHA-256."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from cli.common import print_json

keys_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                       help="API keys for `hub serve --keys`: scopes (tasks), admin, quotas.")

KeysFileOption = typer.Option(Path("keys.toml"), "--keys", help="the keys file")


@keys_app.command()
def add(
    name: str = typer.Argument(..., help="the key's name (shown in /metrics and the log, never the secret)"),
    tasks: List[str] = typer.Option(..., "--task", help="a task name or glob this key may call (repeat; '*': all)"),
    admin: bool = typer.Option(False, "--admin", help="may call /v1/admin/* (reload, unload)"),
    requests_per_second: Optional[float] = typer.Option(None, "--requests-per-second", min=0.001),
    tokens_per_minute: Optional[float] = typer.Option(None, "--tokens-per-minute", min=1),
    keys: Path = KeysFileOption,
) -> None:
    """Create a key: the file gets its hash, the secret is printed once (to stdout)."""
    from server.keys import KeySpec, add_key, digest, new_secret

    secret = new_secret()
    add_key(keys, KeySpec(name, digest(secret), tuple(tasks), admin, requests_per_second, tokens_per_minute))
    typer.echo(f"added key {name!r} to {keys}; it is shown only now:", err=True)
    typer.echo(secret)


@keys_app.command("list")
def list_keys(keys: Path = KeysFileOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """Each key's name, tasks, admin flag and quotas (no hashes, no secrets)."""
    from server.keys import read_keys

    rows = [{"name": s.name, "tasks": list(s.tasks), "admin": s.admin,
             "requests_per_second": s.requests_per_second, "tokens_per_minute": s.tokens_per_minute}
            for s in sorted(read_keys(keys).values(), key=lambda s: s.name)]
    if as_json:
        return print_json(rows)
    for row in rows:
        limits = ", ".join(f"{k} {row[k]:g}" for k in ("requests_per_second", "tokens_per_minute") if row[k])
        typer.echo(f"{row['name']:<20} tasks {', '.join(row['tasks']) or '(none)'}"
                   f"{'  admin' if row['admin'] else ''}{'  ' + limits if limits else ''}")


@keys_app.command()
def remove(name: str = typer.Argument(...), keys: Path = KeysFileOption) -> None:
    """Delete a key (a server watching the file refuses it within a second or two)."""
    from server.keys import remove_key

    remove_key(keys, name)
    typer.echo(f"removed key {name!r} from {keys}", err=True)


@keys_app.command("hash")
def hash_key() -> None:
    """Print the sha256 line for a key of your own, read from stdin (for writing keys.toml by hand)."""
    from server.keys import digest

    secret = sys.stdin.readline().strip()
    if not secret:
        raise typer.BadParameter("give the key on stdin")
    typer.echo(f'sha256 = "{digest(secret)}"')
