"""Byte-level BPE: `bpe` trains merges, `tokenizer` encodes/decodes with them."""
