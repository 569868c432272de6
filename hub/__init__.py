"""Core of the adapter hub: one frozen GPT-2, VLM residual adapters, the adapter store and training.

The composition root of the library: the built-in adapter kinds are registered here (`hub.adapters.registry`,
which also gives the store each kind's stored form, `hub.store.kinds`), so any use of `hub` publishes, checks and
serves them; the modules imported are light (no torch).
"""

import hub.adapters.registry  # noqa: F401  (registers the built-in adapter kinds)
