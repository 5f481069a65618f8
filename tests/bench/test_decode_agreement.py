"""bench/decode_agreement.py: FIM items of two decode modes matched by content, not order; differing
predictions, flipped exact matches and paired changes counted; a folder without items is one line, exit 2."""

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "decode_agreement.py"


def _write(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "fim.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _row(i: int, kind: str, prediction: str, exact: bool, sim: float) -> dict:
    return {"kind": kind, "prefix": f"def f{i}():\n", "middle": f"    return {i}", "suffix": "\n", "source": f"m{i % 3}.py",
            "prediction": prediction, "exact": exact, "edit_similarity": sim}


@pytest.fixture
def main():
    return runpy.run_path(str(SCRIPT), run_name="decode_agreement")["main"]


def test_items_are_matched_by_content_and_differences_counted(tmp_path, main, capsys):
    ref = [_row(i, "single_line", f"    return {i}", True, 1.0) for i in range(10)]
    ref += [_row(i, "multi_line", "x", False, 0.2) for i in range(10, 16)]
    other = [dict(r) for r in reversed(ref)]  # another order
    other[0] = {**other[0], "prediction": "y", "edit_similarity": 0.3}  # multi-line 15: differs, still not exact
    k = next(i for i, r in enumerate(other) if r["kind"] == "single_line" and r["middle"].endswith(" 4"))
    other[k] = {**other[k], "prediction": "    return 5", "exact": False, "edit_similarity": 0.9}
    other.append(_row(99, "single_line", "z", False, 0.0))  # only in one run
    assert main([str(_write(tmp_path / "a", ref)), str(_write(tmp_path / "b", other))]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unmatched"] == 1 and out["same_scores"] is False
    s, m = out["kinds"]["single_line"], out["kinds"]["multi_line"]
    assert s["items"] == 10 and s["exact_eager"] == 1.0 and s["exact_batched"] == 0.9
    assert s["predictions_differing"] == 1 and s["exact_only_eager"] == 1 and s["exact_only_batched"] == 0
    assert s["exact_change"]["estimate"] == -0.1 and s["exact_change"]["low"] < 0 < s["exact_change"]["high"]
    assert m["items"] == 6 and m["predictions_differing"] == 1 and m["exact_only_eager"] == m["exact_only_batched"] == 0
    assert m["edit_similarity_change"]["estimate"] == pytest.approx(0.1 / 6, abs=1e-4)
    assert out["no_significant_change"] is True


def test_identical_runs_have_the_same_scores(tmp_path, main, capsys):
    rows = [_row(i, "single_line", "p", i % 2 == 0, 0.5) for i in range(8)]
    assert main([str(_write(tmp_path / "a", rows)), str(_write(tmp_path / "b", rows)), "--label-other", "graph"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["same_scores"] is True and out["kinds"]["single_line"]["exact_graph"] == 0.5


def test_a_folder_without_items_or_without_shared_items_is_one_line(tmp_path, main, capsys):
    (tmp_path / "empty").mkdir()
    a = _write(tmp_path / "a", [_row(1, "single_line", "p", True, 1.0)])
    assert main([str(a), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "fim.jsonl not found" in err and err.count("\n") == 1
    b = _write(tmp_path / "b", [_row(2, "single_line", "p", True, 1.0)])
    assert main([str(a), str(b)]) == 2
    assert "share no FIM item" in capsys.readouterr().err
