"""Token ids in, text out, while streaming: UTF-8-safe incremental decoding, stop strings, and THE stopping rule.

Streaming text is decoded incrementally from bytes: a token may hold half a multi-byte character, which is kept
back until the character is complete. Text that could be the beginning of a stop string is kept back too, just
as many characters as could still match, and released as soon as it cannot.
"""
from __future__ import annotations

import codecs
from collections.abc import Sequence

from lmforge.infer.request import Request


class Detokenizer:
    """Token ids in, safe text out: never half a UTF-8 character, never (a possible start of) a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self.tokenizer, self.stop, self.skip_special = tokenizer, list(stop), skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""      # all text so far (cut before a stop string once one matched)
        self.emitted = 0    # characters of self.text already handed out

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token; return the stop string it completed, if any (self.text is then cut before it)."""
        special = getattr(self.tokenizer, "is_special", lambda i: False)(token_id)
        data = b"" if special and self.skip_special else self.tokenizer.id_to_bytes(token_id)
        return self._append(self._decoder.decode(data), check_stop)

    def finish(self, check_stop: bool = True) -> str | None:
        """End of generation: flush a dangling partial character (as U+FFFD: the bytes really were invalid)."""
        return self._append(self._decoder.decode(b"", final=True), check_stop)

    def _append(self, new: str, check_stop: bool) -> str | None:
        start = len(self.text)
        self.text += new
        if not (new and check_stop and self.stop):
            return None
        # a match must end inside the new text, so it starts at most max_stop - 1 characters before it
        lo = max(0, start - self._max_stop + 1)
        hits = []
        for s in self.stop:
            i = self.text.find(s, lo)
            while 0 <= i and i + len(s) <= start:  # ended before this text: not checked then (min_tokens)
                i = self.text.find(s, i + 1)
            if i >= 0:
                hits.append((i, s))
        if not hits:
            return None
        i, s = min(hits, key=lambda h: h[0])  # the earliest start among the stops completed just now
        self.text = self.text[:i]
        return s

    def ready(self, final: bool = False) -> str:
        """The text that can be shown now (all of it when final)."""
        end = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest unshown suffix that is a proper prefix of some stop string."""
        for k in range(min(self._max_stop - 1, len(self.text) - self.emitted), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


def stop_check(detok: Detokenizer, tok: int, out_ids: list[int], req: Request, ends,
               grammar_done: bool = False) -> tuple[str | None, int | str | None]:
    """Feed `tok` (already appended to out_ids) to the detokenizer and decide whether the sequence ends here:
    (finish_reason or None, stop_reason). THE stopping rule of every decoding loop: an end/stop token id, then a
    stop string (not before min_tokens), then a completed grammar, then the budget. On a finish the detokenizer
    is flushed (a dangling partial character becomes U+FFFD), which may still complete a stop string."""
    check_stop = len(out_ids) >= req.params.min_tokens
    finish, reason = None, None
    if tok in ends:
        finish, reason = "stop", tok
    elif (matched := detok.add(tok, check_stop)) is not None:
        finish, reason = "stop", matched
    elif grammar_done:
        finish = "stop"
    elif len(out_ids) >= req.budget:
        finish = "length"
    if finish is not None and (reason is None or isinstance(reason, int)):
        if (matched := detok.finish(check_stop)) is not None:
            finish, reason = "stop", matched
    return finish, reason
