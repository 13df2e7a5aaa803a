"""A tokenizer in a folder: finding the one a model, run or tokens folder was made with, loading it
(Kiln's format or Hugging Face's), and writing the files a model folder carries.

A model folder Kiln writes holds Hugging Face's three files, so ``AutoTokenizer.from_pretrained``
opens it as it is, and Kiln's own format under a name of its own::

    tokenizer.json            Hugging Face ``tokenizers`` JSON (byte-level BPE)
    tokenizer_config.json     ``PreTrainedTokenizerFast``, special tokens, chat template (if any)
    special_tokens_map.json   bos/eos/unk/pad names
    kiln_tokenizer.json       Kiln's format (docs/tokenizer.md); read first when present

Older folders (and the tokenizer stage's artifact) hold Kiln's format as ``tokenizer.json``: both
are read, the format told by the file's content.
"""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path
from typing import Any

from kiln.tokenizer.interop import from_hf_json, save_hf
from kiln.tokenizer.pretokenize import ENDOFTEXT
from kiln.tokenizer.tokenizer import FORMAT, KILN_TOKENIZER_FILE, TOKENIZER_FILE, Tokenizer

HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
_NAMES = (KILN_TOKENIZER_FILE, TOKENIZER_FILE)  # in order of preference inside one folder
_UP = 2  # folders above the start that are searched too: a checkpoint sits at run/checkpoints/step_N


def find_tokenizer(path: str | os.PathLike) -> Path:
    """The tokenizer file for ``path``: a tokenizer file itself, or a tokenizer, model, run, tokens or
    checkpoint folder.

    Searched breadth-first: the folder, up to two folders above it, then the inputs recorded in
    each ``manifest.json`` met on the way (a run's manifest names its tokens, whose manifest names
    the tokenizer). Inside one folder ``kiln_tokenizer.json`` wins over ``tokenizer.json``.
    Raises FileNotFoundError naming the folder and the ``--tokenizer`` option when none is found.
    """
    start = Path(path).resolve()
    if start.is_file():
        return start
    if not start.is_dir():
        raise FileNotFoundError(f"{path} does not exist; pass an existing tokenizer file, or a tokenizer, model, "
                                "run or tokens folder (--tokenizer PATH)")
    queue = deque([start, *list(start.parents)[:_UP]])
    seen: set[Path] = set()
    while queue:
        cur = queue.popleft()
        if cur in seen or not cur.is_dir():
            continue
        seen.add(cur)
        for name in _NAMES:
            if (cur / name).is_file():
                return cur / name
        manifest = cur / "manifest.json"
        if manifest.is_file():
            try:
                inputs = json.loads(manifest.read_text(encoding="utf-8")).get("inputs", {})
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                inputs = {}
            queue.extend(Path(p) for p in inputs)
    raise FileNotFoundError(
        f"no tokenizer found in {start}, the folders above it, or the inputs their manifests record; "
        "pass --tokenizer PATH (a tokenizer.json or the tokenizer stage's folder)"
    )


def load_tokenizer(path: str | os.PathLike, backend: str = "auto") -> Tokenizer:
    """Find (``find_tokenizer``) and load the tokenizer for ``path``, in Kiln's format or Hugging Face's."""
    p = find_tokenizer(path)
    try:
        head = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not valid JSON ({e}); retrain or re-export the tokenizer") from e
    if isinstance(head, dict) and head.get("format") != FORMAT and "model" in head:
        return from_hf_json(p, backend=backend)
    return Tokenizer.load(p, backend=backend)


def save_tokenizer_files(tok: Tokenizer, folder: str | os.PathLike, chat_template: str | None = None) -> Path:
    """Write a model folder's tokenizer files (Hugging Face's three and ``kiln_tokenizer.json``).

    ``chat_template``: a Jinja template for ``tokenizer_config.json`` (``apply_chat_template``);
    None writes none (a base model). Each file is written under a temporary name, then renamed.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / KILN_TOKENIZER_FILE)
    tmp = save_hf(tok, out / f".{TOKENIZER_FILE}.tmp")
    os.replace(tmp, out / TOKENIZER_FILE)
    config, special_map = hf_tokenizer_config(tok, chat_template)
    for name, obj in ((HF_CONFIG_FILE, config), (HF_SPECIAL_TOKENS_FILE, special_map)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, out / name)
    return out


def hf_tokenizer_config(tok: Tokenizer, chat_template: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` for ``tok``.

    End-of-text is bos, eos and pad (Kiln separates documents with it and prepends nothing), so
    ``AutoTokenizer`` encodes text exactly as Kiln does: no token is added.
    """
    eot = ENDOFTEXT if ENDOFTEXT in tok.special_tokens else None
    special_map = {"bos_token": eot, "eos_token": eot, "pad_token": eot} if eot else {}
    if chat_template is not None and "<|end|>" in tok.special_tokens:
        # a chat model ends its reply with the end-of-turn token (kiln.align.chat): generation stops there
        special_map["eos_token"] = "<|end|>"
    added = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,  # transformers' "no limit"
        "added_tokens_decoder": added,
        **special_map,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config, special_map
