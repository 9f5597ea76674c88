"""lmforge: a language model's whole life, from bytes to a served chat model."""
__version__ = "0.1.0"

from lmforge.errors import LmforgeError  # noqa: E402,F401
