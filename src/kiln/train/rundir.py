"""A training run's directory: ``RunDir``, a ``kiln.artifacts.StageRun`` that works in place.

A run lasts hours and must survive being killed, so unlike other stages it cannot build its
directory under a temporary name and rename it at the end. It keeps the same contract by other
means: every checkpoint and the model folder are written under a temporary name and renamed; the
manifest is removed when a run (re)starts and written last, so a directory with ``manifest.json``
holds a finished run, and one with the same stage, config and input hashes is reused, not retrained.

Layout::

    train.log  metrics.jsonl  tb/  checkpoints/step_XXXXXX/  model/  loss.png  manifest.json (last)

Use (every rank enters; rank 0 writes)::

    with RunDir(out, "sft", cfg, inputs=[base_model, data], resume=True, dist=dist) as run:
        if run.reused:
            return run.path
        start = run.begin(state)       # restore the newest checkpoint into state, or clear; opens run.log
        if fit(cfg, state, batches, loss_fn, run, ...):   # False: paused, resume later
            run.export_model(state.model, tokenizer=tok_path)
            run.finish({"val_loss": ...})                  # loss.png, then manifest.json
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from kiln.artifacts import MANIFEST, StageRun
from kiln.distributed import SingleProcess
from kiln.train.metrics import RunLog, plot_loss, read_metrics
from kiln.train.state import TrainState, list_checkpoints, restore_state


class RunDir(StageRun):
    """The directory of one training run (see the module docstring).

    Args:
        out_dir: the run directory (created; resumed from when it holds checkpoints).
        stage: stage name in the manifest ("train", "sft", "dpo"...).
        config: the stage's config dataclass, recorded in full; with ``inputs`` it decides reuse.
        inputs: files or artifact directories the run reads (content-hashed).
        resume: False starts over (old checkpoints and logs are deleted) and never reuses.
        dist: a ``kiln.distributed.RuntimeProtocol`` (default ``SingleProcess()``).
    """

    def __init__(self, out_dir: str | os.PathLike, stage: str, config: Any,
                 inputs: Iterable[str | os.PathLike] = (), resume: bool = True, dist: Any = None) -> None:
        super().__init__(out_dir, stage, config, inputs, force=not resume)
        self.dist = dist or SingleProcess()
        self.resume = resume
        self.path = self.out_dir
        self.checkpoints = self.out_dir / "checkpoints"
        self.log: RunLog = RunLog(self.out_dir, enabled=False)  # a real log once begin() ran

    def __enter__(self) -> RunDir:
        self.dist.barrier()  # every rank has decided on reuse before rank 0 removes the old manifest
        if self.reused:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            (self.out_dir / MANIFEST).unlink(missing_ok=True)  # incomplete until the manifest is back
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.log.close()
        return False

    def begin(self, state: TrainState) -> int:
        """Restore the newest checkpoint into ``state`` (when resuming) or clear a previous run's
        files; open ``self.log``. Returns the step the run starts at."""
        latest = list_checkpoints(self.checkpoints)[-1:] if self.resume else []
        self.dist.barrier()  # every rank has listed the checkpoints before rank 0 may clear them
        if latest:
            restore_state(latest[0], state, self.dist)
        elif self.dist.is_main:
            self.clear()
        self.dist.barrier()
        self.log = RunLog(self.out_dir, resume_step=state.step, enabled=self.dist.is_main)
        return state.step

    def clear(self) -> None:
        """Remove a previous run's outputs (only the names a run writes) before a fresh start."""
        for name in ("checkpoints", "tb", "model"):
            shutil.rmtree(self.out_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "train.log", "loss.png"):
            (self.out_dir / name).unlink(missing_ok=True)

    def export_model(self, model: torch.nn.Module, tokenizer: str | os.PathLike | None = None) -> Path:
        """Write ``model/`` (``save_pretrained``, plus the tokenizer files when given: Hugging Face's
        ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and Kiln's
        ``kiln_tokenizer.json``) atomically (rank 0). With its tokenizer, the model folder is all
        `kiln generate` and Hugging Face's Auto* classes need."""
        from kiln.model import save_pretrained
        from kiln.tokenizer import load_tokenizer

        final = self.out_dir / "model"
        if not self.dist.is_main:
            return final
        tmp = self.out_dir / f".model.tmp-{uuid.uuid4().hex[:8]}"
        save_pretrained(model, tmp, tokenizer=load_tokenizer(tokenizer) if tokenizer is not None else None)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def finish(self, stats: dict[str, Any], seconds: float | None = None) -> dict[str, Any] | None:
        """Plot ``loss.png`` from ``metrics.jsonl``, then write the manifest with ``stats`` (rank 0):
        the run is complete. ``seconds``: the manifest's duration (default: this process's)."""
        if not self.dist.is_main:
            return None
        plot_loss(read_metrics(self.out_dir / "metrics.jsonl"), self.out_dir / "loss.png")
        self.stats.update(stats)
        manifest = self.write_manifest(self.out_dir, seconds)  # last: the run is complete
        self.log.info(f"done: {json.dumps(self.stats)}")
        return manifest
