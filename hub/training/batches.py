"""Training batches, the same for every trainer: encoded examples, endless shuffled epochs (resumable), and the
labelled tokens a batch's loss counts."""

from __future__ import annotations

import random
from typing import Iterator

import torch

from hub.errors import HubError
from hub.task import IGNORE_INDEX, Encoded, Example, TaskCodec


def encode_all(codec: TaskCodec, examples: list[Example], max_target: int, what: str) -> list[Encoded]:
    """Encode examples; ones that cannot fit are skipped and counted, not silently."""
    encoded, skipped = [], []
    for example in examples:
        try:
            encoded.append(codec.encode_example(example, max_target))
        except HubError as err:
            skipped.append(str(err))
    if skipped:
        print(f"note: skipped {len(skipped)} of {len(examples)} {what} examples ({skipped[0]})")
    if not encoded:
        raise HubError(f"no usable {what} examples")
    return encoded


def epoch_batches(count: int, size: int, rng: random.Random, skip: int) -> Iterator[list[int]]:
    """Endless shuffled epochs of `size` indices into `count` items (an epoch's last partial batch is dropped),
    without the first `skip` batches (those a resumed run has already seen)."""
    while True:
        order = list(range(count))
        rng.shuffle(order)
        for start in range(0, count - size + 1, size):
            if skip > 0:
                skip -= 1
                continue
            yield order[start : start + size]


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Target tokens the loss counts (labels shifted by one, as in `Trainer.loss`)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
