"""Adapter kinds: each module holds one kind's formula, bundle format and parameter count."""
