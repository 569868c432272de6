"""Serving: the fused mixed-task engine, its scheduler, and keeping it in step with the store."""
