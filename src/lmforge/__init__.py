"""lmforge: a language model's whole life, from bytes to a served chat model."""
from lmforge.version import __version__  # noqa: E402,F401

from lmforge.errors import LmforgeError  # noqa: E402,F401


def load(path, device="auto"):
    """(model in eval mode, tokenizer) from an lmforge checkpoint (or run) directory, or from a Hugging Face model
    directory (Llama, Mistral, Qwen2, Qwen3, GPT-2: converted in memory, nothing written). THE loader: every
    verb that reads a model comes through here. device: 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'mps'.
    A LoRA run's checkpoint comes back as its base (loaded through this same function, and checked against the
    hash the run recorded) with the adapters on it; `model.loaded_from` says which directory was loaded.

        model, tok = lmforge.load("runs/quickstart/checkpoint")
        from lmforge.infer import generate
        print(generate(model, tok, "Once upon a time").text)
    """
    # torch is imported here, not by `import lmforge`
    from lmforge import checkpoint
    from lmforge.errors import CheckpointError
    from lmforge.interop.hf import is_hf_dir, load_hf
    from lmforge.model import ModelConfig, Transformer
    from lmforge.runtime import detect_device
    from lmforge.tokenizer.tokenizer import Tokenizer

    device = detect_device(device) if isinstance(device, str) else device
    if is_hf_dir(path):
        model, tok, _ = load_hf(path, device, progress=False)
        model.loaded_from = str(path)
        return model, tok
    path = checkpoint.resolve(path)
    cfg = ModelConfig.from_checkpoint(path)
    if not (path / "tokenizer").is_dir():
        raise CheckpointError("checkpoint has no tokenizer/ directory", file=str(path))
    tok = Tokenizer.load(path / "tokenizer")
    if checkpoint.lora_section(path) is not None:   # adapters only: the base, then the adapters on it
        from lmforge.model.lora import apply_lora_section
        model, _ = load(checkpoint.lora_base(path), device)
        checkpoint.check_base(model.state_dict(), path)
        apply_lora_section(model, checkpoint.lora_section(path), str(path / "config.json"))
        checkpoint.load_adapters(path, model)
        model.loaded_from = str(path)
        return model.eval(), tok
    model = Transformer(cfg)
    checkpoint.load(path, model)
    return model.to(device).eval(), tok
