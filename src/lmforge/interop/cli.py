"""`lmforge import hf`, `lmforge export hf | gguf`: their arguments and what they run.

    lmforge import hf --source ~/models/Qwen3-0.6B --out runs/qwen3
    lmforge export hf --checkpoint runs/quickstart/checkpoint --out runs/hf
    lmforge export gguf --checkpoint runs/quickstart/checkpoint --out model.gguf --type q8_0
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


VERBS = [
    Verb(("import", "hf"), "Hugging Face directory (Llama, Mistral, Qwen2, Qwen3, GPT-2; safetensors) -> lmforge "
         "checkpoint", import_hf_arguments, cmd_import_hf),
    Verb(("export", "hf"), "lmforge checkpoint -> Hugging Face directory (from_pretrained loads it offline)",
         export_hf_arguments, cmd_export_hf),
    Verb(("export", "gguf"), "lmforge checkpoint -> GGUF file for llama.cpp (llama-style models)",
         export_gguf_arguments, cmd_export_gguf),
]
