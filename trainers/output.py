"""Where a whole-model trainer's result lands: a folder written under a temporary name, then renamed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def finish_folder(tmp: Path, path: Path, name: str, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``tmp/name`` (JSON) and move the finished ``tmp`` folder to ``path`` atomically
    (an empty ``path`` folder, which the runner allows, is replaced)."""
    (tmp / name).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    if path.is_dir():
        path.rmdir()
    os.replace(tmp, path)
    return path
