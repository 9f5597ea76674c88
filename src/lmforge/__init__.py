"""lmforge: a language model's whole life, from bytes to a served chat model."""
from lmforge.version import __version__  # noqa: E402,F401

from lmforge.errors import LmforgeError  # noqa: E402,F401


def load(path, device="auto"):
    """(model in eval mode, tokenizer) from an lmforge checkpoint (or run) directory, or from a Hugging Face model
    directory (Llama, Mistral, Qwen2, Qwen3, GPT-2: converted in memory, nothing written). THE loader: every
    verb that reads a model comes through here. device: 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'mps'.

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
        return model, tok
    path = checkpoint.resolve(path)
    cfg = ModelConfig.from_checkpoint(path)
    if not (path / "tokenizer").is_dir():
        raise CheckpointError("checkpoint has no tokenizer/ directory", file=str(path))
    tok = Tokenizer.load(path / "tokenizer")
    model = Transformer(cfg)
    checkpoint.load(path, model)
    return model.to(device).eval(), tok
