"""The inference-overhead bench runs end to end on the tiny base (its numbers there mean nothing; the
point is that the SD-1.5-sized run in the README keeps working). ``--malloc default``: the steady
allocator would change glibc's settings for the rest of this test process."""

from __future__ import annotations

import json
from pathlib import Path

from bench import inference_overhead


def test_inference_overhead_bench_runs_on_tiny(tmp_path: Path) -> None:
    out = tmp_path / "io.json"
    rc = inference_overhead.main(["--base", "tiny", "--repeats", "1", "--steps", "1", "2",
                                  "--only", "TI", "LoRA fused", "--malloc", "default", "--json", str(out)])
    assert rc == 0
    rows = {r["contender"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain", "TI", "LoRA fused"}
    assert rows["plain"]["cpu × plain"] == 1.0
    assert all(r["cpu ms/step"] > 0 for r in rows.values())
