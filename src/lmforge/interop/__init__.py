"""Interoperability: Hugging Face import/export (hf.py, hf_tokenizer.py) and GGUF export (gguf.py)."""
