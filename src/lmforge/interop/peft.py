"""A LoRA run's adapters in the PEFT format (the `peft` library's LoRA adapter directory).

    lmforge lora export --checkpoint runs/sft-lora --out runs/sft-lora-peft
    lmforge export hf --checkpoint BASE --out runs/base-hf           # the base, as transformers loads it
    # then, in Python:  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("runs/base-hf"),
    #                                             "runs/sft-lora-peft")

The directory holds adapter_config.json (peft_type LORA, r, lora_alpha, lora_dropout, target_modules) and
adapter_model.safetensors, whose keys name the layers of OUR Hugging Face export of the base
(`lmforge.interop.hf.weight_names`): `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (r x in) and
`...lora_B.weight` (out x r). PEFT scales the update by lora_alpha / r, as lmforge does, so the tensors copy over
unchanged. Only Llama-family exports (Llama, Mistral, Qwen2, Qwen3) are supported: GPT-2's exported layers fuse
q/k/v into one Conv1D.
"""
from __future__ import annotations

from pathlib import Path

from lmforge import checkpoint as ckpt
from lmforge.errors import CheckpointError, ConfigError
from lmforge.interop.hf import hf_config, weight_names
from lmforge.io import atomic_dir, check_replaceable_dir, write_json
from lmforge.model.config import ModelConfig

PEFT_PREFIX = "base_model.model."


def peft_state(adapters: dict, modules: list[str], cfg: ModelConfig, family: str) -> tuple[dict, list[str]]:
    """(PEFT adapter tensors, the HF names of the adapted layers) from our `<layer>.lora_A/B` tensors."""
    if family == "gpt2":
        raise ConfigError("PEFT export supports Llama-family models (Llama, Mistral, Qwen2, Qwen3); GPT-2's exported "
                          "attention fuses q/k/v into one Conv1D", field="model.pos")
    hf_name = {ours: theirs for ours, theirs, how in weight_names(cfg, family) if how == "copy"}
    state, targets = {}, []
    for m in modules:
        theirs = hf_name.get(f"{m}.weight")
        if theirs is None:   # e.g. lm_head with tied embeddings: no layer of its own in the export
            raise ConfigError(f"the adapted layer {m!r} has no separate weight in the Hugging Face export",
                              field="lora.targets")
        layer = theirs.removesuffix(".weight")
        targets.append(layer)
        for part in ("lora_A", "lora_B"):
            key = f"{m}.{part}"
            if key not in adapters:
                raise CheckpointError(f"no tensor {key!r} for the adapted layer {m!r}")
            state[f"{PEFT_PREFIX}{layer}.{part}.weight"] = adapters[key].contiguous()
    return state, targets


def adapter_config(section: dict, targets: list[str]) -> dict:
    """adapter_config.json: a PEFT LoraConfig with our settings (plain LoRA: no rsLoRA, DoRA or bias training)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(section["rank"]),
            "lora_alpha": float(section["alpha"]), "lora_dropout": float(section.get("dropout", 0.0)),
            # the exact layers: PEFT matches a list entry against a module's whole name (or a dotted suffix)
            "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
            "base_model_name_or_path": section["base"]["path"]}


def export_peft(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the PEFT adapter directory of LoRA checkpoint `checkpoint` to `out` (atomically)."""
    from lmforge.tokenizer.tokenizer import Tokenizer

    path = ckpt.resolve(checkpoint)
    section = ckpt.lora_section(path)
    if section is None:
        raise CheckpointError("not a LoRA checkpoint (config.json has no 'lora' section): no adapter to export; "
                              "`lmforge export hf` exports full weights", file=str(path))
    check_replaceable_dir(out, "adapter_config.json")
    cfg = ModelConfig.from_checkpoint(path)
    tok = Tokenizer.load(path / "tokenizer") if (path / "tokenizer").is_dir() else None
    _, family = hf_config(cfg, tok)    # the family our HF export of the base gets: its layer names
    state, targets = peft_state(ckpt.read_weights(path), list(section.get("modules") or []), cfg, family)
    out = Path(out)
    with atomic_dir(out) as tmp:
        write_json(tmp / "adapter_config.json", adapter_config(section, targets))
        ckpt.save_safetensors(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return out
