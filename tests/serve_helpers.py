"""What the server tests share: a tiny chat checkpoint, and `lmforge serve` started for real in a subprocess on
127.0.0.1 (a free port picked by the server itself: --port 0, read back from its first line)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmforge import checkpoint
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.tokenizer import Tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. 12 + 34 = 46. What is 7 * 8? It is 56.\n"
        '{"name": "Ada", "age": 36} Der schnelle braune Fuchs. Le renard brun rapide.\n')
SRC = str(Path(__file__).resolve().parents[1] / "src")


def make_checkpoint(directory: Path, context: int = 512) -> Path:
    """An untrained model with lmforge's chat tokens; the chat markers' LM-head rows are zeroed, so greedy
    replies run to their token limit instead of ending at a random <|end|>."""
    tok = Tokenizer.train([TEXT * 30], vocab_size=256 + 16 + 60, progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_heads=2, d_model=32,
                                    max_seq_len=context, init_std=0.3, tie_embeddings=False))
    with torch.no_grad():
        for i in tok.special_tokens.values():
            model.lm_head.weight[i] = 0
    return checkpoint.save(directory, model=model, model_config=model.config.to_dict(), tokenizer=tok)


class Server:
    """`python -m lmforge serve` in a subprocess; `.url`, `.pid`; stop() ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, ckpt: Path, *args: str, timeout: float = 120):
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   LMFORGE_NATIVE="0", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--checkpoint", str(ckpt),
                                      "--port", "0", "--device", "cpu", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.pid = self.proc.pid
        line = self.proc.stdout.readline()   # the server's first line names its address
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if m is None:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = f"http://127.0.0.1:{m.group(1)}"
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        import httpx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("the server did not answer /health")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stderr.read()
