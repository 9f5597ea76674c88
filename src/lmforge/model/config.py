"""ModelConfig: every architectural choice of the decoder-only Transformer, plus named presets.

One dataclass describes GPT-2-style models (learned positions, LayerNorm, GELU, biases, tied head) and
Llama/Qwen-style models (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases) and the mixes in between.
The field names are ours; where a choice exists only to load Hugging Face weights exactly (the GELU tanh
approximation, qkv-only biases, an explicit head_dim, Llama 3 RoPE scaling) the comment says so.

Derived sizes are resolved once, in __post_init__, so that `config.json` always holds explicit numbers:
  n_kv_heads = None  -> n_head (multi-head attention; 1 = multi-query, in between = grouped-query)
  head_dim   = None  -> d_model // n_head (must divide)
  d_ff       = None  -> 4 * d_model for gelu/relu/relu2;
                        for swiglu, 2/3 of that (same parameter count as a 4*d MLP, since SwiGLU has three
                        matrices) rounded UP to a multiple of `multiple_of` (the Llama rule: 8/3*d, e.g. 768 -> 2048).
(`dataclasses.replace` keeps the resolved numbers; build a new config to derive them again.)
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.errors import ConfigError

POS_CHOICES = ("learned", "sinusoidal", "rope", "none")
NORM_CHOICES = ("layernorm", "rmsnorm")
FFN_CHOICES = ("gelu", "relu", "relu2", "swiglu")
GELU_APPROX_CHOICES = ("none", "tanh")
ROPE_SCALING_KEYS = {  # rope_type -> required keys (same names as Hugging Face `rope_scaling`)
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_kv_heads: int | None = None      # None = n_head (MHA); 1 = MQA; a divisor of n_head = GQA
    d_model: int = 768
    head_dim: int | None = None        # None = d_model // n_head; explicit for Qwen3/Mistral-Nemo-style models
    d_ff: int | None = None            # None = derived (see module docstring)
    multiple_of: int = 64              # SwiGLU d_ff rounding
    max_seq_len: int = 1024
    # positions
    pos: Literal["learned", "sinusoidal", "rope", "none"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # {"rope_type": "linear"|"llama3", ...} as in HF configs (Llama 3.1+)
    # normalization
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    final_norm: bool = True            # a norm before the LM head (every pre-norm model has one)
    qk_norm: bool = False              # RMSNorm (learned weight) over head_dim on q and k, before RoPE (Qwen3)
    # feed-forward
    ffn: Literal["gelu", "relu", "relu2", "swiglu"] = "swiglu"
    gelu_approx: Literal["none", "tanh"] = "none"   # GPT-2 uses the tanh approximation ("gelu_new")
    # biases
    bias: bool = False                 # biases in every Linear (and LayerNorm), GPT-2 style
    qkv_bias: bool = False             # biases on q/k/v projections only (Qwen2 style); implied by bias
    # regularization / init / head
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    # a second head beside the LM head: `score_dim` numbers per position from the final hidden state (Hugging
    # Face's `score` layer of *ForSequenceClassification): 1 for a reward model or a value head; 0 = none
    score_dim: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "multiple_of"):
            _positive_int(self, name)
        for name in ("n_kv_heads", "head_dim", "d_ff"):
            if getattr(self, name) is not None:
                _positive_int(self, name)
        _choice(self, "pos", POS_CHOICES)
        _choice(self, "norm", NORM_CHOICES)
        _choice(self, "ffn", FFN_CHOICES)
        _choice(self, "gelu_approx", GELU_APPROX_CHOICES)
        for name in ("final_norm", "qk_norm", "bias", "qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"expected true/false, got {getattr(self, name)!r}", field=name)
        for name in ("rope_theta", "norm_eps", "init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                raise ConfigError(f"must be a positive number, got {v!r}", field=name)
        if isinstance(self.score_dim, bool) or not isinstance(self.score_dim, int) or self.score_dim < 0:
            raise ConfigError(f"must be an integer >= 0, got {self.score_dim!r}", field="score_dim")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.dropout!r}", field="dropout")

        # resolve the derived sizes
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_head
        if self.n_kv_heads > self.n_head or self.n_head % self.n_kv_heads:
            raise ConfigError(f"n_head ({self.n_head}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
                              field="n_kv_heads")
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})",
                                  field="d_model")
            self.head_dim = self.d_model // self.n_head
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}", field="head_dim")
        if self.pos == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"sinusoidal positions need an even d_model, got {self.d_model}", field="d_model")
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model, self.ffn, self.multiple_of)
        self._check_rope_scaling()

    def _check_rope_scaling(self):
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise ConfigError(f"expected a mapping or null, got {rs!r}", field="rope_scaling")
        kind = rs.get("rope_type", rs.get("type"))
        if kind not in ROPE_SCALING_KEYS:
            raise ConfigError(f"rope_type {kind!r} is not one of {', '.join(ROPE_SCALING_KEYS)}",
                              field="rope_scaling.rope_type")
        for key in ROPE_SCALING_KEYS[kind]:
            v = rs.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"needs a positive number, got {v!r}", field=f"rope_scaling.{key}")
        if kind == "llama3" and not rs["high_freq_factor"] > rs["low_freq_factor"]:
            raise ConfigError("high_freq_factor must be greater than low_freq_factor",
                              field="rope_scaling.high_freq_factor")
        extra = set(rs) - set(ROPE_SCALING_KEYS[kind]) - {"rope_type", "type"}
        if extra:
            raise ConfigError(f"unknown key(s) {', '.join(sorted(extra))} for rope_type {kind!r}",
                              field="rope_scaling")
        self.rope_scaling = {"rope_type": kind, **{k: rs[k] for k in ROPE_SCALING_KEYS[kind]}}

    # --- (de)serialization: config.json of a checkpoint ---
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["rope_scaling"] is not None:
            d["rope_scaling"] = dict(d["rope_scaling"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of to_dict. Unknown keys and bad values raise ConfigError naming the field."""
        from lmforge.config import build  # type checks + "did you mean" for unknown keys
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a mapping, got {type(d).__name__}")
        return build(cls, d)

    @classmethod
    def from_checkpoint(cls, path) -> "ModelConfig":
        """The model config of an lmforge checkpoint (or run) directory; errors name its config.json."""
        from lmforge import checkpoint
        from lmforge.errors import CheckpointError

        path = checkpoint.resolve(path)
        config = checkpoint.read_config(path)
        if not isinstance(config.get("model"), dict):
            raise CheckpointError("config.json has no 'model' section", file=str(path / "config.json"))
        try:
            return cls.from_dict(config["model"])
        except ConfigError as e:
            raise CheckpointError(f"bad model config: {e}", file=str(path / "config.json")) from None


def default_d_ff(d_model: int, ffn: str, multiple_of: int = 64) -> int:
    if ffn == "swiglu":
        hidden = int(2 * 4 * d_model / 3)
        return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    return 4 * d_model


def _positive_int(cfg, name):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"must be a positive integer, got {v!r}", field=name)


def _choice(cfg, name, choices):
    v = getattr(cfg, name)
    if v not in choices:
        raise ConfigError(f"{v!r} is not one of {', '.join(choices)}", field=name)


# ---------------------------------------------------------------------------------------------------------------
# Presets. The HF-compatible ones have exactly the shapes of the published checkpoints (so their weights load);
# the small ones are for laptops (cpu-*) and tests (tiny). vocab_size is usually overridden by the tokenizer.

_GPT2 = dict(pos="learned", norm="layernorm", norm_eps=1e-5, ffn="gelu", gelu_approx="tanh", bias=True,
             tie_embeddings=True, vocab_size=50257, max_seq_len=1024)
_LLAMA = dict(pos="rope", norm="rmsnorm", ffn="swiglu", bias=False, qkv_bias=False)

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 family (HF GPT2LMHeadModel shapes; 124M / 350M / 774M / 1558M parameters)
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, d_model=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, d_model=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, d_model=1600),
    # Llama-3.2-1B shape (1.24B parameters, tied head, GQA 32/8, RoPE theta 5e5 with Llama 3 scaling)
    "llama": dict(_LLAMA, vocab_size=128256, n_layer=16, n_head=32, n_kv_heads=8, d_model=2048, d_ff=8192,
                  max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True,
                  rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # TinyLlama-1.1B shape (Llama 2 architecture, untied head, GQA 32/4)
    "tinyllama": dict(_LLAMA, vocab_size=32000, n_layer=22, n_head=32, n_kv_heads=4, d_model=2048, d_ff=5632,
                      max_seq_len=2048, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False),
    # Qwen2-0.5B shape (q/k/v biases only, GQA 14/2, theta 1e6, tied)
    "qwen2-0.5b": dict(_LLAMA, vocab_size=151936, n_layer=24, n_head=14, n_kv_heads=2, d_model=896, d_ff=4864,
                       max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
                       tie_embeddings=True),
    # small llama-style models trained from scratch
    "tiny": dict(_LLAMA, vocab_size=4096, n_layer=2, n_head=4, n_kv_heads=2, d_model=128, max_seq_len=256),
    "cpu-small": dict(_LLAMA, vocab_size=8192, n_layer=4, n_head=6, n_kv_heads=2, d_model=384, max_seq_len=512),
    "cpu-base": dict(_LLAMA, vocab_size=16384, n_layer=8, n_head=8, n_kv_heads=4, d_model=512, max_seq_len=1024),
    "gpu-124m": dict(_LLAMA, vocab_size=50304, n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A named preset with fields overridden, e.g. get_preset("cpu-small", vocab_size=tok.vocab_size)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown model preset '{name}'{hint}; presets: {', '.join(PRESETS)}", field="preset")
    values = dict(PRESETS[name])
    if any(k in overrides for k in ("d_model", "n_head", "ffn", "multiple_of")) and "d_ff" not in overrides:
        # the preset's explicit d_ff belongs to its shape: derive again when the shape changes
        values.pop("d_ff", None)
    values.update(overrides)
    return ModelConfig.from_dict(values)
