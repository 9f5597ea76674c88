"""P9 — continuous batching (protocol: docs/bench.md): 32 requests with staggered arrivals and mixed lengths
through lmforge's engine, served three ways on the same model, the same arrival schedule and the same requests:

  continuous   one Engine; a request joins the running batch at the first step after it arrives, and leaves
               it when it ends (Engine.add_request / step);
  static       batches of --static-batch requests: a batch starts when that many have arrived (or no more
               will), runs until its last row ends, and nothing joins it meanwhile;
  sequential   one request at a time, in arrival order.

    python bench/continuous.py                     # ~9 M Llama-shaped model, 2 threads, 3 rounds
    python bench/continuous.py --rounds 5 --static-batch 8

Model: the ~9 M shape of bench/decode.py (hidden 256, 6 layers, 8 heads, 4 KV heads, FFN 688, vocab 8192),
random weights (seed 0), fp32, greedy. Requests: prompts of 8-96 random ids, 16-160 new tokens, arrivals as a
Poisson process whose rate keeps the server busy (--arrival-ms mean gap). Latency = finish - arrival of each
request (a static batch's row counts as finished when its own row ends, which favours static batching).
Aggregate tok/s = all generated tokens / (last finish - first arrival). The three modes run interleaved, round
after round; medians and ranges are printed, the ratios last. Every mode must give every request the same
tokens (checked).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from decode import IdTokenizer  # a script's own folder (bench/) is on sys.path


def build_model():
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, d_model=256, n_layer=6, n_head=8, n_kv_heads=4, d_ff=688, max_seq_len=1024,
                      pos="rope", norm="rmsnorm", ffn="swiglu", bias=False, tie_embeddings=False)
    return Transformer(cfg).eval()


def workload(n: int, arrival_ms: float, seed: int):
    """[(arrival seconds, prompt ids, max_tokens)], arrivals sorted."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n).exponential_(1.0 / (arrival_ms / 1e3), generator=g)
    gaps[0] = 0.0
    arrivals = torch.cumsum(gaps, 0).tolist()
    out = []
    for t in arrivals:
        plen = int(torch.randint(8, 97, (1,), generator=g))
        new = int(torch.randint(16, 161, (1,), generator=g))
        out.append((t, torch.randint(0, 8192, (plen,), generator=g).tolist(), new))
    return out


def params(new: int):
    from lmforge.infer import SamplingParams
    return SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)


def serve_continuous(engine, reqs):
    """Requests join between steps once their arrival time has passed."""
    t0 = time.perf_counter()
    finish, tokens, nxt = {}, {}, 0
    while nxt < len(reqs) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while nxt < len(reqs) and reqs[nxt][0] <= now:
            engine.add_request(nxt, reqs[nxt][1], params(reqs[nxt][2]))
            nxt += 1
        if not engine.has_unfinished():          # idle: wait for the next arrival
            time.sleep(max(0.0, reqs[nxt][0] - now))
            continue
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finished:
                finish[o.request_id] = time.perf_counter() - t0
    return finish, tokens


def serve_batches(engine, reqs, size: int):
    """Batches of `size` in arrival order, each run to completion before the next starts (size 1: sequential)."""
    t0 = time.perf_counter()
    finish, tokens = {}, {}
    for lo in range(0, len(reqs), size):
        batch = list(range(lo, min(lo + size, len(reqs))))
        wait = reqs[batch[-1]][0] - (time.perf_counter() - t0)   # the batch is complete when its last one arrives
        if wait > 0:
            time.sleep(wait)
        run = engine.start([reqs[i][1] for i in batch], [params(reqs[i][2]) for i in batch])
        for p, _, d in run:
            tokens.setdefault(batch[p], []).extend(d.token_ids)
            if d.finish_reason is not None:
                finish[batch[p]] = time.perf_counter() - t0
    return finish, tokens


def summarise(reqs, finish, tokens):
    lat = [finish[i] - reqs[i][0] for i in range(len(reqs))]
    total = sum(len(tokens[i]) for i in range(len(reqs)))
    return total / (max(finish.values()) - reqs[0][0]), statistics.mean(lat), statistics.median(lat)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--arrival-ms", type=float, default=40.0, help="mean gap between arrivals (Poisson)")
    ap.add_argument("--static-batch", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=32, help="continuous: most rows decoding at once")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from lmforge.infer import Engine

    torch.set_num_threads(args.threads)
    model = build_model()
    engine = Engine(model, IdTokenizer(8192))
    cont = Engine(model, IdTokenizer(8192), max_batch=args.max_batch)
    reqs = workload(args.requests, args.arrival_ms, args.seed)
    modes = {"continuous": lambda: serve_continuous(cont, reqs),
             f"static x{args.static_batch}": lambda: serve_batches(engine, reqs, args.static_batch),
             "sequential": lambda: serve_batches(engine, reqs, 1)}
    engine.generate([reqs[0][1]], params(8))    # warm-up (and the native step's first build)
    results = {m: [] for m in modes}
    reference = None
    for r in range(args.rounds):
        for name, fn in modes.items():
            finish, tokens = fn()
            if reference is None:
                reference = tokens
            elif tokens != reference:
                print(f"ERROR: {name} gave different tokens than the first mode", file=sys.stderr)
                sys.exit(1)
            results[name].append(summarise(reqs, finish, tokens))
            print(f"round {r + 1} {name:>12}: {results[name][-1][0]:7.1f} tok/s, mean latency "
                  f"{results[name][-1][1] * 1e3:7.0f} ms", flush=True)

    n_tok = sum(x[2] for x in reqs)
    print(f"\n{platform.processor() or platform.machine()}, {_cpu_model()}, {args.threads} threads; ~9 M model fp32 "
          f"greedy; {args.requests} requests ({n_tok} new tokens, prompts 8-96), Poisson arrivals every "
          f"{args.arrival_ms:.0f} ms on average; median of {args.rounds} interleaved rounds (range)")
    print(f"{'mode':>12} {'tok/s':>16} {'mean latency ms':>20} {'p50 latency ms':>16}")
    med = {}
    for name, rows in results.items():
        tps = [x[0] for x in rows]
        mean = [x[1] * 1e3 for x in rows]
        p50 = [x[2] * 1e3 for x in rows]
        med[name] = (statistics.median(tps), statistics.median(mean))
        print(f"{name:>12} {med[name][0]:7.1f} ({min(tps):.0f}-{max(tps):.0f}) {med[name][1]:9.0f} "
              f"({min(mean):.0f}-{max(mean):.0f}) {statistics.median(p50):16.0f}")
    static = f"static x{args.static_batch}"
    print(f"\ncontinuous vs {static}: {med['continuous'][0] / med[static][0]:.2f}x tok/s, mean latency "
          f"{med['continuous'][1] / med[static][1]:.2f}x")
    print(f"continuous vs sequential: {med['continuous'][0] / med['sequential'][0]:.2f}x tok/s, mean latency "
          f"{med['continuous'][1] / med['sequential'][1]:.2f}x")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
