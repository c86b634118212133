"""From token ids to text pieces: whole characters only, stop strings held back and cut off."""

from __future__ import annotations

# How many prompt tokens to decode before the new ones, so that the first piece keeps the space or
# merge that depends on the token before it (SentencePiece drops a leading space at the start).
CONTEXT_TOKENS = 4


class IncrementalDecoder:
    """Turns one row's new token ids into text pieces that join to the decoded continuation.

    Decoding ids one at a time splits multi-byte characters and loses context-dependent spaces, so
    each call decodes a short window and returns only what it adds; a window that ends inside a
    character (U+FFFD) waits for the next token.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.context = len(self.ids)  # the prompt tokens decoded before the new ones
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    @property
    def generated(self) -> int:
        """How many new tokens have been added."""
        return len(self.ids) - self.context

    def text_of(self, n: int) -> str:
        """The first `n` new tokens decoded together, as the pieces for them join."""
        context = self._decode(self.ids[: self.context])
        return self._decode(self.ids[: self.context + n])[len(context) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]

    def held(self) -> str:
        """The whole characters of the tokens that `add` holds back, waiting for a character's last byte."""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        return after[len(before) :].rstrip("\ufffd")

    def flush(self) -> str:
        """What the last tokens decode to even if they end inside a character (the row has ended)."""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :]


class StopMatcher:
    """Holds back text that may begin a stop string; cuts the text before a stop string that appears."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """-> (text safe to emit now, whether a stop string was found)."""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
