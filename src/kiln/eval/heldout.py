"""``evaluate_heldout`` (held-out loss and bits per byte over a 1-D token array): it lives in
``kiln.model.heldout`` so the trainer can call it without importing a later stage; this module keeps
the old import path."""

from kiln.model.heldout import evaluate_heldout

__all__ = ["evaluate_heldout"]
