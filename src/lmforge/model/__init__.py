"""The decoder-only Transformer and its config (presets: see lmforge.model.config.PRESETS)."""
from lmforge.model.config import PRESETS, ModelConfig, get_preset
from lmforge.model.transformer import KVCache, Transformer

__all__ = ["PRESETS", "ModelConfig", "get_preset", "KVCache", "Transformer"]
