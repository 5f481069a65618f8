"""bench/run_gpu.sh's suite time (SUITE_SECONDS): each job runs under what is left of it, a job past it is
recorded as skipped rather than run, and the jobs see $OUT (a device call with little time left still
brings back its first lines' numbers)."""

import json
import os
import subprocess
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "run_gpu.sh"


def test_the_suite_time_bounds_every_job_and_skips_the_rest(tmp_path):
    suite = tmp_path / "suite.txt"
    suite.write_text("# a comment\n"
                     "sh echo '{\"first\": 1}'; echo seen > $OUT/first.txt\n"
                     "sh sleep 60; echo '{\"late\": 1}'\n"
                     "sh echo '{\"never\": 1}'\n")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), SUITE_SECONDS="12", SUITE_MIN_SECONDS="2", CODETUNE_COMMIT="abc1234")
    t = time.monotonic()
    subprocess.run(["bash", str(SCRIPT), str(suite)], cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert time.monotonic() - t < 40  # (the sleeping job was stopped at the suite's time, not after 60 s)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    results = [r["result"] for r in records]
    assert results[0] == {"first": 1} and (out / "first.txt").read_text() == "seen\n"
    assert results[1] == {"error": "no result, see log"}  # killed when the suite's time ran out
    assert "skipped" in results[2] and "SUITE_SECONDS=12" in results[2]["skipped"]
    assert len(results) == 3
    assert records[0]["job"] == "sh echo '{\"first\": 1}'; echo seen > $OUT/first.txt"  # (quotes kept: valid JSON)
