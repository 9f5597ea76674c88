"""Serving throughput and latency of `lmforge serve` (protocol: docs/bench.md): the real server on 127.0.0.1,
streaming clients at several concurrency levels.

    python bench/serve.py                               # ~9 M model, 1/4/16/64 clients, 64 new tokens each
    python bench/serve.py --levels 1 16 --new-tokens 32 --plot serve.png

Model: the ~9 M shape of bench/decode.py (hidden 256, 6 layers, 8 heads, 4 KV heads, FFN 688, vocab 8192), random
weights (seed 0), fp32, saved as a checkpoint with a small BPE tokenizer; the server runs with --max-batch 64.
Requests: /v1/completions, stream=true, prompts of 32 random token ids, --new-tokens tokens each (ignore_eos),
logprobs=0 so that every token is its own SSE event. At each level, `c` clients each send requests back to back
until --requests-per-client are done. Measured per request: time to first token (request sent -> first event),
inter-token latency (gaps between events); per level: aggregate output tok/s = tokens / wall time of the level.
Printed: per level tok/s, TTFT p50/p99, ITL p50/p99, and the tok/s ratio of 16 clients to 1 (sequential).

Prefix caching: a 1,500-token conversation (random ids), then its next turn (the same ids + 40 more), each
round with a new conversation, against the server with its prefix cache and against a second one started with
--prefix-cache-mb 0, alternating; printed: the second turn's median time to first token on each and the ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")


def build_checkpoint(directory: Path) -> Path:
    from lmforge import checkpoint
    from lmforge.data.corpus import python_docs
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.train(list(python_docs())[:40], vocab_size=1024, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, d_model=256, n_layer=6, n_head=8, n_kv_heads=4, d_ff=688, max_seq_len=2048,
                      pos="rope", norm="rmsnorm", ffn="swiglu", bias=False, tie_embeddings=False)
    model = Transformer(cfg)
    return checkpoint.save(directory, model=model, model_config=cfg.to_dict(), tokenizer=tok)


def start_server(ckpt: Path, max_batch: int, *extra: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--checkpoint", str(ckpt), "--port", "0",
                             "--max-batch", str(max_batch), "--max-queue", "1024", "--device", "cpu", *extra],
                            stdout=subprocess.PIPE, text=True, env=env)
    m = re.search(r"http://127\.0\.0\.1:(\d+)", proc.stdout.readline())
    if m is None:
        proc.kill()
        sys.exit("the server did not start")
    return proc, f"http://127.0.0.1:{m.group(1)}"


async def one_request(http, prompt: list[int], new: int) -> tuple[float, list[float], int]:
    body = {"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "stream": True}
    t0 = time.perf_counter()
    times = []
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                if json.loads(line[6:]).get("choices"):
                    times.append(time.perf_counter())
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])], len(times)


async def level(url: str, clients: int, per_client: int, new: int, seed: int) -> dict:
    import httpx
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(300, 1024, (32,), generator=g).tolist() for _ in range(clients * per_client)]
    ttft, itl, tokens = [], [], 0

    async def client(k):
        nonlocal tokens
        for j in range(per_client):
            a, gaps, n = await one_request(http, prompts[k * per_client + j], new)
            ttft.append(a)
            itl.extend(gaps)
            tokens += n

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        await one_request(http, prompts[0], 4)          # warm-up (first prefill, decode step set-up)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    return {"clients": clients, "tok_s": tokens / wall, "ttft_p50": q(ttft, 50), "ttft_p99": q(ttft, 99),
            "itl_p50": q(itl, 50), "itl_p99": q(itl, 99), "tokens": tokens, "wall_s": wall}


async def second_turns(urls: dict, rounds: int, length: int = 1500) -> dict:
    """{label: [TTFT of the second turn, per round]}: the first turn fills the cache, the second reuses it."""
    import httpx
    g = torch.Generator().manual_seed(1)
    out = {label: [] for label in urls}
    for _ in range(rounds):
        for label, url in urls.items():
            first = torch.randint(300, 1024, (length,), generator=g).tolist()
            second = first + torch.randint(300, 1024, (40,), generator=g).tolist()
            async with httpx.AsyncClient(base_url=url, timeout=600) as http:
                await one_request(http, first, 4)
                out[label].append((await one_request(http, second, 4))[0])
    return out


def plot(rows: list[dict], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = [r["clients"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(c, [r["tok_s"] for r in rows], "o-")
    a.set(xscale="log", xlabel="concurrent streaming clients", ylabel="aggregate output tok/s", title="throughput")
    for key, style in (("ttft_p50", "o-"), ("ttft_p99", "o--"), ("itl_p50", "s-"), ("itl_p99", "s--")):
        b.plot(c, [r[key] * 1e3 for r in rows], style, label=key)
    b.set(xscale="log", yscale="log", xlabel="concurrent streaming clients", ylabel="ms", title="latency")
    b.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefix-rounds", type=int, default=5, help="conversations for the prefix-caching measure")
    ap.add_argument("--plot", default="serve.png", help="PNG of throughput and latency per level")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        ckpt = build_checkpoint(Path(d) / "bench")
        proc, url = start_server(ckpt, max_batch=max(args.levels))
        try:
            rows = []
            for c in args.levels:
                r = asyncio.run(level(url, c, args.requests_per_client, args.new_tokens, seed=c))
                rows.append(r)
                print(f"{c:>4} clients: {r['tok_s']:8.1f} tok/s   TTFT p50 {r['ttft_p50'] * 1e3:7.1f} ms "
                      f"p99 {r['ttft_p99'] * 1e3:7.1f} ms   ITL p50 {r['itl_p50'] * 1e3:6.1f} ms "
                      f"p99 {r['itl_p99'] * 1e3:6.1f} ms   ({r['tokens']} tokens in {r['wall_s']:.1f} s)", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
        with_cache, url_with = start_server(ckpt, 4)
        without, url_without = start_server(ckpt, 4, "--prefix-cache-mb", "0")
        try:
            t = asyncio.run(second_turns({"with": url_with, "without": url_without}, args.prefix_rounds))
        finally:
            for p in (with_cache, without):
                p.terminate()
                p.wait(30)
    by = {r["clients"]: r for r in rows}
    if 1 in by and 16 in by:
        print(f"16 concurrent vs sequential: {by[16]['tok_s'] / by[1]['tok_s']:.2f}x aggregate tok/s")
    a, b = statistics.median(t["with"]), statistics.median(t["without"])
    print(f"prefix caching, second turn of a 1,500-token conversation (median of {args.prefix_rounds}): TTFT "
          f"{a * 1e3:.1f} ms with the cache vs {b * 1e3:.1f} ms without: {b / a:.2f}x lower")
    plot(rows, args.plot)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
