"""The shared shape of tasks that map one source text to one target text (text2text, summarize, translate).

Layout: `<bos> <source> source <target> target <eos>`; the source is typed by its marker, the target by the
target marker. The source may be capped (`source_max_tokens`) and is cut from its end when the prompt is too long.
"""

from __future__ import annotations

from typing import Any, ClassVar

from hub.data import load_records, pick_fields
from hub.errors import HubError
from hub.task import Example, Segment, Task


class SourceTargetTask(Task):
    """Source -> target, read from records whose field names are given (`--input-field`, `--target-field`) or
    found among the task's known pairs (`field_pairs`, the first one a record has)."""

    source_marker: ClassVar[str]
    target_marker: ClassVar[str]
    field_pairs: ClassVar[tuple[tuple[str, str], ...]] = (("input", "target"),)
    source_max_tokens: ClassVar[int | None] = None
    hf_configs: ClassVar[dict[str, str]] = {}  # HF dataset id -> the config to load (e.g. cnn_dailymail 3.0.0)
    single_file_test_fraction: ClassVar[float | None] = None  # a single file's last part is the test split
    family = "source_target"  # <bos> <source> … <target> …: translate, summarize, text2text compose together

    def __init__(self, input_field: str | None = None, target_field: str | None = None, **config: Any):
        super().__init__(**config)
        if len(self.field_pairs) == 1:
            input_field = input_field or self.field_pairs[0][0]
            target_field = target_field or self.field_pairs[0][1]
        self.input_field, self.target_field = input_field, target_field

    def config(self) -> dict:
        return {k: v for k, v in (("input_field", self.input_field), ("target_field", self.target_field)) if v}

    def candidate_fields(self) -> list[tuple[str, str]]:
        """The (source, target) field pairs to look for, the given names replacing the known ones."""
        pairs = [(self.input_field or source, self.target_field or target) for source, target in self.field_pairs]
        return list(dict.fromkeys(pairs))

    def load_examples(self, data: str, split: str) -> list[Example]:
        pairs = self.candidate_fields()
        records = load_records(data, split, pairs, group=lambda r: str(r.get(pick_fields(r, pairs)[0])),
                               hf_config=self.hf_configs.get(data), test_fraction=self.single_file_test_fraction)
        source, target = pick_fields(records[0], pairs)
        return self.examples_from_pairs((r[source], r[target]) for r in records)

    @staticmethod
    def examples_from_pairs(pairs) -> list[Example]:
        """Examples from (source, target) values; pairs with an empty side are dropped. A target may be a list of
        references (JSON `"target": ["...", "..."]`): one example each, scored together by `hub eval`."""
        examples = []
        for source, targets in pairs:
            source = "" if source is None else str(source).strip()
            for target in targets if isinstance(targets, list) else [targets]:
                target = "" if target is None else str(target).strip()
                if source and target:
                    examples.append(Example(source=source, target=target))
        if not examples:
            raise HubError("no examples with both a source and a target text")
        return examples

    def prompt_segments(self, source: str) -> list[Segment]:
        return [Segment(self.source_marker, source, truncatable=True, max_tokens=self.source_max_tokens),
                Segment(self.target_marker)]
