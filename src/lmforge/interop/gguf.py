"""GGUF export for llama.cpp: `lmforge export gguf --checkpoint CKPT --out model.gguf --type f32|f16|q8_0|q4_0`.

What llama.cpp's `llama` architecture needs, written with the `gguf` package (pip install 'lmforge[interop]'):
- metadata: sizes, RoPE base (and linear scaling, or Llama 3 scaling as a rope_freqs tensor of per-frequency
  factors), RMSNorm epsilon, file type;
- the byte-level BPE vocabulary (tokenizer.ggml.model "gpt2"): every token in GPT-2's byte alphabet, merges in
  priority order, token types (specials are CONTROL, model padding UNUSED), BOS/EOS/PAD ids, the pre-tokenizer name
  llama.cpp knows for our split regex, and the chat template;
- tensors under llama.cpp's names. llama.cpp's llama RoPE rotates adjacent channel pairs (2i, 2i+1), while HF
  and we rotate halves (i, i + head_dim/2): the rows of Q and K (and their biases) are permuted per head, as
  llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does, so attention scores come out the same.

Quantization is our own (numpy), block for block the bytes of ggml's reference quantizer (tests compare with
gguf.quants.quantize). Matrices get the requested type, norms/biases/rope factors stay f32; a matrix whose rows
are not a multiple of 32 falls back to f16. Tensors are converted and written one at a time.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.interop.hf import QWEN2_PATTERN, SafetensorsDir, check_weights
from lmforge.io import write_error
from lmforge.model.config import ModelConfig
from lmforge.tokenizer.bpe import GPT2_PATTERN, GPT4_PATTERN
from lmforge.tokenizer.chat import LMFORGE_CHAT_TEMPLATE, uses_lmforge_template

QK = 32  # values per quantization block (Q8_0 and Q4_0)
TYPES = ("f32", "f16", "q8_0", "q4_0")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp implements each pre-tokenizer by name; ours (GPT-4's split, as rustbpe writes it) splits as Llama 3's
PRE_TOKENIZERS = {GPT4_PATTERN: "llama-bpe", LLAMA3_PATTERN: "llama-bpe", QWEN2_PATTERN: "qwen2", GPT2_PATTERN: "gpt-2"}


# ---------------------------------------------------------------------------------------------------------------
# quantization (ggml block formats)

def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (numpy's round goes to even). x - trunc(x) is exact in floating point."""
    t = np.trunc(x)
    return t + np.sign(x) * (np.abs(x - t) >= 0.5)


def _blocks(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] % QK:
        raise ValueError(f"rows of {x.shape[-1]} values are not a multiple of {QK}")
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK)


def _inverse(d: np.ndarray) -> np.ndarray:
    return np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)  # an all-zero block has scale 0


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Q8_0: per block of 32 values, an fp16 scale d = max|x| / 127, then 32 int8 round(x / d): 34 bytes.
    (..., n) float -> (..., n / 32 * 34) uint8."""
    b = _blocks(x)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    q = _round_half_away(b * _inverse(d)).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK * 34)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """Q4_0: per block of 32 values, d = (the value of largest magnitude) / -8 in fp16, then 4-bit
    q = min(15, trunc(x / d + 8.5)); value j and value j + 16 share byte j (low, high nibble): 18 bytes."""
    b = _blocks(x)
    rows = np.arange(len(b))
    d = b[rows, np.abs(b).argmax(axis=1)][:, None] / np.float32(-8)  # argmax: the first, as ggml's strict '<'
    q = np.clip(np.trunc(b * _inverse(d) + np.float32(8.5)), 0, 15).astype(np.uint8)
    packed = q[:, :QK // 2] | (q[:, QK // 2:] << np.uint8(4))
    out = np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK * 18)


# ---------------------------------------------------------------------------------------------------------------
# what goes into the file

def permute_for_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a Q or K projection (or bias), per head, from halves order [x_0..x_{h/2-1}, y_0..] (rotate_half)
    to pairs order [x_0, y_0, x_1, y_1, ...] (llama.cpp's RoPE rotates (2i, 2i+1))."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_exportable(cfg: ModelConfig) -> None:
    """GGUF export writes llama.cpp's llama architecture: RoPE, RMSNorm, SwiGLU, no biases but optional q/k/v."""
    for field, want in (("pos", "rope"), ("norm", "rmsnorm"), ("ffn", "swiglu"), ("bias", False),
                        ("qk_norm", False), ("final_norm", True)):
        if getattr(cfg, field) != want:
            raise ConfigError(f"{field}={getattr(cfg, field)!r} cannot be exported to GGUF (llama architecture: "
                              f"pos='rope', norm='rmsnorm', ffn='swiglu', no biases except q/k/v, no qk_norm)",
                              field=field)


def tensor_plan(cfg: ModelConfig) -> list[tuple[str, str, int | None]]:
    """(GGUF name, our name, heads to permute for or None) for every tensor, in llama.cpp's order."""
    plan = [("token_embd.weight", "tok_emb.weight", None)]
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        plan.append((g + "attn_norm.weight", b + "attn_norm.weight", None))
        for proj, name, heads in (("q_proj", "attn_q", cfg.n_head), ("k_proj", "attn_k", cfg.n_kv_heads),
                                  ("v_proj", "attn_v", None)):
            plan.append((f"{g}{name}.weight", f"{b}attn.{proj}.weight", heads))
            if cfg.qkv_bias:
                plan.append((f"{g}{name}.bias", f"{b}attn.{proj}.bias", heads))
        plan += [(g + "attn_output.weight", b + "attn.o_proj.weight", None),
                 (g + "ffn_norm.weight", b + "ffn_norm.weight", None),
                 (g + "ffn_gate.weight", b + "ffn.gate_proj.weight", None),
                 (g + "ffn_up.weight", b + "ffn.up_proj.weight", None),
                 (g + "ffn_down.weight", b + "ffn.down_proj.weight", None)]
    plan.append(("output_norm.weight", "norm.weight", None))
    if not cfg.tie_embeddings:  # tied: llama.cpp uses token_embd for the output too
        plan.append(("output.weight", "lm_head.weight", None))
    return plan


def _ggml_type(qtype: str, shape: tuple[int, ...]):
    from gguf import GGMLQuantizationType as T
    if len(shape) < 2 or qtype == "f32":
        return T.F32
    if qtype == "f16" or shape[-1] % QK:
        return T.F16
    return {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[qtype]


def _encode(t: np.ndarray, ggml_type) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    if ggml_type == T.F32:
        return t.astype(np.float32)
    if ggml_type == T.F16:
        return t.astype(np.float16)
    quant = quantize_q8_0 if ggml_type == T.Q8_0 else quantize_q4_0
    step = max(1, (1 << 20) // t.shape[-1])  # ~1M values at a time: the quantizer's temporaries stay small
    return np.concatenate([quant(t[i:i + step]) for i in range(0, t.shape[0], step)])


def _nbytes(shape, ggml_type) -> int:
    from gguf import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[ggml_type]
    return int(np.prod(shape)) // block * size


def rope_factors(cfg: ModelConfig) -> np.ndarray | None:
    """Llama 3 RoPE scaling as llama.cpp takes it: per-frequency divisors (rope_freqs.weight)."""
    if not cfg.rope_scaling or cfg.rope_scaling["rope_type"] != "llama3":
        return None
    from lmforge.model.transformer import rope_inv_freq
    plain = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    return (plain / rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)).numpy().astype(np.float32)


def _vocab_metadata(writer, tok, n_vocab: int) -> None:
    """tokenizer.ggml.*: GPT-2 byte-level BPE in llama.cpp's terms."""
    import gguf

    from lmforge.tokenizer.tokenizer import bytes_to_unicode
    pre = PRE_TOKENIZERS.get(tok.pattern)
    if pre is None:
        raise ConfigError("the tokenizer's split regex has no llama.cpp pre-tokenizer (supported: GPT-4/Llama 3's "
                          "-> llama-bpe, Qwen2's -> qwen2, GPT-2's -> gpt-2)", field="tokenizer.pattern")
    b2u = bytes_to_unicode()
    tokens, types = [], []
    for i in range(n_vocab):
        if i >= tok.vocab_size:  # the model's vocabulary may be padded beyond the tokenizer's
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok.is_special(i):
            tokens.append(tok.token_str(i))
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append("".join(b2u[b] for b in tok.id_to_bytes(i)))
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{tokens[a]} {tokens[b]}" for a, b in tok.merges])
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id)):
        name = tok.role_token(role)
        if name is not None:
            add(tok.special_tokens[name])
    writer.add_add_bos_token(tok.role_token("bos") is not None)  # our documents start with BOS (Llama 3's too)
    writer.add_add_eos_token(False)
    # a model trained here renders with lmforge's own template: written out as the Jinja the HF export writes
    template = tok.chat_template or (LMFORGE_CHAT_TEMPLATE if uses_lmforge_template(tok) else None)
    if template:
        writer.add_chat_template(template)


def export_gguf(checkpoint: str | Path, out: str | Path, qtype: str = "f16", *, progress: bool = True) -> Path:
    """Write `out` (a .gguf file) from an lmforge checkpoint. qtype: f32 | f16 | q8_0 | q4_0 (the matrices)."""
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the gguf package: pip install 'lmforge[interop]'") from None
    from tqdm import tqdm

    from lmforge import checkpoint as ckpt
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.tokenizer import Tokenizer

    if qtype not in TYPES:
        raise ConfigError(f"{qtype!r} is not one of {', '.join(TYPES)}", field="type")
    path = ckpt.resolve(checkpoint)
    ckpt.require_full_weights(path)   # a LoRA run: adapters only
    cfg = ModelConfig.from_checkpoint(path)
    check_exportable(cfg)
    if cfg.score_dim:
        print(f"lmforge: warning: the {cfg.score_dim}-output score head (a reward model's or PPO value head) is not "
              "exported: a GGUF language model has no place for it", file=sys.stderr)
    tok = Tokenizer.load(path / "tokenizer")
    weights = SafetensorsDir(path)
    check_weights(weights, cfg, path / "model.safetensors")
    out = Path(out)
    if out.is_dir():
        raise ConfigError("is a directory; give a file name such as model.gguf", file=str(out), field="out")

    tmp = out.with_name(out.name + ".tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(path.resolve().name if path.name != "checkpoint" else path.resolve().parent.name)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_head_count(cfg.n_head)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(cfg.rope_scaling["factor"])
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _vocab_metadata(writer, tok, cfg.vocab_size)

        # header first (names, shapes, types), then the data one tensor at a time: one tensor in memory at once
        factors = rope_factors(cfg)
        plan = [("rope_freqs.weight", None, None)] * (factors is not None) + tensor_plan(cfg)
        with torch.device("meta"):  # shapes only
            shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
        for name, ours, _ in plan:
            shape = factors.shape if ours is None else shapes[ours]
            gt = gguf.GGMLQuantizationType.F32 if ours is None else _ggml_type(qtype, shape)
            writer.add_tensor_info(name, shape, np.dtype(np.float16 if gt == gguf.GGMLQuantizationType.F16
                                                         else np.float32), _nbytes(shape, gt), raw_dtype=gt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=weights.nbytes(), unit="B", unit_scale=True, desc=f"gguf {qtype}", disable=not progress,
                  file=sys.stderr, leave=False) as bar:  # closed on an error too: the error line stands alone
            for name, ours, heads in plan:
                if ours is None:
                    writer.write_tensor_data(factors)
                    continue
                t = weights[ours].float()
                bar.update(t.numel() * 4)
                if heads is not None:
                    t = permute_for_llama_cpp(t, heads)
                writer.write_tensor_data(_encode(t.numpy(), _ggml_type(qtype, tuple(t.shape))))
        writer.close()
        weights.close()
        os.replace(tmp, out)
    except KeyError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"missing tensor {e}", file=str(path / "model.safetensors")) from None
    except OSError as e:  # disk full, file too large, permission denied
        tmp.unlink(missing_ok=True)
        raise write_error(e, out, tmp) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
