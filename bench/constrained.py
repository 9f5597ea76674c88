"""P7 — constrained decoding (protocol: docs/bench.md): per-token cost of JSON-schema-constrained generation vs
unconstrained generation on the same model, same prompt, same number of tokens. Goal: overhead ≤ 10%.

    python bench/constrained.py [--runs 8] [--threads 2]

Model: a random-weight llama-style lmforge model with the P4 (a) shape (hidden 256, 6 layers, 8 heads, 4 KV
heads, FFN 688, untied, ≈9 M parameters), vocab 8192 from a tokenizer trained here on the built-in `kjv` +
`python-docs` text; batch 1, fp32, 2 threads. Both sides run the same decode loop as lmforge.infer.generate
(forward through the KV cache, process_logits, sample at temperature 1); the constrained side adds
Matcher.apply (mask computation + masking the logits) before sampling and Matcher.accept after. Each run first
decodes a constrained sequence (until the grammar completes) and an unconstrained one (EOS ignored) in lockstep,
one step each in turn, so both see the same sequence lengths and the same machine load. Prefill is not timed.
Grammar compilation (once per schema, cached) is reported separately.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMA = {  # a realistic record: nested object, enums, arrays, bounded strings and numbers
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 1000000},
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,10}\\.(com|org|net)$"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "active": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string", "maxLength": 32},
                           "city": {"type": "string", "maxLength": 24},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False},
    },
    "required": ["id", "name", "email", "role", "active", "score", "tags", "address"],
    "additionalProperties": False,
}
PROMPT = "Return the user record as JSON:\n"


def build_tokenizer(vocab: int):
    from lmforge.data.corpus import kjv, python_docs
    from lmforge.tokenizer.tokenizer import Tokenizer
    docs = list(python_docs()) + list(kjv())
    return Tokenizer.train(docs, vocab_size=vocab, progress=True)


def build_model(vocab: int):
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, n_layer=6, n_head=8, n_kv_heads=4, d_model=256, d_ff=688,
                      max_seq_len=1024, tie_embeddings=False)
    return Transformer(cfg).eval()


class Decoder:
    """generate._decode's loop without detokenization, one step per call, so that two sequences can advance in
    lockstep: the machines are shared and noisy, and alternating step by step makes drift hit both alike."""

    def __init__(self, model, prompt_ids, budget, seed, matcher=None, ends=()):
        from lmforge.infer.sampling import SamplingParams, process_logits, sample
        self.process_logits, self.sample = process_logits, sample
        self.model, self.prompt_ids, self.matcher, self.ends = model, prompt_ids, matcher, set(ends)
        self.params, self.gen = SamplingParams(temperature=1.0), torch.Generator().manual_seed(seed)
        self.cache = model.new_kv_cache(1, max_len=len(prompt_ids) + budget)
        self.out, self.done = [], False
        self.t_step, self.t_matcher = [], 0.0
        with torch.inference_mode():  # prefill: not timed
            self.logits, _ = model(torch.tensor([prompt_ids]), kv_cache=self.cache, logits_to_keep=1)

    @torch.inference_mode()
    def step(self) -> None:
        t0 = time.perf_counter()
        if self.out:  # feed the previous token (the last sampled token is never fed, as in generate)
            self.logits, _ = self.model(torch.tensor([[self.out[-1]]]), kv_cache=self.cache, logits_to_keep=1)
        raw = self.logits[:, -1, :].float()
        m = self.matcher
        if m is not None:
            s = time.perf_counter()
            m.apply(raw)
            self.t_matcher += time.perf_counter() - s
        tok = int(self.sample(self.process_logits(raw, self.params, [self.prompt_ids], [self.out]), [self.gen])[0])
        self.out.append(tok)
        if m is not None:
            s = time.perf_counter()
            m.accept(tok)
            self.done = tok in self.ends or m.is_done()
            self.t_matcher += time.perf_counter() - s
        self.t_step.append(time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=600)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import jsonschema

    from lmforge.infer.constrained import Grammar
    from lmforge.infer.request import end_token_ids

    t = time.perf_counter()
    tok = build_tokenizer(args.vocab)
    print(f"tokenizer: {tok.vocab_size} tokens, trained in {time.perf_counter() - t:.1f} s")
    model = build_model(tok.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f} M parameters, random weights, fp32, {args.threads} threads, batch 1")

    t = time.perf_counter()
    Grammar.regex(tok, "a")  # builds the tokenizer-side object, once per tokenizer
    t_tok = time.perf_counter() - t
    t = time.perf_counter()
    grammar = Grammar.json_schema(tok, SCHEMA)
    t_compile = time.perf_counter() - t
    t = time.perf_counter()
    grammar.matcher()
    t_matcher = time.perf_counter() - t
    print(f"one-time: tokenizer view {t_tok * 1e3:.1f} ms, schema compile {t_compile * 1e3:.1f} ms, "
          f"new matcher {t_matcher * 1e6:.0f} us")

    ends = end_token_ids(tok)
    prompt_ids = tok.encode(PROMPT, bos=True)
    for matcher in (None, grammar.matcher()):  # warm-up
        d = Decoder(model, prompt_ids, 16, 0, matcher, ends)
        for _ in range(16):
            d.step()

    rows, bad, hit_budget = [], 0, 0
    for r in range(args.runs):
        c = Decoder(model, prompt_ids, args.max_tokens, 100 + r, grammar.matcher(), ends)
        u = Decoder(model, prompt_ids, args.max_tokens, 100 + r)  # EOS is never checked: just tokens
        while not c.done and len(c.out) < args.max_tokens:
            first, second = (c, u) if len(c.out) % 2 == 0 else (u, c)  # alternate who goes first
            first.step()
            second.step()
        n = len(c.out)
        text = tok.decode([i for i in c.out if i not in ends])
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            bad += 1
        hit_budget += not c.done
        t_c, t_u = sum(c.t_step), sum(u.t_step)
        rows.append((n, t_c, c.t_matcher, t_u, statistics.median(c.t_step), statistics.median(u.t_step)))
        print(f"run {r}: {n:4d} tokens  constrained {t_c / n * 1e3:6.3f} ms/tok (matcher {c.t_matcher / n * 1e3:.3f})"
              f"  unconstrained {t_u / n * 1e3:6.3f} ms/tok  ratio {t_c / t_u:.3f}")

    n_all = sum(r[0] for r in rows)
    per_c, per_m, per_u = (sum(r[i] for r in rows) / n_all for i in (1, 2, 3))  # seconds per token
    median_ratio = statistics.median(r[4] / r[5] for r in rows)
    print()
    print(f"{'':22s}{'ms/token':>10s}{'tokens/s':>10s}")
    print(f"{'unconstrained':22s}{per_u * 1e3:10.3f}{1 / per_u:10.1f}")
    print(f"{'JSON-schema':22s}{per_c * 1e3:10.3f}{1 / per_c:10.1f}")
    print(f"{'  of which matcher':22s}{per_m * 1e3:10.3f}")
    print(f"{n_all} tokens over {args.runs} runs; outputs valid per jsonschema: {args.runs - bad}/{args.runs}; "
          f"hit the {args.max_tokens}-token budget: {hit_budget}")
    print(f"ratio of median step times (robust to scheduling noise, blind to the rare slow mask): {median_ratio:.3f}")
    ratio = per_c / per_u
    print(f"constrained / unconstrained time per token: {ratio:.3f} (overhead {100 * (ratio - 1):+.1f}%, "
          f"goal <= +10%)")


if __name__ == "__main__":
    main()
