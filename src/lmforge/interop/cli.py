"""`lmforge import hf`, `lmforge export hf | gguf`, `lmforge lora merge | export`: their arguments and what they run.

    lmforge import hf --source ~/models/Qwen3-0.6B --out runs/qwen3
    lmforge export hf --checkpoint runs/quickstart/checkpoint --out runs/hf
    lmforge export gguf --checkpoint runs/quickstart/checkpoint --out model.gguf --type q8_0
    lmforge lora merge --checkpoint runs/sft-lora --out runs/sft-merged    # a LoRA run -> full weights
    lmforge lora export --checkpoint runs/sft-lora --out runs/sft-peft     # a LoRA run -> PEFT adapter directory
"""
from __future__ import annotations

from lmforge.verbs import Verb


def import_hf_arguments(p) -> None:
    p.add_argument("--source", required=True, metavar="HF_DIR",
                   help="local model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, metavar="CKPT_DIR", help="checkpoint directory to write")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype in the checkpoint (default: as stored)")


def cmd_import_hf(args) -> int:
    from lmforge.interop.hf import import_hf

    path = import_hf(args.source, args.out, dtype=args.dtype)
    print(f"wrote lmforge checkpoint {path}")
    return 0


def export_hf_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT_DIR")
    p.add_argument("--out", required=True, metavar="HF_DIR")


def cmd_export_hf(args) -> int:
    from lmforge.interop.hf import export_hf

    path = export_hf(args.checkpoint, args.out)
    print(f"wrote Hugging Face model {path} (AutoModelForCausalLM / AutoTokenizer.from_pretrained)")
    return 0


def export_gguf_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT_DIR")
    p.add_argument("--out", required=True, metavar="FILE.gguf")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"],
                   help="weight type of the matrices (default f16; norms stay f32)")


def cmd_export_gguf(args) -> int:
    from lmforge.interop.gguf import export_gguf

    path = export_gguf(args.checkpoint, args.out, args.type)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.type})")
    return 0


def lora_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="a LoRA run (or its checkpoint directory)")
    p.add_argument("--out", required=True, metavar="DIR")


def cmd_lora_merge(args) -> int:
    import lmforge
    from lmforge import checkpoint as ckpt
    from lmforge.errors import CheckpointError, read_json_object
    from lmforge.io import check_replaceable_dir
    from lmforge.model.lora import lora_modules, merge_lora

    path = ckpt.resolve(args.checkpoint)
    section = ckpt.lora_section(path)
    if section is None:
        raise CheckpointError("not a LoRA checkpoint (config.json has no 'lora' section): nothing to merge",
                              file=str(path))
    check_replaceable_dir(args.out, "config.json")
    model, tok = lmforge.load(path, device="cpu")
    n = len(lora_modules(model))
    merge_lora(model)
    gen = path / "generation_config.json"
    extra = {k: v for k, v in ckpt.read_config(path).items() if k not in ("model", "lmforge_version", "lora")}
    extra["merged_from"] = {"lora_checkpoint": str(path), "base": section["base"]["path"]}
    out = ckpt.save(args.out, model=model, model_config=model.config.to_dict(), tokenizer=tok,
                    generation_config=read_json_object(gen) if gen.is_file() else {}, extra=extra)
    print(f"merged {n} LoRA adapters into the base weights: wrote checkpoint {out}")
    return 0


def cmd_lora_export(args) -> int:
    from lmforge.interop.peft import export_peft

    out = export_peft(args.checkpoint, args.out)
    print(f"wrote PEFT adapter {out} (PeftModel.from_pretrained on the base exported with `lmforge export hf`)")
    return 0


VERBS = [
    Verb(("import", "hf"), "Hugging Face directory (Llama, Mistral, Qwen2, Qwen3, GPT-2; safetensors) -> lmforge "
         "checkpoint", import_hf_arguments, cmd_import_hf),
    Verb(("export", "hf"), "lmforge checkpoint -> Hugging Face directory (from_pretrained loads it offline)",
         export_hf_arguments, cmd_export_hf),
    Verb(("export", "gguf"), "lmforge checkpoint -> GGUF file for llama.cpp (llama-style models)",
         export_gguf_arguments, cmd_export_gguf),
    Verb(("lora", "merge"), "fold a LoRA run's adapters into its base: a checkpoint of full weights",
         lora_arguments, cmd_lora_merge),
    Verb(("lora", "export"), "a LoRA run's adapters as a PEFT adapter directory (for our HF export of the base)",
         lora_arguments, cmd_lora_export),
]
