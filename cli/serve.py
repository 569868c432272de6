"""`hub generate` (one request on the engine) and `hub serve` (HTTP, in process or on Ray Serve).

Unset options keep the library's defaults (`ServiceSettings`, `RayServeOptions`, `server.edge`): a command's
options become those settings objects in one place, `cli.common.settings`."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from cli.common import (
    Admission, BankDType, BaseOption, DeviceOption, DType, DTypeOption, StoreOption, ThreadsOption, open_store,
    print_json, set_threads, settings,
)

DEFAULT = "(default: the library's)"


def generate(
    text: str = typer.Argument(..., help="the task input, e.g. an E2E meaning representation"),
    task: str = typer.Option(..., "--task", help="adapter NAME or NAME@VERSION"),
    store: str = StoreOption,
    base: Optional[str] = BaseOption,
    device: str = DeviceOption,
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: Optional[int] = typer.Option(None),
    min_tokens: int = typer.Option(0, "--min-tokens", min=0, help="no end token before this many tokens"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="decode to --max-new-tokens"),
    threads: Optional[int] = ThreadsOption,
    dtype: DType = DTypeOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate with one task adapter (KV cache; stops at the task's end token)."""
    from hub.model.dtypes import torch_dtype
    from hub.serving.batch import decode_to_completion
    from hub.serving.engine import Engine
    from hub.serving.sampling import sampling_params
    from hub.store.fingerprint import backbone_for_adapters
    from tasks import make_task

    set_threads(threads)
    adapter_store = open_store(store)
    backbone = backbone_for_adapters(adapter_store, [task], base, device, torch_dtype(dtype.value))
    engine = Engine(backbone, make_task)
    resident = engine.manager.add_adapter(adapter_store.load(task, backbone.fingerprint))
    params = sampling_params(resident.task.defaults.max_new_tokens, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             min_tokens=min_tokens, ignore_eos=ignore_eos)
    sequence = decode_to_completion(engine, [engine.new_sequence(resident, text, params)])[0]
    if as_json:
        return print_json({"task": resident.name, "version": resident.version, "text": sequence.text.strip(),
                           "finish_reason": sequence.finish_reason,
                           "usage": {"prompt_tokens": len(sequence.prompt_ids),
                                     "completion_tokens": len(sequence.output_ids)}})
    typer.echo(sequence.text.strip())


def serve(
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    store: str = StoreOption,
    base: Optional[str] = BaseOption,
    device: str = DeviceOption,
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help=f"most sequences decoded together "
                                            f"{DEFAULT}"),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", help=f"waiting requests before 429 {DEFAULT}"),
    max_resident: Optional[int] = typer.Option(None, "--max-resident", min=1, help="adapters on the device (LRU)"),
    max_cpu_adapters: Optional[int] = typer.Option(
        None, "--max-cpu-adapters", min=0, help="weights of adapters off the device kept in CPU memory (LRU); the "
        "others are read from the store when a request needs them (default: all, read at start-up)"),
    request_timeout: Optional[float] = typer.Option(None, "--request-timeout", help=f"seconds {DEFAULT}"),
    watch_interval: Optional[float] = typer.Option(None, "--watch-interval", help=f"store polling period, 0 = off "
                                                   f"{DEFAULT}"),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", min=1, help=f"prompt tokens prefilled per "
                                                f"step across the joining rows; longer prompts and bursts prefill "
                                                f"over several steps {DEFAULT}"),
    store_timeout: Optional[float] = typer.Option(None, "--store-timeout", min=0.1, help="seconds a store call or "
                                                  f"an adapter's load may take before 503 {DEFAULT}"),
    admission: Optional[Admission] = typer.Option(None, "--admission", help="the order waiting requests join "
                                                  "the batch in: fair (default; virtual token counters over API keys, "
                                                  "then adapters) or fcfs (arrival order, for a single tenant's "
                                                  "throughput)"),
    threads: Optional[int] = ThreadsOption,
    dtype: DType = DTypeOption,
    max_body_bytes: Optional[int] = typer.Option(None, "--max-body-bytes", min=1, help=f"larger request bodies get "
                                                 f"413 {DEFAULT}"),
    bank_dtype: Optional[BankDType] = typer.Option(None, "--bank-dtype", help="resident adapters' weights: float32 "
                                                   "(default), or float16/bfloat16 for half the bytes per decode "
                                                   "step (arithmetic stays float32)"),
    keys: Optional[Path] = typer.Option(None, "--keys", help="API keys file (`hub keys add`): every route needs "
                                        "a key, scoped to tasks, with quotas; re-read when it changes "
                                        "(default: none, open to whoever reaches the port)"),
    ray: bool = typer.Option(False, "--ray", help="serve as a Ray Serve application: engine replicas, each "
                             "task routed to a replica that holds it (docs/DEPLOY.md)"),
    replicas: Optional[int] = typer.Option(None, "--replicas", min=1, help=f"--ray: engine replicas {DEFAULT}"),
    address: Optional[str] = typer.Option(None, "--address", help="--ray: the cluster to join, auto or "
                                          "ray://HOST:10001 (default: start a local one)"),
    max_tasks_per_replica: Optional[int] = typer.Option(None, "--max-tasks-per-replica", min=1,
                                                        help=f"--ray: tasks one replica keeps loaded (LRU) {DEFAULT}"),
    replica_gpus: Optional[float] = typer.Option(None, "--replica-gpus", min=0.0, help=f"--ray: GPUs per engine "
                                                 f"replica {DEFAULT}"),
) -> None:
    """Serve every published adapter over HTTP, fusing requests of different tasks in one batch."""
    from hub.serving.service import ServiceSettings

    service = settings(ServiceSettings, max_batch=max_batch, max_queue=max_queue, max_resident=max_resident,
                       max_cpu_adapters=max_cpu_adapters, bank_dtype=bank_dtype, request_timeout=request_timeout,
                       watch_interval=watch_interval, prefill_chunk=prefill_chunk, store_timeout=store_timeout,
                       admission=admission)
    if ray:
        from server.ray import RayServeOptions, serve_on_ray

        options = settings(RayServeOptions, store=store, base=base, device=device, dtype=dtype, threads=threads,
                           replicas=replicas, max_tasks_per_replica=max_tasks_per_replica, replica_gpus=replica_gpus,
                           service=service, max_body_bytes=max_body_bytes,
                           keys=str(keys.resolve()) if keys else None)
        return serve_on_ray(options, address, host, port)
    _serve_in_process(store, base, device, dtype, threads, service, max_body_bytes, host, port, keys)


def _serve_in_process(store: str, base: str | None, device: str, dtype: DType, threads: int | None, service,
                      max_body_bytes: int | None, host: str, port: int, keys: Path | None = None) -> None:
    import uvicorn

    from hub.model.dtypes import torch_dtype
    from hub.store.fingerprint import backbone_for_adapters
    from server.app import create_app
    from server.edge import DEFAULT_MAX_BODY_BYTES

    threads_used = set_threads(threads)
    adapter_store = open_store(store)
    refs = [s.latest.ref for s in adapter_store.list() if s.versions]
    backbone = backbone_for_adapters(adapter_store, refs, base, device, torch_dtype(dtype.value))
    typer.echo(f"hub serve: {threads_used}, backbone {str(backbone.dtype).removeprefix('torch.')} "
               f"on {backbone.device}, adapter bank {service.bank_dtype}", err=True)
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal to the previous handler: exit 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = create_app(backbone, adapter_store, service, max_body_bytes or DEFAULT_MAX_BODY_BYTES, keys)
    uvicorn.run(app, host=host, port=port, log_level="info")


def register(app: typer.Typer) -> None:
    """Add the serving commands to the `hub` app."""
    app.command()(generate)
    app.command()(serve)
