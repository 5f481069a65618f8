"""README's first screen promises two commands; CI must run exactly the test one."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _blocks():
    text = REPO.joinpath("README.md").read_text()
    first_screen = text.split("\n---\n")[0]
    return re.findall(r"```bash\n(.*?)\n```", first_screen, flags=re.S)


def test_first_screen_has_exactly_two_commands():
    blocks = _blocks()
    assert len(blocks) == 2 and all("\n" not in b for b in blocks)
    assert blocks[0].endswith("codetune demo")


def test_ci_runs_the_readme_test_command():
    ci = REPO.joinpath(".ci", "run").read_text()
    test_line = next(ln for ln in ci.splitlines() if ln.endswith("# TEST"))
    assert test_line.removesuffix("# TEST").strip() == _blocks()[1]
