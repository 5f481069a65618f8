"""codetune merge refuses, in one line and before loading any weights where it can, what would otherwise
fail late or unclearly: missing or truncated adapter files, ranks that disagree, a base other than the
one the adapter trained on, an --out it must not replace, and a disk it cannot write."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_adapter import tiny_tokenizer

from codetune.cli import main
from codetune.config import ConfigError, ModelConfig
from codetune.export.merge import merge_adapter
from codetune.export.preflight import rank_mismatches, read_header
from codetune.model.load import model_source, read_run_info

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if merge gets as far as loading the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("merge loaded the model before refusing")
    monkeypatch.setattr("codetune.model.load.load_tuned", refuse)


@pytest.fixture
def adapter_copy(lora_adapter, tmp_path):
    return Path(shutil.copytree(lora_adapter, tmp_path / "adapter"))


def cli_error(capsys, *args) -> str:
    """Run `codetune merge`; it must exit 2 with one line and no traceback. Returns the line."""
    assert main(["merge", *args, "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def base_dir(lora_adapter) -> Path:
    info = read_run_info(lora_adapter)
    return Path(model_source(ModelConfig(**info["model"]), info["vocab_size"], info["init_seed"]).path)


def config_only_base(lora_adapter, where: Path, **changes) -> Path:
    """A base folder with just a config.json: enough for the shape check, which must not need weights."""
    cfg = json.loads((base_dir(lora_adapter) / "config.json").read_text())
    where.mkdir()
    (where / "config.json").write_text(json.dumps(dict(cfg, **changes)))
    return where


def test_missing_adapter_folder(tmp_path, capsys, no_load):
    assert "no such folder" in cli_error(capsys, "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "m"))


def test_missing_weights_named(adapter_copy, tmp_path, capsys, no_load):
    (adapter_copy / "adapter_model.safetensors").unlink()
    line = cli_error(capsys, "--adapter", str(adapter_copy), "--out", str(tmp_path / "m"))
    assert "no adapter_model.safetensors" in line and "Repo id" not in line
    assert not (tmp_path / "m").exists()


def test_truncated_or_foreign_weights_named(adapter_copy, tmp_path, capsys, no_load):
    weights = adapter_copy / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    assert "(truncated)" in cli_error(capsys, "--adapter", str(adapter_copy), "--out", str(tmp_path / "m"))
    for junk in (b"\x01\x02", b"\xff" * 64, (20).to_bytes(8, "little") + b"not json at all!!!!!"):
        weights.write_bytes(junk)
        with pytest.raises(ConfigError, match="not a complete safetensors file"):
            read_header(weights)


def test_rank_mismatch_named(adapter_copy, tmp_path, capsys, no_load):
    cfg_path = adapter_copy / "adapter_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), r=8)))
    line = cli_error(capsys, "--adapter", str(adapter_copy), "--out", str(tmp_path / "m"))
    assert "config rank 8, weights rank 4" in line and "size mismatch" not in line


def test_rank_pattern_read_as_peft_writes_it(lora_adapter, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from codetune.model.load import load_model

    info = read_run_info(lora_adapter)
    model, _ = load_model(ModelConfig(**info["model"]), torch.device("cpu"), vocab_size=info["vocab_size"])
    lora = LoraConfig(r=4, rank_pattern={"q_proj": 8}, target_modules=["q_proj", "k_proj"])
    get_peft_model(model, lora).save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    shapes = read_header(tmp_path / "adapter_model.safetensors")
    assert any(s[0] == 8 for s in shapes.values()) and any(s[0] == 4 for s in shapes.values())
    assert rank_mismatches(cfg, shapes) == []
    wrong = rank_mismatches(dict(cfg, rank_pattern={}), shapes)
    assert wrong and all("q_proj: config rank 4, weights rank 8" in w for w in wrong)


def test_out_that_is_a_file_is_left_alone(lora_adapter, tmp_path, capsys, no_load):
    (tmp_path / "m").write_text("mine")
    assert "is a file" in cli_error(capsys, "--adapter", str(lora_adapter), "--out", str(tmp_path / "m"))
    line = cli_error(capsys, "--adapter", str(lora_adapter), "--out", str(tmp_path / "m" / "sub"))
    assert f"{tmp_path / 'm'} is a file, not a folder" in line
    assert (tmp_path / "m").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_base_shape_mismatch_named(lora_adapter, tmp_path, capsys, no_load):
    other = config_only_base(lora_adapter, tmp_path / "base", num_hidden_layers=3)
    line = cli_error(capsys, "--adapter", str(lora_adapter), "--out", str(tmp_path / "m"), "--model", str(other))
    assert "tiny-stablelm (num_layers 2)" in line and f"--model {other} (num_layers 3)" in line
    assert "--ignore-base-mismatch" in line


def test_adapter_without_base_record_checks_its_vocabulary(adapter_copy, tmp_path, capsys, no_load):
    """Adapters saved before "base" was recorded still have vocab_size and their tokenizer."""
    info_path = adapter_copy / "codetune.json"
    info = json.loads(info_path.read_text())
    del info["base"]
    info_path.write_text(json.dumps(info))
    other = config_only_base(adapter_copy, tmp_path / "base", vocab_size=info["vocab_size"] + 64)
    line = cli_error(capsys, "--adapter", str(adapter_copy), "--out", str(tmp_path / "m"), "--model", str(other))
    assert f"vocab_size {info['vocab_size']})" in line and f"vocab_size {info['vocab_size'] + 64})" in line


def test_base_tokenizer_mismatch(lora_adapter, tmp_path):
    from transformers import AutoTokenizer

    base = Path(shutil.copytree(base_dir(lora_adapter), tmp_path / "base"))
    other_tok = tiny_tokenizer()
    other_tok.add_tokens(["<not_in_training>"])
    other_tok.save_pretrained(str(base))
    cfg = ModelConfig(model=str(base), precision="fp32")
    with pytest.raises(ConfigError, match=r"tokenizer [0-9a-f]{16}\) but the base is --model"):
        merge_adapter(lora_adapter, tmp_path / "m", model_cfg=cfg)
    assert merge_adapter(lora_adapter, tmp_path / "m", model_cfg=cfg, ignore_base_mismatch=True).is_dir()
    AutoTokenizer.from_pretrained(str(lora_adapter)).save_pretrained(str(base))  # the same tokenizer: accepted
    assert merge_adapter(lora_adapter, tmp_path / "m2", model_cfg=cfg).is_dir()


def test_disk_full_while_writing_leaves_nothing(lora_adapter, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def disk_fills_up(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 4096)  # what a write cut off by a full disk leaves
        # safetensors' own error for ENOSPC, word for word (seen on a 64 KiB tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", disk_fills_up)
    with pytest.raises(ConfigError, match=r"No space left on device \(ENOSPC\); free space") as e:
        merge_adapter(lora_adapter, tmp_path / "m")
    assert f"cannot write {tmp_path / 'm'}" in str(e.value) and "--out" in str(e.value)
    assert list(tmp_path.iterdir()) == [], "temp folder or partial model left behind"


RUNNER = """import sys
from codetune.cli import main
for out in sys.argv[2:]:
    print(out, main(["merge", "--adapter", sys.argv[1], "--out", out, "--device", "cpu"]), flush=True)
"""


def test_real_read_only_and_small_disks(lora_adapter, tmp_path):
    """On real file systems (tmpfs in a private mount namespace): a read-only one is refused before the
    model loads, one too small before writing; neither is left holding anything."""
    if not shutil.which("unshare"):
        pytest.skip("needs util-linux unshare for private mounts")
    (tmp_path / "ro").mkdir()
    (tmp_path / "small").mkdir()
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", str(tmp_path / "ro")],
                           capture_output=True)
    if probe.returncode:
        pytest.skip(f"private mounts unavailable here: {probe.stderr.decode().strip()}")
    script = (f"mount -t tmpfs -o ro tmpfs {tmp_path / 'ro'} && mount -t tmpfs -o size=4m tmpfs {tmp_path / 'small'}"
              f" && {sys.executable} -c '{RUNNER}' {lora_adapter} {tmp_path / 'ro' / 'm'} {tmp_path / 'small' / 'm'}"
              f" && ls -A {tmp_path / 'ro'} {tmp_path / 'small'}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path / 'ro' / 'm'} 2\n{tmp_path / 'small' / 'm'} 2\n" in r.stdout
    assert r.stdout.rstrip().endswith(f"{tmp_path / 'small'}:"), "something was left on the small disk"
    errors = [line for line in r.stderr.splitlines() if line.startswith("codetune merge:")]
    assert len(errors) == 2 and "Traceback" not in r.stderr
    # the note comes just before loading: only the small disk got that far
    assert sum(line.startswith("merge: loading the base") for line in r.stderr.splitlines()) == 1
    assert f"cannot write {tmp_path / 'ro' / 'm'}: Read-only file system (EROFS)" in errors[0]
    assert f"not enough space to write {tmp_path / 'small'}" in errors[1] and "choose --out" in errors[1]
