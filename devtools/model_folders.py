"""Writing model folders safely: staged writes swapped in whole, and the serving defaults file."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from flux_triton.model_info import SERVING_DEFAULTS_FILE


@contextlib.contextmanager
def staged_model_dir(out_dir: str | Path) -> Iterator[Path]:
    """A fresh folder beside `out_dir` to write a model into; swapped in for `out_dir` when the
    block ends without error, so an interrupted build never leaves a half-written model."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)
    retired = staging.with_name(staging.name + ".old")
    try:
        yield staging
        if out_dir.exists():
            out_dir.rename(retired)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)


def write_serving_defaults(model_dir: Path, defaults: dict) -> None:
    """The request defaults the server reads from the model folder (`flux_serving.json`)."""
    (model_dir / SERVING_DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")
