"""P4/P5 — decoding speed (protocol: docs/bench.md): lmforge's engine vs `transformers.generate` on the same weights.

    python bench/decode.py                 # both sizes, batch 1 / 8 / 32
    python bench/decode.py --sizes 9M --batches 1

Models: HF LlamaForCausalLM built from a config with random weights (seed 0), imported into lmforge through
`lmforge.interop.hf` (the same tensors). Prompt: 32 random token ids; 128 new tokens; greedy; fp32; 2 threads.
Both sides must produce the same tokens (checked: a speed number for a different answer means nothing).
Timed: whole generate calls, median of --repeats after a warm-up, the two sides interleaved call by call so drift
hits both; the ratio is the median of the per-repeat ratios. TTFT = time of a 1-token generate (prefill + first
token). Batch rows all have 32-token prompts. --no-fast times lmforge without its decode fast path
(lmforge.infer.fastpath), i.e. the model's forward per step; --no-native the PyTorch fast path instead of the C++
step (lmforge.infer.native). Each row is followed by a per-step breakdown: the engine's decode time per step, the
native step within it, and the matmuls within that (timed alone with the same kernels).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

SIZES = {  # P4 (a) and P5 (b)
    "9M": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
               intermediate_size=688, vocab_size=8192),
    "125M": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048, vocab_size=32000),
}
PROMPT_LEN, NEW_TOKENS = 32, 128


class IdTokenizer:
    """The engine needs a tokenizer for ids -> text; this bench compares ids only. No BOS/EOS: all 128 tokens
    are generated on both sides."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def id_to_bytes(self, i: int) -> bytes:
        return b"x"

    def is_special(self, i: int) -> bool:
        return False


def build(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.interop.hf import build_model, config_from_hf

    torch.manual_seed(0)
    hc = LlamaConfig(**SIZES[size], max_position_embeddings=1024, tie_word_embeddings=False,
                     bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = LlamaForCausalLM(hc).eval()
    cfg, family = config_from_hf(hc.to_dict())
    ours = build_model(dict(hf.state_dict()), cfg, family, progress=False)
    return hf, ours


def timed(fns, repeats: int):
    """Run each fn once to warm up, then `repeats` rounds of all fns in turn: [(times, last output)] per fn."""
    outs = [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t)
    return list(zip(times, outs))


def breakdown(model, B: int, reps: int = 20) -> tuple[float, float] | None:
    """(native step ms, of which matmuls ms) for B rows at position PROMPT_LEN + NEW_TOKENS / 2, or None when the
    C++ step does not run. The matmuls are timed alone on the same weight shapes and the same kernels the step uses
    (the packed-panel kernel, on the step's own packed weights)."""
    from lmforge.infer import native
    from lmforge.infer.fastpath import FastDecoder
    ext = native.load()
    if ext is None:
        return None

    def median_ms(fn):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    with torch.inference_mode():
        dec = FastDecoder(model)
        pos = PROMPT_LEN + NEW_TOKENS // 2
        cache = model.new_kv_cache(B, pos + 1)
        toks = torch.zeros(B, 1, dtype=torch.long)

        def step():
            cache.pos = pos
            dec.step(toks, cache)
        step()                                           # packs the weights (kept on the model)
        mats = [w for lay in dec.layers for w in (lay[1], lay[2], lay[4], lay[5])] + [dec.head]
        packed = model.__dict__["_native_packed"][1]     # the very copies the step multiplies by
        xs = [torch.randn(B, w.size(0)) for w in mats]
        outs = [torch.empty(B, w.size(1)) for w in mats]

        def mm():
            for x, w, pk, o in zip(xs, mats, packed, outs):
                ext.packed_mm(x, pk, w.size(1), o)
        return median_ms(step), median_ms(mm)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-fast", action="store_true", help="lmforge without its decode fast path (before/after)")
    ap.add_argument("--no-native", action="store_true", help="the PyTorch fast path instead of the C++ step")
    args = ap.parse_args()
    if args.no_native:
        import os
        os.environ["LMFORGE_NATIVE"] = "0"
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: pip install -e '.[dev]'", file=sys.stderr)
        sys.exit(2)
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        hf, ours = build(size)
        n_params = sum(p.numel() for p in hf.parameters())
        V = SIZES[size]["vocab_size"]
        engine = Engine(ours, IdTokenizer(V), fast_path=not args.no_fast)
        g = torch.Generator().manual_seed(1)
        for B in args.batches:
            prompts = torch.randint(0, V, (B, PROMPT_LEN), generator=g)

            def run_hf(n=NEW_TOKENS):
                with torch.inference_mode():
                    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)
                return out[:, PROMPT_LEN:].tolist()

            def run_ours(n=NEW_TOKENS):
                res = engine.generate(prompts.tolist(), SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
                return [r[0].token_ids for r in res]

            (ts_hf, out_hf), (ts_us, out_us) = timed([run_hf, run_ours], args.repeats)
            same = sum(a == b for a, b in zip(out_hf, out_us))
            (tt_hf, _), (tt_us, _) = timed([lambda: run_hf(1), lambda: run_ours(1)], args.repeats)
            t_hf, t_us = statistics.median(ts_hf), statistics.median(ts_us)
            ratios = sorted(a / b for a, b in zip(ts_hf, ts_us))
            ttft_hf, ttft_us = statistics.median(tt_hf), statistics.median(tt_us)
            rows.append((size, n_params, B, B * NEW_TOKENS / t_hf, B * NEW_TOKENS / t_us, ttft_hf, ttft_us, same,
                         statistics.median(ratios), ratios[0], ratios[-1]))
            # per decode step: the engine's wall time per step (decode only: TTFT taken out), the native step in it,
            # and the matmuls in that
            per_step = (t_us - ttft_us) / (NEW_TOKENS - 1) * 1e3
            bd = None if args.no_fast else breakdown(ours, B)
            if bd is not None:
                print(f"  per step {per_step:.2f} ms = native step {bd[0]:.2f} ms (matmuls {bd[1]:.2f}, attention/"
                      f"norms/RoPE/SiLU {bd[0] - bd[1]:.2f}) + sampling and bookkeeping {per_step - bd[0]:.2f}",
                      flush=True)
            r = rows[-1]
            print(f"{size} ({n_params / 1e6:.1f}M) batch {B:>2}: transformers {r[3]:8.1f} tok/s, lmforge {r[4]:8.1f} "
                  f"tok/s  ({r[8]:.2f}x, range {r[9]:.2f}-{r[10]:.2f}); TTFT {ttft_hf * 1e3:.1f} vs "
                  f"{ttft_us * 1e3:.1f} ms; identical greedy rows {same}/{B}", flush=True)

    from lmforge.infer import native
    step = ("module forward" if args.no_fast else
            "native C++ step" if native.load() is not None else f"PyTorch fast path ({native.why_not()})")
    print(f"\nfp32, {args.threads} threads, prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens, greedy, median of "
          f"{args.repeats}; lmforge decode step: {step}")
    print(f"{'model':>6} {'batch':>5} {'HF tok/s':>9} {'lmforge tok/s':>13} {'HF TTFT ms':>10} "
          f"{'lmforge TTFT ms':>15} {'same':>5} {'ratio':>6}")
    for size, _, B, hf_tps, us_tps, ttft_hf, ttft_us, same, ratio, _, _ in rows:
        print(f"{size:>6} {B:>5} {hf_tps:9.1f} {us_tps:13.1f} {ttft_hf * 1e3:10.1f} {ttft_us * 1e3:15.1f} "
              f"{same:>2}/{B:<2} {ratio:5.2f}x")
    if any(r[7] != r[2] for r in rows):
        print("WARNING: some greedy outputs differ between transformers and lmforge", file=sys.stderr)


if __name__ == "__main__":
    main()
