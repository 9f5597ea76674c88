"""The version of lmforge: the bottom of the house (checkpoints, shards and tokenizers record it)."""
__version__ = "0.1.0"
