"""The training loss, ``cross_entropy``: it lives in ``kiln.model.loss`` (evaluation uses it too);
this module keeps the old import path."""

from kiln.model.loss import cross_entropy

__all__ = ["cross_entropy"]
