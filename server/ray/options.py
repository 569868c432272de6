"""What a Ray deployment of the hub is built from: `RayServeOptions` (pickled to every node), and the same options
from `serve run` / RayService string arguments, each converted to its dataclass field's type."""

from __future__ import annotations

import types
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Union, get_args, get_origin, get_type_hints

from hub.errors import HubError
from hub.serving.service import ServiceSettings
from server.edge import DEFAULT_MAX_BODY_BYTES

REPLICA_HEADER = "x-hub-replica"
APP_NAME = "hub"


@dataclass(frozen=True)
class RayServeOptions:
    """Everything a replica needs to build itself (pickled to every node)."""

    store: str
    base: str | None = None
    device: str = "cpu"
    dtype: str = "auto"  # or a torch dtype name: float32, bfloat16, float16
    threads: int | None = None  # torch threads per replica (default: Ray's OMP_NUM_THREADS, its CPUs)
    replicas: int = 2
    max_tasks_per_replica: int = 8
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    service: ServiceSettings = field(default_factory=ServiceSettings)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    keys: str | None = None  # the keys file (`hub serve --keys`), read by the ingress

    @property
    def replica_capacity(self) -> int:
        """Requests one replica holds: its running batch and its queue."""
        return self.service.max_batch + self.service.max_queue


def _argument_types(cls: type) -> dict[str, Callable[[str], Any]]:
    """Field name -> what turns its string argument into the field's type (the type beside None of an
    optional field); nested settings objects are left out."""
    converters = {}
    for name, hint in get_type_hints(cls).items():
        if get_origin(hint) in (Union, types.UnionType):
            hint = next(arg for arg in get_args(hint) if arg is not type(None))
        if hint in (int, float, str):
            converters[name] = hint
    return converters


def options_from_args(args: dict[str, str]) -> RayServeOptions:
    """Options from `serve run` / RayService string arguments (ServiceSettings' fields go into `service`)."""
    service_names = {f.name for f in fields(ServiceSettings)}
    types_of = {**_argument_types(ServiceSettings), **_argument_types(RayServeOptions)}
    unknown = sorted(args.keys() - types_of.keys())
    if unknown or "store" not in args:
        raise HubError(f"app_builder takes store=URL and the options of `hub serve --ray`; unknown: {unknown}")
    try:
        values = {k: types_of[k](v) for k, v in args.items()}
    except ValueError as err:
        raise HubError(f"app_builder: {err}") from None
    return RayServeOptions(**{k: v for k, v in values.items() if k not in service_names},
                           service=ServiceSettings(**{k: v for k, v in values.items() if k in service_names}))
