"""The Ray Serve application of the two deployments, `app_builder` for `serve run` / a KubeRay RayService, and
`hub serve --ray`'s launcher."""

from __future__ import annotations

import math
import os
import signal
import threading

from ray import serve

from server.ray.ingress import Ingress
from server.ray.options import APP_NAME, RayServeOptions, options_from_args
from server.ray.replica import EngineReplica


def application(options: RayServeOptions):
    """The Ray Serve application (also what `serve run` / a KubeRay RayService imports via `app_builder`)."""
    capacity = options.replica_capacity
    engine = EngineReplica.options(
        num_replicas=options.replicas, max_ongoing_requests=capacity, max_queued_requests=options.service.max_queue,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
    ).bind(options)
    ingress = Ingress.options(max_ongoing_requests=capacity * options.replicas + options.service.max_queue,
                              ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine, options)


def app_builder(args: dict[str, str]):
    """`serve run server.ray:app_builder store=s3://bucket/adapters replicas=2 ...` (and RayService YAML)."""
    return application(options_from_args(args))


def serve_on_ray(options: RayServeOptions, address: str | None, host: str, port: int) -> None:
    """Start (or join, with `address`) a Ray cluster, run the application, serve until SIGTERM/SIGINT."""
    import ray

    if address:
        ray.init(address=address)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(options.replicas * options.replica_cpus) + 1),
                 include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(options), name=APP_NAME, route_prefix="/")
        print(f"serving on http://{host}:{port} with {options.replicas} engine replicas", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
