"""Run one tool job in this process and write its result, with the process's peak memory.

Usage: python tools/bench/worker.py JOB.json RESULT.json
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import current_rss_mib, error_text, peak_rss_mib, write_json  # noqa: E402


def main(job_path: str, result_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    start = time.perf_counter()
    try:
        from bench.peers import RUNNERS

        result = RUNNERS[job["tool"]](job)
    except Exception as exc:  # noqa: BLE001 - a tool that fails as a whole fails every target
        traceback.print_exc()
        result = {"error": error_text(exc), "targets": {}}
    result.update(wall_s=time.perf_counter() - start, peak_rss_mib=peak_rss_mib(), end_rss_mib=current_rss_mib())
    write_json(Path(result_path), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
