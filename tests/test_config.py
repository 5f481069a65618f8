import dataclasses
from pathlib import Path

import pytest

from codetune.config import SECTIONS, ConfigError, build, load_yaml, parse_size

REPO = Path(__file__).resolve().parents[1]


def test_every_flag_name_is_unique_across_sections():
    seen = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in seen, f"{f.name} in both {seen.get(f.name)} and {section}"
            seen[f.name] = section


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key in section 'adapter' 'rnak'.*'rank'"):
        build(["adapter"], {"adapter": {"rnak": 8}})


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config section 'trian'.*'train'"):
        build(["train"], {"trian": {}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got str 'many'"):
        build(["train"], {"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"train.resume: expected true or false"):
        build(["train"], {"train": {"resume": "yes please"}})


def test_rank_zero_rejected():
    with pytest.raises(ConfigError, match="rank=0: LoRA rank must be a positive integer"):
        build(["adapter"], {"adapter": {"rank": 0}})


def test_train_embeddings_needs_full_weights():
    assert build(["adapter"], {"adapter": {"method": "full", "train_embeddings": True}})["adapter"].train_embeddings
    with pytest.raises(ConfigError, match="train_embeddings needs method=full"):
        build(["adapter"], {"adapter": {"train_embeddings": True}})


def test_seq_len_above_model_maximum():
    with pytest.raises(ConfigError, match="seq_len=20000 exceeds stable-code-3b's maximum context of 16384"):
        build(["model", "data"], {"model": {"model": "stable-code-3b"}, "data": {"seq_len": 20000}})


def test_missing_paths(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        build(["model"], {"model": {"model": str(tmp_path / "nope" / "model")}})
    with pytest.raises(ConfigError, match="tokenizer=.*does not exist"):
        build(["model"], {"model": {"tokenizer": str(tmp_path / "tok.json")}})
    with pytest.raises(ConfigError, match="config file .* does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_train_layers_syntax():
    assert build(["adapter"], {"adapter": {"train_layers": "last:8"}})["adapter"].last_n_layers() == 8
    with pytest.raises(ConfigError, match="last:N"):
        build(["adapter"], {"adapter": {"train_layers": "first:8"}})


def test_flags_override_yaml():
    cfg = build(["train"], {"train": {"lr": 1e-3, "steps": 5}}, {"train.steps": 7})["train"]
    assert cfg.lr == 1e-3 and cfg.steps == 7


def test_sizes():
    assert parse_size("10GiB") == 10 * 2**30
    assert parse_size("6GB") == 6 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    with pytest.raises(ConfigError, match="cannot read size"):
        parse_size("ten gigs")


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")))
def test_presets_load_validate_and_document_their_command(preset):
    text = preset.read_text()
    assert text.startswith("# codetune "), "a preset's first line gives the command that runs it"
    cfgs = build(list(SECTIONS), load_yaml(preset), validate=False)
    for section in ("model", "adapter", "train"):
        cfgs[section].validate()
