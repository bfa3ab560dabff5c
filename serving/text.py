"""Generated token ids -> text deltas, cut at stop strings.

Decoding one token alone is wrong for byte-level and sentencepiece tokenizers (a character
can span tokens; a leading space depends on the token before), and decoding everything again
each step costs O(n^2). As text-generation-inference does, each step decodes only from a
few tokens back and emits what that adds. Text that could be the start of a stop string is
held back until it is known not to be one, so a client never sees part of a stop string.
"""

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
INCOMPLETE = "\ufffd"  # what a decoder gives for a character whose bytes have not all come


class IncrementalText:
    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # everything decoded so far, stop string excluded
        self._sent = 0  # how much of `text` has been handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text now safe to send (maybe "")."""
        self._ids.append(token_id)
        if self.stopped or not self._decode_pending(complete_only=True):
            return ""
        return self._release()

    def flush(self) -> str:
        """At the end: the rest, including text held back as a possible stop string's start
        and a last character whose bytes never all came."""
        released = ""
        if not self.stopped and self._decode_pending(complete_only=False):
            released = self._release()
        rest = self.text[self._sent :]
        self._sent = len(self.text)
        return released + rest

    def _decode_pending(self, *, complete_only: bool) -> bool:
        """Append what the tokens since the last read add to `text`; False if nothing."""
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        if len(after) <= len(before) or (complete_only and after.endswith(INCOMPLETE)):
            return False
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += after[len(before) :]
        return True

    def _release(self) -> str:
        # Released text holds no stop string nor the start of one: look after it.
        hits = [i for i in (self.text.find(s, self._sent) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self.flush()
        safe = len(self.text) - self._held_back()
        delta = self.text[self._sent : safe] if safe > self._sent else ""
        self._sent = max(self._sent, safe)
        return delta

    def _held_back(self) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
