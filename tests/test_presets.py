"""The chat preset's header commands, as written, run end to end (short): pairs from the standard library,
prepare with the mix, train, generate --chat. (The 3B preset needs a GPU: bench/suites/verify.txt runs it.)"""

import shlex
import sysconfig
from pathlib import Path

from codetune.cli import main
from codetune.data.stdlib_pairs import main as pairs_main

ROOT = Path(__file__).resolve().parents[1]


def _header_commands(preset: Path) -> list[list[str]]:
    """The header's commands in the order to run them: the `first:` lines, the command on line 1, the
    `then:` lines."""
    lines = preset.read_text().splitlines()
    first, then = [], []
    for line in lines[1:]:
        if not line.startswith("# "):
            break
        kind, _, cmd = line[2:].partition(":")
        if kind in ("first", "then"):
            (first if kind == "first" else then).append(shlex.split(cmd))
    return [*first, shlex.split(lines[0][2:]), *then]


def test_tiny_chat_preset_runs_as_its_header_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the preset's runs/ folders land here
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny-chat.yaml").write_text((ROOT / "configs" / "tiny-chat.yaml").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    cmds = _header_commands(ROOT / "configs" / "tiny-chat.yaml")
    assert [c[:2] for c in cmds] == [["python", "-m"], ["codetune", "prepare"], ["codetune", "train"],
                                     ["codetune", "generate"]]  # (in the order the header says to run them)
    pairs = cmds[0][3:]
    assert pairs_main([*pairs, "--limit", "60"]) == 0
    prepare = [str(stdlib / "json") if w == "/usr/lib/python3.11/json" else w for w in cmds[1][1:]]
    assert main([*prepare, "--workers", "1"]) == 0
    assert main([*cmds[2][1:], "--steps", "4", "--eval-every", "2", "--save-every", "0", "--no-progress",
                 "--no-tensorboard"]) == 0
    assert main([*cmds[3][1:], "--max-new-tokens", "4", "--device", "cpu"]) == 0
