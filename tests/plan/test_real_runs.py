"""The planner against measured `codetune train` runs (bench/real_train.py records): its prediction, made
now by bench/real_train.predict — the same call the benchmark makes — is within 5% of each run's measured
peak reserved memory, for the training steps and for validation.

RECORDS lists the records measured with the engine as it is; when a change moves memory, measure again
(bench/suites/verify.txt, or `bench/real_train.py --set planner` for the 12-configuration set) and point
RECORDS at the new file."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ["bench/results/train_h200_2026-12-01_s6-headline.json", "bench/results/train_h200_2026-12-01_s6-planner.json",
           "bench/results/train_h200_2026-12-01_s7-checks.json"]
TOLERANCE = 0.05


def _runs():
    for name in RECORDS:
        for r in json.loads((ROOT / name).read_text())["results"]:
            if r.get("path", "").startswith("codetune train") and "error" not in r:
                yield pytest.param(r, id=f"{Path(name).stem}-{r['config']}-{r['seq']}")


@pytest.mark.parametrize("run", list(_runs()))
def test_planner_predicts_the_measured_run(run):
    sys.path.insert(0, str(ROOT / "bench"))
    from real_train import predict

    got = predict(run["overrides"], run["seq"])
    train, val = run["train_peak_reserved_gib"], run["val_peak_reserved_gib"]
    assert abs(got["planned_reserved_gib"] - train) / train <= TOLERANCE, (got, train)
    assert abs(got["planned_val_reserved_gib"] - val) / val <= TOLERANCE, (got, val)


def test_the_records_cover_the_preset_at_every_length_and_twelve_configurations():
    runs = [p.values[0] for p in _runs()]
    assert {r["seq"] for r in runs if r["config"] == "preset"} >= {2048, 4096, 8192, 16384}
    assert len({(r["config"], r["seq"]) for r in runs}) >= 12
