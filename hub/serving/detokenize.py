"""Incremental detokenization: the text of a growing token list, decoding only the newest tokens.

Re-decoding a row's whole output after every token costs O(n) per token (O(n²) a sequence) on the engine
thread. As vLLM does, decode a short window instead: the tokens from `prefix` to the end, minus the text of the
window's already-emitted part. Byte-level BPE can split one UTF-8 character over several tokens; while the
window's text ends in U+FFFD the new text is held back until the character is complete.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

INCOMPLETE = "\ufffd"


class IncrementalText:
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.text = ""
        self.prefix = 0  # window start: tokens before it are never decoded again
        self.read = 0  # tokens whose text is in self.text

    def extend(self, ids: list[int]) -> str:
        """The text of `ids` (the same list, grown since the last call), without an incomplete last character."""
        emitted = self.final(ids[self.prefix:self.read])
        window = self.final(ids[self.prefix:])
        if len(window) > len(emitted) and not window.endswith(INCOMPLETE):
            self.text += window[len(emitted):]
            self.prefix, self.read = self.read, len(ids)
        return self.text

    def final(self, ids: list[int]) -> str:
        """The exact text of every token, incomplete last character included (for a finished sequence)."""
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
