"""Incremental detokenization of one request's output, with stop strings.

Decoding each new token alone is wrong: byte-level BPE splits one character (an emoji, a CJK character)
over several tokens, and sentencepiece drops the leading space of the first token it decodes ("▁Hello" alone
is "Hello"). Re-decoding the whole output every step is right but costs O(length) per token. So, like vLLM
and TGI, we decode a short window: a few already-emitted tokens as context (prefix_offset to read_offset)
plus the new ones, and emit what the window's text adds to the context's text. A window whose text ends in
U+FFFD holds an incomplete UTF-8 character: it waits for the next token instead of emitting garbage.

Stop strings are matched on the text. Text that might be the start of a stop string is held back, so a
stream never shows a client something that is cut off later.
"""
from __future__ import annotations

from ccserve.sampling_params import SamplingParams

CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns tokens into text deltas; `text` only ever grows, so callers can slice off what they sent."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stops = params.stop
        self.include_stop = params.include_stop_str_in_output
        # Only the window is kept: context tokens [0, read_offset), then tokens not yet turned into text.
        self.window = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.read_offset = len(self.window)
        self.decoded = ""
        self.released = 0
        self.stopped = False
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """The output text released so far (after flush(): all of it)."""
        return self.decoded[:self.released]

    def append(self, token_ids: list[int]) -> str:
        """Add new tokens; returns the newly released text (possibly empty while a character or a possible
        stop string is incomplete)."""
        if self.stopped:
            return ""
        self.window.extend(token_ids)
        context, full = self._decode_window()
        # Nothing new (a skipped special token) or an incomplete character: keep the context and wait.
        if len(full) <= len(context) or full.endswith(REPLACEMENT_CHAR):
            return ""
        self._advance()
        return self._add(full[len(context):])

    def flush(self) -> str:
        """At the end of the request: release held-back text and any trailing incomplete character (as U+FFFD,
        exactly what a full decode shows). Returns the newly released text."""
        start = self.released
        if not self.stopped:
            context, full = self._decode_window()
            self._advance()
            self._add(full[len(context):])
        self.released = len(self.decoded)
        return self.decoded[start:]

    def _decode_window(self) -> tuple[str, str]:
        """Text of the context tokens, and of the whole window (cleanup off: it is not window-invariant)."""
        def decode(ids: list[int]) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                         clean_up_tokenization_spaces=False)
        return decode(self.window[:self.read_offset]), decode(self.window)

    def _advance(self) -> None:
        """The tokens just decoded become the next context."""
        del self.window[:self.read_offset]
        self.read_offset = len(self.window)

    def _add(self, delta: str) -> str:
        """Append decoded text, apply stop strings, and release what can no longer become a stop string."""
        start = len(self.decoded)
        self.decoded += delta
        if self.stops:
            self._match_stop(start)
        end = len(self.decoded) if self.stopped else len(self.decoded) - self._holdback()
        released, self.released = self.decoded[self.released:end], end
        return released

    def _match_stop(self, start: int) -> None:
        """Stop at the match that completes first (ties: the one starting first), as if text came one character
        at a time, so the result does not depend on where token boundaries fall. Matches ending before `start`
        were checked by earlier calls."""
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            i = self.decoded.find(stop, max(0, start - len(stop) + 1))
            if i >= 0 and (best is None or (i + len(stop), i) < best[:2]):
                best = (i + len(stop), i, stop)
        if best is not None:
            end, i, stop = best
            self.decoded = self.decoded[:end if self.include_stop else i]
            self.stopped, self.stop_reason = True, stop

    def _holdback(self) -> int:
        """Length of the longest unreleased suffix of the text that is a proper prefix of a stop string."""
        unreleased = len(self.decoded) - self.released
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, unreleased), hold, -1):
                if self.decoded.endswith(stop[:k]):
                    hold = k
                    break
        return hold
