"""Low-resource training sets (`hub train --train-examples N --data-seed S`), the same rule for every task type."""

from __future__ import annotations

import json
import random

from hub.errors import HubError
from hub.task import Example


def input_key(example: Example, index: int) -> str:
    """Examples with the same input share a key; an example without an input (a language-modelling text) is its
    own group."""
    if example.source in (None, "", {}, []):
        return f"#{index}"
    return json.dumps(example.source, sort_keys=True, default=str)


def check_subset_size(size: int, available: int) -> None:
    if size < 1:
        raise HubError(f"--train-examples {size}: need at least 1")
    if size > available:
        raise HubError(f"--train-examples {size}: the training data has only {available:,} examples")


def low_resource_subset(examples: list[Example], size: int, seed: int) -> list[Example]:
    """`size` examples taken input by input: the inputs in a random order (`seed`), each with all its references
    (E2E has ~8 per meaning representation), so N examples hold as few distinct inputs as the data allows; the
    last input taken may contribute only part of its references."""
    check_subset_size(size, len(examples))
    groups: dict[str, list[Example]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(input_key(example, index), []).append(example)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    return [example for key in keys for example in groups[key]][:size]
