"""The served task-token table: every resident adapter's special-token rows in one table after GPT-2's vocabulary."""

from __future__ import annotations

import torch

from hub.errors import HubError


class TokenRowTable:
    """Task-token rows of every resident adapter in one table after GPT-2's vocabulary (first-fit blocks).

    Row 0 stays zero: the token type of plain-base rows in a batch whose other rows carry task types; it is
    never allocated nor freed.
    """

    ZERO_ROW = 0
    NO_ROWS = -1

    def __init__(self, hidden_size: int, device: torch.device, dtype: torch.dtype, capacity: int = 64):
        self.table = torch.zeros(capacity, hidden_size, device=device, dtype=dtype)
        self.used: dict[int, int] = {self.ZERO_ROW: 1}  # offset -> length

    def allocate(self, rows: torch.Tensor) -> int:
        """Copy `rows` [k, d] into a free block and return its offset; nothing changes when it raises."""
        if rows.ndim != 2 or rows.shape[1] != self.table.shape[1]:
            raise HubError(f"task-token rows of shape {list(rows.shape)} do not fit the backbone's hidden size "
                           f"{self.table.shape[1]}")
        if rows.shape[0] == 0:  # an adapter without task tokens (a sentence VAE) holds no block
            return self.NO_ROWS
        offset = self._first_fit(rows.shape[0])
        if offset + rows.shape[0] > self.table.shape[0]:
            grown = torch.zeros(2 * max(self.table.shape[0], offset + rows.shape[0]), self.table.shape[1],
                                device=self.table.device, dtype=self.table.dtype)
            grown[: self.table.shape[0]] = self.table
            self.table = grown
        self.table[offset : offset + rows.shape[0]] = rows.to(self.table)
        self.used[offset] = rows.shape[0]
        return offset

    def _first_fit(self, length: int) -> int:
        position = 0
        for offset, used in sorted(self.used.items()):
            if offset - position >= length:
                return position
            position = offset + used
        return position

    def free(self, offset: int) -> None:
        if offset == self.ZERO_ROW:
            raise ValueError("row 0 of the task-token table is reserved and never freed")
        if offset != self.NO_ROWS:
            self.used.pop(offset)
