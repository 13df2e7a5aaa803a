"""lm-evaluation-harness adapter: a ``kiln`` model class so any harness task can score a Kiln model.

Needs ``pip install lm-eval`` (heavy: it pulls datasets, pandas, pyarrow, scikit-learn). Importing
this module registers nothing; ``register()`` adds the class to the harness registry under the name
``kiln``. Two ways in:

- ``python -m kiln.eval.harness run --model kiln --model_args model=RUN/model --tasks hellaswag``
  (registers, then hands the command line to the harness's own CLI), or ``kiln-lm-eval ...`` where
  the console script is installed;
- from Python: ``lm_eval.simple_evaluate(model=KilnLM(model=...), tasks=[...])``.

lm-eval 0.4.x discovers models only through its own registry (no entry-point plugins), so a bare
``lm_eval --model kiln`` works only in a process that imported this module and called ``register()``.

The requests reuse Kiln's scorer: ``loglikelihood`` is ``kiln.eval.multiple_choice``'s batched,
context-sharing engine; ``loglikelihood_rolling`` is ``kiln.eval.perplexity``'s sliding window;
``generate_until`` is ``kiln.generate.generate_texts`` (batched) for Kiln models, else ``kiln.eval.generative.decode``.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any


def _require_lm_eval() -> Any:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
    except ImportError as e:
        raise ImportError("the lm-evaluation-harness adapter needs lm-eval: pip install lm-eval") from e
    return LM


@functools.cache
def lm_class() -> type:
    """The ``KilnLM`` class (built on first use, since its base class lives in lm-eval)."""
    LM = _require_lm_eval()

    class KilnLM(LM):
        """A Kiln model and tokenizer behind the harness's ``LM`` interface.

        Args (``--model_args`` keys): ``model`` (save_pretrained directory), ``tokenizer`` (default:
        found beside the model or through its manifests), ``device``, ``batch_size``, ``stride``.
        Objects may be passed instead of paths: ``KilnLM(model=transformer, tokenizer=tok)``.
        """

        def __init__(self, model: Any = None, tokenizer: Any = None, device: str = "auto",
                     batch_size: int | str = 16, stride: int | None = None, **_: Any) -> None:
            super().__init__()
            from kiln.eval.lm import check_vocab
            from kiln.eval.stage import pick_device
            from kiln.tokenizer import find_tokenizer, load_tokenizer

            if model is None:
                raise ValueError("KilnLM needs model=DIR (a directory written by save_pretrained)")
            if isinstance(model, (str, os.PathLike)):
                from kiln.model import load_pretrained

                tok_path = tokenizer or find_tokenizer(model)
                model = load_pretrained(model, device=pick_device(device))
                tokenizer = tok_path
            if isinstance(tokenizer, (str, os.PathLike)) or tokenizer is None:
                if tokenizer is None:
                    raise ValueError("KilnLM needs tokenizer=PATH when model is an object")
                tokenizer = load_tokenizer(tokenizer)
            check_vocab(model, tokenizer)
            self.model = model.eval() if hasattr(model, "eval") else model
            self.tok = tokenizer
            self.bs = int(batch_size) if str(batch_size).isdigit() else 16
            self.stride = int(stride) if stride else None

        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> Any:
            """Build from ``--model_args``; the CLI's ``--device``/``--batch_size`` fill in what is unset."""
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(**{**extra, **arg_dict})

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> Any:
            """``"model=DIR,device=cuda"`` -> ``KilnLM``; see ``create_from_arg_obj``."""
            from lm_eval.utils import simple_parse_args_string

            return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            """(sum log p(continuation | context), continuation is the greedy decode) per request."""
            from kiln.eval.multiple_choice import MCItem, score_items

            if not requests:
                return []
            items = [MCItem(((ctx, cont),), 0, "lm") for ctx, cont in (r.args for r in requests)]
            res = score_items(self.model, self.tok, items, batch_size=self.bs)
            return [(s.logprobs[0], all(s.greedy)) for s in res.items]

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            """Total log-likelihood of each whole string (sliding windows; first token after eot)."""
            from kiln.eval.perplexity import text_loss

            out = []
            for r in requests:
                ids = self.tok.encode(r.args[0])
                if not ids:
                    out.append(0.0)
                    continue
                tl = text_loss(self.model, [ids], self.tok.token_bytes(), self.tok.eot_id, self.stride, self.bs)
                out.append(-tl.loss * tl.tokens)
            return out

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            """Greedy (or sampled, per gen_kwargs) continuation of each context, cut at ``until``.

            A Kiln ``Transformer`` decodes the requests that share gen_kwargs ``batch_size`` at a time
            (``kiln.generate.generate_texts``); other models go one at a time (``decode``).
            """
            from kiln.eval.generative import decode
            from kiln.eval.lm import uses_kv_cache

            groups: dict[tuple, list[int]] = {}
            ctxs = []
            for i, r in enumerate(requests):
                ctx, kw = r.args[0], dict(r.args[1]) if len(r.args) > 1 else {}
                until = kw.get("until") or []
                until = (until,) if isinstance(until, str) else tuple(until)
                temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
                ctxs.append(ctx)
                groups.setdefault((until, int(kw.get("max_gen_toks", 256)), temp), []).append(i)
            out = [""] * len(requests)
            for (until, max_new, temp), idx in groups.items():
                if uses_kv_cache(self.model):
                    from kiln.generate import generate_texts

                    got = generate_texts(self.model, self.tok, [ctxs[i] for i in idx], max_new, temperature=temp,
                                         seed=0, stop=until, batch_size=self.bs)
                else:
                    got = [decode(self.model, self.tok, ctxs[i], max_new, temp, stop=until, seed=0) for i in idx]
                for i, g in zip(idx, got):
                    out[i] = g
            return out

        @property
        def tokenizer_name(self) -> str:
            return "kiln"

    return KilnLM


def __getattr__(name: str) -> Any:
    """``kiln.eval.harness.KilnLM`` resolves to ``lm_class()`` (so "kiln.eval.harness:KilnLM" works
    as a lazy registry target)."""
    if name == "KilnLM":
        return lm_class()
    raise AttributeError(f"module 'kiln.eval.harness' has no attribute {name!r}")


def register(name: str = "kiln") -> type:
    """Register ``KilnLM`` in the harness's model registry (idempotent); returns the class."""
    from lm_eval.api.registry import model_registry

    cls = lm_class()
    if name not in model_registry or model_registry.get(name) is not cls:
        from lm_eval.api.registry import register_model

        try:
            register_model(name)(cls)
        except ValueError:  # already registered by an earlier call
            pass
    return cls


def main(argv: list[str] | None = None) -> None:
    """``python -m kiln.eval.harness ...``: the harness CLI with the ``kiln`` model registered."""
    _require_lm_eval()
    register()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
