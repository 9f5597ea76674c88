"""lmforge: a language model's whole life, from bytes to a served chat model."""
__version__ = "0.1.0"

from lmforge.errors import LmforgeError  # noqa: E402,F401


def load(path, device="cpu"):
    """(model, tokenizer) ready for generation, from an lmforge checkpoint (or run) directory or a Hugging Face
    model directory (Llama, Mistral, Qwen2, Qwen3, GPT-2: converted in memory, nothing written).

        model, tok = lmforge.load("runs/quickstart/checkpoint")
        from lmforge.infer.generate import generate
        print(generate(model, tok, "Once upon a time").text)
    """
    from lmforge.interop.hf import load as _load  # torch is imported here, not by `import lmforge`
    return _load(path, device)
