"""`hub serve --ray`: the hub's HTTP API as a Ray Serve application, tasks multiplexed over engine replicas.

Two deployments:

- `EngineReplica` (`--replicas N`): each replica owns a `HubService` (engine + scheduler) that starts with no
  adapter. A request arrives with `multiplexed_model_id=<task>`; the replica loads that task from the store
  through `@serve.multiplexed(max_num_models_per_replica=K)` (Ray unloads its least recently used task beyond
  K), then the request joins the replica's one running batch, so requests for *different* resident tasks decode
  together (no `@serve.batch`: it would split batches by model id). Text streams back event by event.
- `Ingress`: the same FastAPI routes as `hub serve` (`server.app.build_app`) over `RemoteService`, which knows
  the tasks from the store and calls the engine deployment; Ray routes a task's requests to a replica that
  already holds it. The replica that served a request is in its `x-hub-replica` header and in `/metrics`.

Errors keep their HTTP meaning: a replica's `HubError` is raised again in the ingress (404, 422, 504, ...); a
full replica queue, or Ray's back-pressure once every replica is busy and `max_queued_requests` wait, is 429
with Retry-After.

Modules: `options` (what a deployment is built from), `replica` (the engine deployment), `ingress` (the HTTP
deployment and `RemoteService`), `launch` (the application, `app_builder`, the launcher). Importing this package
imports Ray.
"""

from server.ray.launch import app_builder, application, serve_on_ray
from server.ray.options import RayServeOptions, options_from_args

__all__ = ["RayServeOptions", "app_builder", "application", "options_from_args", "serve_on_ray"]
