"""Wall time of every DVC stage and of the whole pipeline:
``python benchmarks/pipeline_time.py [--json PATH] [dvc repro args]``.

Runs ``dvc repro`` in the current directory (pass ``--force`` to time a full rebuild, or stage names as targets),
timestamps each ``Running stage '<name>'`` line DVC prints, and reports each stage's wall time (from its start to the
next stage's start, so DVC's own bookkeeping is included) and the total. Writes ``benchmarks/pipeline_time.json``
beside it (``--json``: that file instead); every other argument goes to ``dvc repro``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

STAGE = re.compile(r"Running stage '([^']+)'")


def main(arguments: list[str]) -> int:
    """Run ``dvc repro`` with ``arguments`` (less ``--json PATH``), print the stage table, write the JSON; DVC's exit
    status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False, add_help=False)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    options, arguments = parser.parse_known_args(arguments)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    venv_bin = Path(sys.executable).parent
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    start = time.perf_counter()
    process = subprocess.Popen([str(venv_bin / "dvc"), "repro", *arguments], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    marks: list[tuple[str, float]] = []
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        match = STAGE.search(line)
        if match:
            marks.append((match.group(1), time.perf_counter() - start))
    code = process.wait()
    total = time.perf_counter() - start
    rows = [(name, (marks[i + 1][1] if i + 1 < len(marks) else total) - began) for i, (name, began) in enumerate(marks)]
    print(f"\n{'stage':<36} {'seconds':>8}")
    for name, seconds in rows:
        print(f"{name:<36} {seconds:8.1f}")
    print(f"{'total (dvc repro, wall)':<36} {total:8.1f}   exit {code}")
    out = options.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"stages": dict(rows), "total_seconds": total, "exit_code": code}, indent=2))
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
