import argparse
import errno
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from codetune.cli import COMMANDS, build_parser, explain, main, parse, subparser
from codetune.cli_flags import UsageError, from_args

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


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


def test_every_flag_of_every_command_shows_its_default():
    parser = build_parser()
    for name in COMMANDS:
        for action in subparser(parser, name)._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            assert action.help and ("default:" in action.help or "(required)" in action.help), \
                f"codetune {name} {action.option_strings[0]}: {action.help!r}"
    serve = subparser(parser, "serve").format_help()
    assert "(default: 8000)" in serve and "(default: 127.0.0.1)" in serve  # a stage module's own (CLI_FLAGS)
    assert "(default: 128)" in subparser(parser, "generate").format_help()


def test_help_lists_only_what_the_command_reads():
    parser = build_parser()
    train, prepare = subparser(parser, "train").format_help(), subparser(parser, "prepare").format_help()
    for prepare_only in ("--fim-rate", "--sources", "--languages", "--dedup-threshold"):
        assert prepare_only not in train
    for not_read in ("--attn", "--weights-max-vram", "--lr", "--rank"):
        assert not_read not in prepare
    assert "--seq-len" in train and "--data-dir" in train and "--fim-rate" in prepare


def test_a_flag_the_command_does_not_read_is_an_error(capsys):
    assert main(["train", "--fim-rate", "0.9", "--sources", "/nonexistent"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--fim-rate is not a setting of `codetune train`" in line and "prepare" in line


def test_no_prefix_abbreviations_and_a_suggestion(capsys):
    assert main(["train", "--step", "10"]) == 2
    assert one_line(capsys.readouterr().err) == "codetune train: unknown flag --step; did you mean --steps?"
    assert main(["train", "--lrr=1e-3"]) == 2
    assert "did you mean --lr?" in one_line(capsys.readouterr().err)
    assert main(["trian"]) == 2
    assert "did you mean train?" in one_line(capsys.readouterr().err)
    assert main(["train", "--steps"]) == 2  # argparse's own errors are one line too
    assert "--steps: expected one argument" in one_line(capsys.readouterr().err)


def test_prepare_takes_positional_sources(tmp_path):
    parser = build_parser()
    ns = parse(parser, ["prepare", "a", "--seq-len", "512", "b", "--sources", "c"])
    cfgs = from_args("prepare", ns)
    assert sorted(cfgs["data"].sources) == ["a", "b", "c"] and cfgs["data"].seq_len == 512
    with pytest.raises(UsageError, match="unexpected argument 'x'"):
        parse(parser, ["train", "x"])


def test_print_config_shows_the_resolved_settings_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", TINY, "--steps", "1e2", "--out-dir", str(out), "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert list(cfg) == ["model", "adapter", "data", "train"]
    assert cfg["train"]["steps"] == 100 and cfg["train"]["lr"] == 3e-3 and cfg["data"]["seq_len"] == 256
    assert "sources" not in cfg["data"] and not out.exists()


def test_config_error_exits_2_with_message(capsys):
    assert main(["train", "--rank", "0"]) == 2
    assert "rank=0" in one_line(capsys.readouterr().err)
    assert main(["train", "--log-every", "0"]) == 2
    assert one_line(capsys.readouterr().err) == "codetune train: log_every=0: must be at least 1"


def test_train_before_prepare_names_the_fix(tmp_path, capsys):
    data = tmp_path / "nothing"
    assert main(["train", "--data-dir", str(data), "--out-dir", str(tmp_path / "r"), "--random-init"]) == 2
    line = one_line(capsys.readouterr().err.replace("PYTORCH_CUDA_ALLOC_CONF", "\n").splitlines()[-1])
    assert f"no prepared data in {data}: run `codetune prepare --sources" in line and "--data-dir" in line


@pytest.mark.parametrize("exc,expect", [
    (PermissionError(errno.EACCES, "Permission denied", "/x/run"), "permission denied: /x/run; choose a folder"),
    (OSError(errno.ENOSPC, "No space left on device", "/x/run/a.bin"),
     "cannot write /x/run/a.bin: No space left on device (ENOSPC); free space on that disk or write to another"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/run"),
     "cannot write /ro/run: Read-only file system (EROFS); that file system is mounted read-only: write to another"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/in.jsonl"), "no such file or directory: /x/in"),
    (FileExistsError(errno.EEXIST, "File exists", "/x/notes.txt"), "/x/notes.txt (or a folder above it) is a file"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/notes.txt/e"), "/x/notes.txt/e (or a folder above"),
])
def test_os_errors_name_the_path_and_the_fix(exc, expect, monkeypatch, capsys):
    def boom(cfgs, ns):
        raise exc

    monkeypatch.setattr("codetune.plan.planner.run", boom)
    assert main(["plan"]) == 2
    assert expect in one_line(capsys.readouterr().err)


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def boom(cfgs, ns):
        raise RuntimeError("kaboom")

    monkeypatch.setattr("codetune.plan.planner.run", boom)
    assert main(["plan"]) == 1
    assert one_line(capsys.readouterr().err) == \
        "codetune plan: internal error: RuntimeError: kaboom (run with --debug for the traceback)"
    for argv in (["--debug", "plan"], ["plan", "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "kaboom" in err
    assert explain(RuntimeError("x")) is None and explain(OSError(errno.EIO, "I/O error")) is None


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "codetune", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "codetune" in r.stdout


def test_an_eval_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    # (was "internal error: FileExistsError", exit 1)
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    assert main(["eval", "--eval-dir", str(f), "--suites", "humaneval"]) == 2
    assert "is a file, not a folder" in one_line(capsys.readouterr().err)
    assert f.read_text() == "keep me"
