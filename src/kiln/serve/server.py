"""Loading a model folder into an engine, and running the HTTP server over it with uvicorn."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.serve.config import ServeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Which weights to load and how (shared by ``kiln serve``, ``kiln chat`` and the benchmark)."""

    model_dir: str
    """A model folder (config.json + model.safetensors) or a finished train run directory."""
    tokenizer: str = ""
    """tokenizer.json or tokenizer artifact folder (default: beside the model or via its manifests)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    dtype: str = "auto"
    """auto (bf16 on cuda, as stored on cpu), fp32, bf16 or fp16."""
    engine: dict[str, Any] = field(default_factory=dict)
    """EngineConfig fields to override, e.g. {"num_blocks": 512} (``--engine num_blocks=512``)."""
    warmup: str = "auto"
    """Run throwaway requests through the engine at load (``LLMEngine.warmup``) so the first user
    request does not pay kernel compilation: 'on', 'off', or 'auto' (on for CUDA)."""
    fuse_projections: bool = True
    """Stack each layer's q/k/v and gate/up weights into one matrix each (``kiln.model.fuse_projections``):
    4 matrix products a layer instead of 7, the same outputs; ``--no-fuse-projections`` keeps them apart."""


@dataclass
class Loaded:
    """A model ready to serve."""

    engine: Any
    tokenizer: Any
    model: Any
    """The model (None when the engine runs in another process)."""
    name: str
    device: str
    context_length: int = 0
    vocab_size: int = 0


def load(spec: ModelSpec) -> Loaded:
    """Load the model, its tokenizer and an ``LLMEngine`` over them."""
    import torch

    from kiln.eval.stage import pick_device
    from kiln.generate import EngineConfig, LLMEngine
    from kiln.model import fuse_projections, load_pretrained
    from kiln.tokenizer import load_tokenizer

    model_dir = Path(spec.model_dir)
    if not (model_dir / "config.json").is_file() and (model_dir / "model" / "config.json").is_file():
        model_dir = model_dir / "model"  # a finished train run directory
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{spec.model_dir} has neither config.json nor model/config.json; pass a model "
                                "folder written by save_pretrained or a finished train run directory")
    if spec.tokenizer and not Path(spec.tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer {spec.tokenizer} does not exist; pass a tokenizer file or folder")
    device = pick_device(spec.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if spec.dtype not in (*dtypes, "auto"):
        raise ValueError(f"--dtype {spec.dtype!r}: choose auto, fp32, bf16 or fp16")
    dtype = dtypes.get(spec.dtype)
    if spec.dtype == "auto" and torch.device(device).type == "cuda":
        dtype = torch.bfloat16
    tokenizer = load_tokenizer(spec.tokenizer or model_dir)  # Kiln's format or Hugging Face's
    model = load_pretrained(model_dir, device=device, dtype=dtype).eval()
    if spec.fuse_projections:  # inference only: the engine never trains this model
        fuse_projections(model)
    engine = LLMEngine(model, tokenizer=tokenizer, config=engine_config(EngineConfig, spec.engine))
    if spec.warmup not in ("auto", "on", "off"):
        raise ValueError(f"--warmup {spec.warmup!r}: choose auto, on or off")
    if spec.warmup == "on" or (spec.warmup == "auto" and torch.device(device).type == "cuda"):
        log.info("engine warm-up: %.1f s", engine.warmup())
    name = Path(spec.model_dir).resolve().name
    return Loaded(engine, tokenizer, model, name, device, model.config.context_length, model.config.vocab_size)


def start_engine_process(spec: ModelSpec) -> Loaded:
    """The engine in a child process (``EngineClient``: it loads ``spec`` there); this process loads
    only the tokenizer. ``Loaded.engine`` is the client, ``Loaded.model`` None."""
    from kiln.serve.engine_process import EngineClient
    from kiln.tokenizer import load_tokenizer

    if spec.tokenizer and not Path(spec.tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer {spec.tokenizer} does not exist; pass a tokenizer file or folder")
    client = EngineClient(spec, load)
    model_dir = Path(spec.model_dir)
    if not (model_dir / "config.json").is_file() and (model_dir / "model" / "config.json").is_file():
        model_dir = model_dir / "model"
    info = client.info
    return Loaded(client, load_tokenizer(spec.tokenizer or model_dir), None, info["name"], info["device"],
                  info["context_length"], info["vocab_size"])


def engine_config(cls: type, overrides: dict[str, Any]) -> Any:
    """``cls(**overrides)`` with each value cast to its field's type; unknown names are refused."""
    if not dataclasses.is_dataclass(cls):
        return cls(**overrides)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in overrides.items():
        if k not in known:
            raise ValueError(f"--engine {k}=...: EngineConfig has no field {k!r}; it has {', '.join(sorted(known))}")
        default = getattr(cls(), k)
        if isinstance(v, str) and not isinstance(default, str):
            v = _parse_value(v, default, k)
        kwargs[k] = v
    return cls(**kwargs)


def _parse_value(text: str, default: Any, name: str) -> Any:
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--engine {name}={text}: give true or false")
    if text.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["num_blocks=512", ...]`` -> ``{"num_blocks": "512"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine {item!r}: write NAME=VALUE, e.g. --engine num_blocks=512")
        out[key.strip()] = value.strip()
    return out


def make_state(loaded: Loaded, cfg: ServeConfig) -> Any:
    """The server's state over a loaded model (the engine thread is started by the app)."""
    from kiln.serve.app import ServerState
    from kiln.serve.worker import EngineWorker

    worker = EngineWorker(loaded.engine, max_pending=cfg.max_pending, request_timeout_s=cfg.request_timeout_s,
                          max_model_len=loaded.context_length)
    v = loaded.vocab_size
    vocab = min(v, getattr(loaded.tokenizer, "vocab_size", v) or v)
    return ServerState(worker, loaded.tokenizer, cfg, cfg.model_name or loaded.name, loaded.context_length, vocab)


def serve(state: Any, cfg: ServeConfig, log_level: str = "info") -> None:
    """Run uvicorn until SIGINT/SIGTERM; in-flight requests get ``cfg.shutdown_grace_s`` to finish."""
    import uvicorn

    from kiln.serve.app import build_app

    app = build_app(state)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level,
                            timeout_graceful_shutdown=cfg.shutdown_grace_s, access_log=False,
                            limit_concurrency=cfg.max_pending * 4 + 64)
    uvicorn.Server(config).run()
