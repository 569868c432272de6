"""An LRU tier of adapters (device slots, or CPU copies) as an object: membership, recency and capacity; and the
tiers' settings (`ManagerSettings`).

Members are kept by identity, not by name: while an older version of a name finishes its requests, it and its
replacement may both be in a tier. What may be evicted is the manager's decision (`AdapterManager`): a tier only
answers who is least recently used.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, Iterator, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class ManagerSettings:
    max_resident: int | None = None  # device slots; None: every adapter may hold one
    max_cpu_adapters: int | None = None  # CPU copies of adapters without a slot; None: all stay
    bank_dtype: torch.dtype = torch.float32  # what resident adapter weights are stored in
    load_timeout: float = 30.0  # a store read taking longer fails its waiting requests (it may still finish)
    loader_threads: int = 4


class LruTier(Generic[T]):
    def __init__(self, capacity: int | None):
        self.capacity = capacity  # None: unbounded
        self.members: OrderedDict[int, T] = OrderedDict()  # id -> member, least recently used first

    def add(self, member: T) -> None:
        """Put `member` in the tier as the most recently used."""
        self.members[id(member)] = member
        self.members.move_to_end(id(member))

    def touch(self, member: T) -> None:
        if id(member) in self.members:
            self.members.move_to_end(id(member))

    def discard(self, member: T) -> None:
        self.members.pop(id(member), None)

    def __contains__(self, member: T) -> bool:
        return id(member) in self.members

    def __len__(self) -> int:
        return len(self.members)

    def lru_first(self) -> Iterator[T]:
        """The members, least recently used first (a snapshot: the caller may evict while iterating)."""
        return iter(list(self.members.values()))

    def full(self) -> bool:
        return self.capacity is not None and len(self.members) >= self.capacity

    def excess(self) -> int:
        return 0 if self.capacity is None else max(0, len(self.members) - self.capacity)
