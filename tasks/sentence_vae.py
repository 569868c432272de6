"""The `sentence_vae` task type: the task side of a sentence VAE bundle (`hub.adapters.vae`).

A VAE has no input layout: it is trained with `hub train sentence_vae` (`cli.vae`) and served by the
`/v1/vae/{task}/...` routes, which build decode rows themselves (`hub.serving.vae`). Text generation routes get
a clear error pointing there.
"""

from __future__ import annotations

from typing import Any

from hub.data import load_sentences
from hub.errors import HubError
from hub.task import Example, Segment, Task, TaskDefaults


class SentenceVAETask(Task):
    type_name = "sentence_vae"
    description = "sentence VAE on one sentence per line (hub train sentence_vae --recipe adavae|two-phase|none)"
    special_tokens = ()  # `<|endoftext|>` opens and ends a sentence: no task rows
    defaults = TaskDefaults(bottleneck=0, lr=1e-3, epochs=1, batch_size=32, grad_accum=1, max_length=32,
                            max_target_length=30, max_new_tokens=40)
    metric = "sacrebleu"  # not used: `hub eval` scores VAEs with `hub.evaluation.vae_metrics`

    def load_examples(self, data: str, split: str) -> list[Example]:
        return [Example(source="", target=sentence) for sentence in load_sentences(data, split)]

    def prompt_segments(self, source: Any) -> list[Segment]:
        return []

    def parse_input(self, value: Any) -> Any:
        raise HubError("this task is a sentence VAE: use POST /v1/vae/{task}/encode, /decode, /reconstruct, "
                       "/sample, /interpolate or /analogy")
