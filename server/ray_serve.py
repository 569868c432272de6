"""Kept so that `serve run server.ray_serve:app_builder ...` and RayService YAML written for it still work: the Ray
deployment is the `server.ray` package (`options`, `replica`, `ingress`, `launch`)."""

from server.ray import RayServeOptions, app_builder, application, options_from_args, serve_on_ray

__all__ = ["RayServeOptions", "app_builder", "application", "options_from_args", "serve_on_ray"]
