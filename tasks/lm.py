"""An unconditional language-model adapter over one-sentence-per-line text: the sentence VAE's baseline.

Layout: `<bos_lm> sentence <eos_lm>`, no input (the prompt is the BOS alone); the same data as `sentence_vae`
(`hub.data.load_sentences`) and the same metrics (`hub.evaluation.vae_metrics.evaluate_lm`: exact PPL).
A request's `input` must be empty: generation is unconditional.
"""

from __future__ import annotations

from typing import Any

from hub.data import load_sentences
from hub.errors import HubError
from hub.task import Example, Segment, Task, TaskDefaults


class LMTask(Task):
    type_name = "lm"
    description = "unconditional sentence language model (one sentence per line); the sentence_vae baseline"
    special_tokens = ("<bos_lm>", "<eos_lm>")
    defaults = TaskDefaults(bottleneck=64, lr=1e-3, epochs=3, batch_size=32, grad_accum=1, max_length=32,
                            max_target_length=30, max_new_tokens=40)
    metric = "sacrebleu"  # not used: `hub eval` scores lm adapters by perplexity (`evaluate_lm`)

    def load_examples(self, data: str, split: str) -> list[Example]:
        return [Example(source="", target=sentence) for sentence in load_sentences(data, split)]

    def prompt_segments(self, source: Any) -> list[Segment]:
        return []

    def parse_input(self, value: Any) -> str:
        if value not in ("", None):
            raise HubError("task type 'lm' generates unconditionally: send an empty 'input'")
        return ""
