"""What generation hands back: stream deltas, whole results, and the engine's per-step request outputs."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from lmforge.infer.sampling import TokenLogprob


@dataclass
class Delta:
    """One step of a stream: new text (possibly empty), the tokens sampled since the last delta, their logprobs.
    The last delta of a stream has finish_reason set."""
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]                      # every sampled token, the terminating one included
    finish_reason: str                        # 'stop' | 'length'
    stop_reason: int | str | None = None      # the EOS/stop token id or the stop string that ended it
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry when params.logprobs is set
    prompt_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one `Engine.step()` produced for one completion of a request: the token sampled in this step, the text
    it completed (possibly empty: held back while it could start a stop string), and whether the completion ended
    (finish_reason 'stop' | 'length' | 'abort'; an abort carries no token)."""
    request_id: object
    index: int                                # which of the request's n completions
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None

    def delta(self) -> Delta:
        return Delta(self.text, self.token_ids, self.logprobs, self.finish_reason, self.stop_reason)


class GenerationStream:
    """Iterate for Deltas; afterwards `.result` holds the whole GenerationResult."""

    def __init__(self, deltas: Iterator[Delta], prompt_ids: list[int]):
        self._deltas, self.prompt_ids = deltas, prompt_ids
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[Delta]:
        text, ids, lps = [], [], []
        for d in self._deltas:
            text.append(d.text)
            ids += d.token_ids
            lps += d.logprobs or []
            if d.finish_reason is not None:
                self.result = GenerationResult("".join(text), ids, d.finish_reason, d.stop_reason,
                                               lps if d.logprobs is not None else None, self.prompt_ids)
            yield d

    def consume(self) -> GenerationResult:
        for _ in self:
            pass
        return self.result
