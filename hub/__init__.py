"""Core of the adapter hub: one frozen GPT-2, VLM residual adapters, the adapter store and training.

The composition root of the library: the built-in adapter kinds' weights formats are registered with the store
here (`hub.store.weights_formats`), so any use of `hub` publishes and checks them; the modules imported are light
(no torch).
"""

import hub.adapters.vlm_format  # noqa: F401  (registers the VLM weights format)
