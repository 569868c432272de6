"""`KindSpec`: the one extension point of an adapter kind, as every layer of the hub sees it.

A kind registers one `KindSpec` (`hub.adapters.registry.register`; the built-in kinds are registered when `hub`
is imported, so this module and each kind's spec module stay free of torch). It says
  * how the store keeps the kind (`stored`, a `hub.store.kinds.StoredKind`: payload files, weights file, whether
    it has task tokens, its metadata checks, its weights format);
  * where its implementation is (`implementation`: an `AdapterKind`, which loads bundles, installs the kind's
    runtime on a backbone, refuses text input where the kind takes none, and gives the task its versions serve
    under), imported only when a version of the kind is first served;
  * whether a request may compose several of its adapters on one row (`composable`: its runtime applies a
    row's `hub.adapters.base.SlotComposition`);
  * its optional hooks in the layers above: `hub train <kind>` (`cli_train(args, options)`), `hub eval`
    (`cli_eval(meta, **target)`), its HTTP routes (`http_router(backend) -> APIRouter | None`), and the line
    `hub show` prints (`summary(meta)`).

Hooks and the implementation are `Hook`s: a callable, or an entry-point reference `"module:attribute"` resolved by
`load_hook` when first needed. The built-in kinds name their CLI and HTTP hooks by reference, because the library
never imports the command line or the server (`.importlinter`); a kind defined outside the hub may pass callables.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint
from typing import TYPE_CHECKING, Any, Callable, Union

from hub.store.format import AdapterMeta
from hub.store.kinds import StoredKind

if TYPE_CHECKING:
    from hub.adapters.base import AdapterKind

Hook = Union[str, Callable[..., Any]]  # a callable, or "module:attribute" (entry-point syntax)


def load_hook(hook: Hook) -> Callable[..., Any]:
    """The callable a hook names (imported on first use when it is a reference)."""
    return hook if callable(hook) else EntryPoint(name=hook, value=hook, group="hub.adapter_kinds").load()


@dataclass(frozen=True)
class KindSpec:
    """One adapter kind: see the module docstring. `description`: one line for `hub tasks`."""

    stored: StoredKind
    implementation: Hook  # () -> AdapterKind
    description: str = ""
    composable: bool = False
    summary: Callable[[AdapterMeta], str] | None = None
    cli_train: Hook | None = None
    cli_eval: Hook | None = None
    http_router: Hook | None = None

    @property
    def name(self) -> str:
        """The kind's name in a version's metadata (`adapter_kind`)."""
        return self.stored.name

    def load_implementation(self) -> "AdapterKind":
        return load_hook(self.implementation)()

    def describe(self, meta: AdapterMeta) -> str:
        """`hub show`'s line about a version of this kind: its summary, else its special tokens."""
        return self.summary(meta) if self.summary else f"special tokens {' '.join(meta.special_tokens)}"
