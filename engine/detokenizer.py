"""Incremental detokenization that is correct for multi-byte UTF-8 and byte-fallback tokens.

Decoding token by token breaks characters split across tokens (they decode to
U+FFFD) and loses the spaces some tokenizers attach to the next token. Like
vLLM and TGI, we decode a short window twice: the tokens since `prefix_offset`
with and without the newest ones, and emit the difference once it no longer
ends in an incomplete character.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    # Tokens of left context decoded with the new ones (enough to fix spacing).
    CONTEXT = 5

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_token_ids[-self.CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Feed new tokens; return the newly completed text (maybe empty)."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            # Keep the window short: drop ids before the new prefix.
            if self.prefix_offset > 64:
                cut = self.prefix_offset
                self.ids = self.ids[cut:]
                self.prefix_offset -= cut
                self.read_offset -= cut
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Emit whatever is pending at the end (an incomplete character included)."""
        if self.read_offset < len(self.ids):
            return self.add([], final=True)
        return ""
