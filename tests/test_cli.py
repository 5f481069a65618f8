import subprocess
import sys

import pytest

from codetune.cli import COMMANDS, build_parser, main


def test_help_lists_every_command():
    text = build_parser().format_help()
    for name in COMMANDS:
        assert name in text


@pytest.mark.parametrize("command", ["train", "prepare", "eval"])
def test_subcommand_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(default:" in out and "--config" in out


def test_config_error_exits_2_with_message(capsys):
    assert main(["train", "--rank", "0"]) == 2
    assert "rank=0" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "codetune", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "codetune" in r.stdout
