"""What every ``kiln bench`` table shares: the device it runs on, and how its table is reported."""

from __future__ import annotations

import datetime as dt
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any


def pick_device(name: str) -> Any:
    """``--device``: "auto" (CUDA when present, else the CPU) or any name ``torch.device`` takes
    (``kiln.distributed.pick_device``)."""
    from kiln.distributed import pick_device as pick

    return pick(name)


def report(bench: str, device: Any, blurb: str, table: str, rows: list, out: str | None) -> str:
    """Print ``# kiln bench <bench> (date, hardware, torch)``, ``blurb`` and the markdown ``table``;
    with ``out``, also write ``bench_<bench>.md`` and ``bench_<bench>.json`` (the dataclass rows)
    there, each atomically. Returns the printed text."""
    import torch

    from kiln.artifacts import write_json_atomic, write_text_atomic

    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    text = f"# kiln bench {bench} ({dt.date.today()}, {hw}, torch {torch.__version__})\n\n{blurb}\n\n{table}"
    print(text)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / f"bench_{bench}.md", text + "\n")
        write_json_atomic(folder / f"bench_{bench}.json", [asdict(r) for r in rows])
    return text
