"""Hugging Face <-> lmforge: configs, weight names, import and export (lmforge.load reads HF directories through
`load_hf`).

    lmforge import hf --source HF_DIR --out CKPT_DIR      # Llama, Mistral, Qwen2, Qwen3, GPT-2 (safetensors)
    lmforge export hf --checkpoint CKPT_DIR --out HF_DIR  # LlamaForCausalLM / Qwen2 / Qwen3 / GPT2LMHeadModel
    model, tok = lmforge.load(path)                       # an lmforge checkpoint, or an HF directory on the fly

Our Transformer keeps Hugging Face Llama's layout (separate q/k/v/o, gate/up/down, RoPE in the rotate_half
convention), so Llama-family weights only change names. GPT-2 stores Linear weights as Conv1D (in, out) and fuses
q/k/v into one c_attn: those are transposed and split (and fused back on export).

Memory: HF weights are read one tensor at a time from memory-mapped safetensors (shards too), and the model is
built on the meta device and filled by assignment, so an import holds about one copy of the weights in RAM.
"""
from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from lmforge.errors import CheckpointError, ConfigError, read_json_object
from lmforge.io import atomic_dir, write_json
from lmforge.model.config import ROPE_SCALING_KEYS, ModelConfig

# our family name -> the transformers class that loads it
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}
ROPE_TYPES = ("default",) + tuple(ROPE_SCALING_KEYS)
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old GPT-2 files: not weights
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# transformers loads model_type "qwen2" with its own Qwen2Tokenizer (this split regex + NFC), whatever
# tokenizer.json says: only a tokenizer that splits this way may be exported as Qwen2
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# ---------------------------------------------------------------------------------------------------------------
# configs

def config_from_hf(hc: dict, file: str = "config.json") -> tuple[ModelConfig, str]:
    """An HF config.json (as a dict) -> (our ModelConfig, family). Unsupported options raise ConfigError."""
    family = _family(hc, file)

    def need(key):
        if hc.get(key) is None:
            raise ConfigError("missing", file=file, field=key)
        return hc[key]

    def refuse(key, supported):
        raise ConfigError(f"{key}={hc.get(key)!r} is not supported by lmforge (supported: {supported})",
                          file=file, field=key)

    if family == "gpt2":
        approx = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(
            hc.get("activation_function", "gelu_new")) or refuse("activation_function", "gelu_new, gelu")
        if not hc.get("scale_attn_weights", True):
            refuse("scale_attn_weights", "true")
        for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if hc.get(key):
                refuse(key, "false")
        d = need("n_embd")
        kw = dict(vocab_size=need("vocab_size"), n_layer=need("n_layer"), n_head=need("n_head"), d_model=d,
                  d_ff=hc.get("n_inner") or 4 * d, max_seq_len=need("n_positions"), pos="learned",
                  norm="layernorm", norm_eps=hc.get("layer_norm_epsilon", 1e-5), ffn="gelu", gelu_approx=approx,
                  bias=True, tie_embeddings=hc.get("tie_word_embeddings", True))
    else:
        if hc.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", "silu")
        if hc.get("mlp_bias"):
            refuse("mlp_bias", "false")
        if hc.get("attention_bias") and family != "llama":
            refuse("attention_bias", "false")
        if hc.get("use_sliding_window"):
            refuse("use_sliding_window", "false")
        if hc.get("partial_rotary_factor", 1.0) != 1.0:
            refuse("partial_rotary_factor", "1.0")
        max_len = need("max_position_embeddings")
        window = hc.get("sliding_window") if family == "mistral" else None
        if window and window < max_len:
            # sliding-window attention equals full attention up to the window: keep the context within it
            warnings.warn(f"{file}: sliding_window={window} < max_position_embeddings={max_len}: lmforge has no "
                          f"sliding-window attention, so the imported model's context is {window} tokens")
            max_len = window
        theta, scaling = _rope_from_hf(hc, file)
        kw = dict(vocab_size=need("vocab_size"), n_layer=need("num_hidden_layers"),
                  n_head=need("num_attention_heads"), n_kv_heads=hc.get("num_key_value_heads"),
                  d_model=need("hidden_size"), head_dim=hc.get("head_dim"), d_ff=need("intermediate_size"),
                  max_seq_len=max_len, pos="rope", rope_theta=theta, rope_scaling=scaling, norm="rmsnorm",
                  norm_eps=hc.get("rms_norm_eps", 1e-6), ffn="swiglu", bias=False,
                  # Llama's attention_bias puts biases on q/k/v and o: imported when o's are zero (see build_model)
                  qkv_bias=family == "qwen2" or bool(hc.get("attention_bias")),
                  qk_norm=family == "qwen3", tie_embeddings=hc.get("tie_word_embeddings", False))
    kw["init_std"] = hc.get("initializer_range", 0.02)  # only matters if the model is trained further from scratch
    try:
        return ModelConfig(**kw), family
    except ConfigError as e:
        raise ConfigError(e.message, file=file, field=e.field) from None


def _family(hc: dict, file: str) -> str:
    archs = hc.get("architectures") or []
    by_class = {cls: fam for fam, cls in FAMILIES.items()}
    for arch in archs:
        if arch in by_class:
            return by_class[arch]
    if not archs and hc.get("model_type") in FAMILIES:
        return hc["model_type"]
    raise ConfigError(f"unsupported architecture {(archs or [hc.get('model_type')])[0]!r}; supported: "
                      f"{', '.join(FAMILIES.values())}", file=file, field="architectures")


def _rope_from_hf(hc: dict, file: str) -> tuple[float, dict | None]:
    """(theta, our rope_scaling) from transformers 5's rope_parameters or the older rope_theta + rope_scaling."""
    params = hc.get("rope_parameters")
    if not isinstance(params, dict) or not params:
        params = {**(hc.get("rope_scaling") or {}), "rope_theta": hc.get("rope_theta", 10000.0)}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", hc.get("rope_theta", 10000.0))
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"RoPE scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})",
                          file=file, field="rope_scaling.rope_type")
    return theta, {"rope_type": kind, **{k: params.get(k) for k in ROPE_SCALING_KEYS[kind]}}


def hf_config(cfg: ModelConfig, tokenizer=None) -> tuple[dict, str]:
    """Our ModelConfig -> (HF config.json dict, family). A config with no HF equivalent raises ConfigError naming
    the option: llama-style = RoPE + RMSNorm + SwiGLU without biases (Qwen3 with q/k norms; q/k/v biases: Qwen2
    when the tokenizer splits as Qwen2's does, else Llama with attention_bias and zero o_proj biases);
    gpt2-style = learned positions + LayerNorm + GELU with biases."""
    def no(field, supported):
        raise ConfigError(f"{field}={getattr(cfg, field)!r} has no Hugging Face equivalent here (export needs "
                          f"{supported})", field=field)

    if not cfg.final_norm:
        no("final_norm", "true")
    if cfg.pos == "learned":
        family = "gpt2"
        for field, want in (("norm", "layernorm"), ("ffn", "gelu"), ("bias", True), ("qk_norm", False)):
            if getattr(cfg, field) != want:
                no(field, f"{field}={want!r} with learned positions (GPT-2)")
        if cfg.n_kv_heads != cfg.n_head:
            no("n_kv_heads", "n_kv_heads = n_head with learned positions (GPT-2)")
        if cfg.head_dim * cfg.n_head != cfg.d_model:
            no("head_dim", "head_dim = d_model / n_head with learned positions (GPT-2)")
    elif cfg.pos == "rope":
        for field, want in (("norm", "rmsnorm"), ("ffn", "swiglu"), ("bias", False)):
            if getattr(cfg, field) != want:
                no(field, f"{field}={want!r} with RoPE (Llama/Qwen2/Qwen3)")
        if cfg.qkv_bias and cfg.qk_norm:
            no("qk_norm", "q/k biases (Qwen2) or q/k norms (Qwen3), not both")
        qwen2_tok = tokenizer is None or (tokenizer.pattern == QWEN2_PATTERN and tokenizer.normalizer == "NFC")
        family = ("qwen2" if qwen2_tok else "llama") if cfg.qkv_bias else "qwen3" if cfg.qk_norm else "llama"
    else:
        no("pos", "'rope' (Llama/Qwen2/Qwen3) or 'learned' (GPT-2)")

    ids = {}
    if tokenizer is not None:
        for role in ("bos", "eos", "pad"):
            name = tokenizer.role_token(role)
            ids[f"{role}_token_id"] = tokenizer.special_tokens[name] if name is not None else None
    common = dict(architectures=[FAMILIES[family]], model_type=family, vocab_size=cfg.vocab_size,
                  tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, torch_dtype="float32",
                  use_cache=True, **ids)
    if family == "gpt2":
        return dict(common, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, n_positions=cfg.max_seq_len,
                    n_inner=cfg.d_ff, activation_function="gelu_new" if cfg.gelu_approx == "tanh" else "gelu",
                    layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    scale_attn_weights=True), family
    hc = dict(common, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
              num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
              max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
              attention_dropout=0.0, rope_theta=cfg.rope_theta,  # legacy keys: transformers 4 and 5 both read them
              rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None)
    if family == "qwen2":
        hc.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    else:
        hc.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    return hc, family


# ---------------------------------------------------------------------------------------------------------------
# weights

def weight_names(cfg: ModelConfig, family: str, prefix: str = "") -> list[tuple[str, str, str]]:
    """(our name, HF name, how) for every tensor. how: 'copy'; 'T' = transposed (GPT-2's Conv1D stores (in, out));
    'q'/'k'/'v' = that third of GPT-2's fused c_attn (rows of the transposed weight, or of the bias).
    prefix: 'transformer.' for GPT-2 files written by transformers, '' for the original OpenAI ones."""
    rows = []
    if family == "gpt2":
        p = prefix
        rows += [("tok_emb.weight", p + "wte.weight", "copy"), ("pos_emb.weight", p + "wpe.weight", "copy")]
        for i in range(cfg.n_layer):
            h, b = f"{p}h.{i}.", f"blocks.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
                rows += [(f"{b}{ours}.{x}", f"{h}{theirs}.{x}", "copy") for x in ("weight", "bias")]
            for j in "qkv":
                rows += [(f"{b}attn.{j}_proj.{x}", f"{h}attn.c_attn.{x}", j) for x in ("weight", "bias")]
            for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("ffn.up_proj", "mlp.c_fc"),
                                 ("ffn.down_proj", "mlp.c_proj")):
                rows += [(f"{b}{ours}.weight", f"{h}{theirs}.weight", "T"),
                         (f"{b}{ours}.bias", f"{h}{theirs}.bias", "copy")]
        rows += [(f"norm.{x}", f"{p}ln_f.{x}", "copy") for x in ("weight", "bias")]
    else:
        rows.append(("tok_emb.weight", "model.embed_tokens.weight", "copy"))
        for i in range(cfg.n_layer):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            rows += [(b + "attn_norm.weight", h + "input_layernorm.weight", "copy"),
                     (b + "ffn_norm.weight", h + "post_attention_layernorm.weight", "copy")]
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                rows.append((f"{b}attn.{proj}.weight", f"{h}self_attn.{proj}.weight", "copy"))
                if cfg.qkv_bias and proj != "o_proj":
                    rows.append((f"{b}attn.{proj}.bias", f"{h}self_attn.{proj}.bias", "copy"))
            if cfg.qk_norm:
                rows += [(f"{b}attn.{n}.weight", f"{h}self_attn.{n}.weight", "copy") for n in ("q_norm", "k_norm")]
            rows += [(f"{b}ffn.{proj}.weight", f"{h}mlp.{proj}.weight", "copy")
                     for proj in ("gate_proj", "up_proj", "down_proj")]
        rows.append(("norm.weight", "model.norm.weight", "copy"))
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", "lm_head.weight", "copy"))
    return rows


def hf_prefix(family: str, names) -> str:
    return "transformer." if family == "gpt2" and "transformer.wte.weight" in names else ""


def state_from_hf(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig,
                  family: str) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors (a dict, a model's state_dict(), or a lazy SafetensorsDir) -> our (name, tensor), one at a time.
    Every tensor yielded owns its storage (checkpoint saving drops tensors that share one as tied weights)."""
    d = cfg.d_model
    for ours, theirs, how in weight_names(cfg, family, hf_prefix(family, tensors)):
        t = tensors[theirs]
        if how == "T":
            t = t.t()
        elif how in ("q", "k", "v"):
            j = "qkv".index(how)
            t = (t.t() if t.dim() == 2 else t)[j * d:(j + 1) * d]
        yield ours, t.clone(memory_format=torch.contiguous_format) if how != "copy" else t


def state_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig, family: str) -> dict[str, torch.Tensor]:
    """Our tensors -> HF names and layouts (GPT-2: Conv1D transposes, q/k/v fused into c_attn)."""
    out, fused = {}, {}
    for ours, theirs, how in weight_names(cfg, family, "transformer." if family == "gpt2" else ""):
        t = state[ours]
        if how == "copy":
            out[theirs] = t.contiguous()
        elif how == "T":
            out[theirs] = t.t().contiguous()
        else:
            fused.setdefault(theirs, {})[how] = t
    for theirs, parts in fused.items():
        cat = torch.cat([parts[j] for j in "qkv"], 0)
        out[theirs] = cat.t().contiguous() if cat.dim() == 2 else cat
    if family == "llama" and cfg.qkv_bias:  # Llama's attention_bias has an o_proj bias too: zero = none
        for i in range(cfg.n_layer):
            w = out[f"model.layers.{i}.self_attn.o_proj.weight"]
            out[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out


class SafetensorsDir(Mapping):
    """The tensors of a model directory (model.safetensors, or shards listed in model.safetensors.index.json),
    read lazily from memory-mapped files: `d[name]` loads that one tensor."""

    def __init__(self, directory: str | Path, filename: str = "model.safetensors"):
        from safetensors import safe_open
        self._safe_open = safe_open
        d = Path(directory)
        index = d / f"{filename}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError("not a safetensors index (no weight_map)", file=str(index)) from None
            self._where = {k: d / f for k, f in weight_map.items()}
        elif (d / filename).is_file():
            self._where = dict.fromkeys(self._open(d / filename).keys(), d / filename)
        else:
            pickled = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt*"))
            hint = (f" ({pickled[0]} is a pickle, which lmforge never loads: save the model with "
                    "save_pretrained(..., safe_serialization=True))") if pickled else ""
            raise CheckpointError(f"no {filename} or {filename}.index.json{hint}", file=str(d))
        self._files: dict[Path, object] = {}

    def _open(self, path: Path):
        try:
            return self._safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own types for missing / truncated files
            raise CheckpointError(f"cannot read safetensors: {e}", file=str(path)) from None

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._where[name]
        if path not in self._files:
            self._files[path] = self._open(path)
        return self._files[path].get_tensor(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, read from the headers (no tensor data is loaded)."""
        out = {}
        for name, path in self._where.items():
            if path not in self._files:
                self._files[path] = self._open(path)
            out[name] = tuple(self._files[path].get_slice(name).get_shape())
        return out

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        """Unmap the files (their pages stop counting as this process's memory)."""
        self._files.clear()

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self._where.values()) if p.is_file())


def build_model(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig, family: str, *, dtype=None,
                device: str | torch.device = "cpu", progress: bool = True, file: str = "model.safetensors"):
    """Our Transformer from HF tensors, without initialising weights it will overwrite: built on the meta device,
    filled by assignment (dtype None keeps the stored one). Missing or unknown tensors raise CheckpointError."""
    from tqdm import tqdm

    from lmforge.model.transformer import Transformer

    rows = weight_names(cfg, family, hf_prefix(family, tensors))
    needed = {theirs for _, theirs, _ in rows}
    missing = sorted(needed - set(tensors))
    extra = sorted(k for k in tensors if k not in needed and not k.endswith(_GPT2_BUFFERS)
                   and not k.endswith("rotary_emb.inv_freq") and not (cfg.tie_embeddings and k == "lm_head.weight"))
    if family == "llama" and cfg.qkv_bias:  # attention_bias: o_proj biases must be zero (we have none there)
        o_bias = [k for k in extra if k.endswith("self_attn.o_proj.bias")]
        nonzero = [k for k in o_bias if tensors[k].any()]
        if nonzero:
            raise CheckpointError(f"{nonzero[0]} is not zero: attention output biases are not supported", file=file)
        extra = [k for k in extra if k not in o_bias]
    if missing or extra:
        raise CheckpointError(f"the weights do not match the config: missing {missing[:3]}, unexpected {extra[:3]}"
                              + (" (an option lmforge does not support?)" if extra else ""), file=file)
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    hf_name = {ours: theirs for ours, theirs, _ in rows}
    total = tensors.nbytes() if isinstance(tensors, SafetensorsDir) else None
    state = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="load weights", disable=not progress,
              file=sys.stderr) as bar:
        for name, t in state_from_hf(tensors, cfg, family):
            if tuple(t.shape) != shapes[name]:
                raise CheckpointError(f"{hf_name[name]} has shape {tuple(t.shape)} but config.json implies "
                                      f"{shapes[name]}", file=file)
            state[name] = t.to(device=device, dtype=dtype or t.dtype)
            bar.update(t.numel() * t.element_size())
    model.load_state_dict(state, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:  # assignment replaced tok_emb's Parameter; point the head at the new one
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# directories: import, export, load

def is_hf_dir(path: str | Path) -> bool:
    """An HF model directory has a config.json with architectures/model_type (ours has a 'model' section)."""
    f = Path(path) / "config.json"
    try:
        c = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(c, dict) and "model" not in c and ("architectures" in c or "model_type" in c)


def read_hf_config(directory: str | Path) -> tuple[dict, str]:
    f = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise CheckpointError("directory not found", file=str(directory))
    if not f.is_file():
        raise CheckpointError("no config.json: not a Hugging Face model directory", file=str(directory))
    return read_json_object(f), str(f)


def load_hf(source: str | Path, device: str | torch.device = "cpu", dtype=torch.float32, progress: bool = True):
    """(model in eval mode, tokenizer, our generation config) straight from an HF directory; nothing is written.
    dtype None keeps the stored dtype; the default float32 is what lmforge checkpoints load as."""
    return _load_hf(source, device, dtype, progress)[:3]


def _load_hf(source, device, dtype, progress):
    from lmforge.interop.hf_tokenizer import read_hf_tokenizer

    src = Path(source)
    hc, file = read_hf_config(src)
    cfg, family = config_from_hf(hc, file)
    tok = read_hf_tokenizer(src)
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                              f"{cfg.vocab_size}", file=file)
    tensors = SafetensorsDir(src)
    model = build_model(tensors, cfg, family, dtype=dtype, device=device, progress=progress,
                        file=str(src / "model.safetensors"))
    tensors.close()
    return model, tok, generation_from_hf(src, tok), family


def generation_from_hf(directory: Path, tokenizer) -> dict:
    """HF generation_config.json -> ours: the sampling keys we read, and any extra EOS ids as stop_token_ids."""
    f = Path(directory) / "generation_config.json"
    try:
        gc = json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"invalid JSON: {e.msg}", file=str(f), line=e.lineno) from None
    out = {k: gc[k] for k in ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                              "max_new_tokens") if gc.get(k) is not None}
    eos = gc.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    own = tokenizer.special_tokens.get(tokenizer.role_token("eos"))
    stop = [i for i in eos if isinstance(i, int) and i != own and 0 <= i < tokenizer.vocab_size]
    if stop:
        out["stop_token_ids"] = stop
    return out


def import_hf(source: str | Path, out: str | Path, *, dtype: str | None = None, progress: bool = True) -> Path:
    """Write an lmforge checkpoint (config.json, model.safetensors, tokenizer/, generation_config.json) from an HF
    model directory. dtype: None keeps the stored one, else 'float32' | 'bfloat16' | 'float16'."""
    from lmforge import checkpoint

    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError(f"{dtype!r} is not one of {', '.join(_DTYPES)}", field="dtype")
    _check_out(out, "config.json")
    model, tok, gen, family = _load_hf(source, "cpu", _DTYPES.get(dtype), progress)
    return checkpoint.save(out, model=model, model_config=model.config.to_dict(), tokenizer=tok,
                           generation_config=gen,
                           extra={"imported_from": {"format": "huggingface", "architecture": FAMILIES[family],
                                                    "path": str(Path(source).resolve())}})


def export_hf(checkpoint: str | Path, out: str | Path, *, progress: bool = True) -> Path:
    """Write a Hugging Face model directory from an lmforge checkpoint: config.json, model.safetensors (HF names),
    tokenizer.json + tokenizer_config.json (chat template included), generation_config.json.
    `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)` load it offline."""
    from tqdm import tqdm

    from lmforge import checkpoint as ckpt
    from lmforge.tokenizer.tokenizer import Tokenizer

    path = ckpt.resolve(checkpoint)
    ckpt.require_full_weights(path)   # a LoRA run: adapters only
    cfg = ModelConfig.from_checkpoint(path)
    tok = Tokenizer.load(path / "tokenizer")
    hc, family = hf_config(cfg, tok)
    _check_out(out, "config.json")
    if cfg.score_dim:
        print(f"lmforge: warning: the {cfg.score_dim}-output score head (a reward model's or PPO value head) is not "
              "exported: a Hugging Face causal LM has no place for it", file=sys.stderr)

    ours = SafetensorsDir(path)
    check_weights(ours, cfg, path / "model.safetensors")
    state = {}
    with tqdm(total=ours.nbytes(), unit="B", unit_scale=True, desc="read weights", disable=not progress,
              file=sys.stderr) as bar:
        for name in ours:
            state[name] = ours[name]
            bar.update(state[name].numel() * state[name].element_size())
    hf_state = state_to_hf(state, cfg, family)
    del state
    hc["torch_dtype"] = str(next(iter(hf_state.values())).dtype).removeprefix("torch.")

    out = Path(out)
    with atomic_dir(out) as tmp:
        write_json(tmp / "config.json", hc)
        ckpt.save_safetensors(hf_state, tmp / "model.safetensors", metadata={"format": "pt"})
        tok.export_hf(tmp)
        write_json(tmp / "generation_config.json", generation_to_hf(path, tok))
    return out


def check_weights(weights: SafetensorsDir, cfg: ModelConfig, file) -> None:
    """The tensors have the shapes that `cfg` (the checkpoint's config.json) gives the model: else a
    CheckpointError naming the first that differs, before anything is converted or written."""
    from lmforge import checkpoint as ckpt
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):  # shapes only
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    ckpt.check_shapes(weights.shapes(), expected, str(file))


def generation_to_hf(checkpoint: Path, tokenizer) -> dict:
    """Our generation_config.json -> HF's: the special ids, and sampling settings when we sample by default."""
    f = checkpoint / "generation_config.json"
    try:
        ours = json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"invalid JSON: {e.msg}", file=str(f), line=e.lineno) from None
    gc = {}
    for role in ("bos", "eos", "pad"):
        name = tokenizer.role_token(role)
        if name is not None:
            gc[f"{role}_token_id"] = tokenizer.special_tokens[name]
    stops = [i for i in ours.get("stop_token_ids", []) if isinstance(i, int)]
    if stops and "eos_token_id" in gc:
        gc["eos_token_id"] = [gc["eos_token_id"], *stops]
    greedy = ours.get("do_sample") is False or ours.get("temperature") == 0
    gc["do_sample"] = not greedy
    if not greedy:
        gc.update({k: ours[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
                   if k in ours})
    if "max_new_tokens" in ours or "max_tokens" in ours:
        gc["max_new_tokens"] = ours.get("max_new_tokens", ours.get("max_tokens"))
    return gc


def _check_out(out: str | Path, marker: str) -> None:
    """Refuse to replace a directory that holds something else than a model (we replace the whole directory)."""
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / marker).is_file()):
        raise ConfigError("exists and is not a model directory: refusing to replace it", file=str(out),
                          field="out")
