"""Kiln: raw web data to a trained, evaluated language model, every piece built from scratch.

Importing ``kiln`` does nothing but define names: stages live in subpackages that follow the
data flow (``kiln.data`` -> ``kiln.tokenizer`` -> ``kiln.shards`` -> ``kiln.model`` /
``kiln.train`` -> ``kiln.eval`` / ``kiln.generate``).
"""

__version__ = "0.1.0"
