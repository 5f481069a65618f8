import dataclasses
from pathlib import Path

import pytest
import yaml

from codetune.cli import COMMANDS
from codetune.config import (
    SECTIONS,
    ConfigError,
    EvalConfig,
    TrainConfig,
    build,
    dump_yaml,
    load_yaml,
    parse_size,
    reads,
    sections_for,
    to_dict,
)
from codetune.fields import spec_of

REPO = Path(__file__).resolve().parents[1]


def test_every_flag_name_is_unique_across_sections():
    seen = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in seen, f"{f.name} in both {seen.get(f.name)} and {section}"
            seen[f.name] = section


def test_every_field_names_the_commands_that_read_it():
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            used_by = spec_of(f).used_by
            assert used_by and set(used_by) <= set(COMMANDS), f"{f.name}: used_by {used_by}"
    assert sections_for("train") == ["model", "adapter", "data", "train"]
    assert sections_for("prepare") == ["model", "data"]
    assert sections_for("eval") == ["model", "data", "eval"]
    assert sections_for("demo") == []
    assert [f.name for f in reads("train", "data")] == ["data_dir", "seq_len"]
    assert "attn" not in {f.name for f in reads("prepare", "model")}


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key in section 'adapter' 'rnak'.*'rank'"):
        build(["adapter"], {"adapter": {"rnak": 8}})


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config section 'trian'.*'train'"):
        build(["train"], {"trian": {}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got 'many'"):
        build(["train"], {"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"train.resume: expected true or false"):
        build(["train"], {"train": {"resume": "yes please"}})


# Issue 14.8: each was accepted from YAML (trained, recorded, or crashed later) though refused as a flag.
BAD_VALUES = [
    ("adapter", "method", "bogus", "method='bogus': choose one of lora, full"),
    ("train", "optimizer", "sgd", "optimizer='sgd': choose one of adamw, paged_adamw_8bit"),
    ("model", "precision", "fp8", "precision='fp8': choose one of auto, nf4"),
    ("train", "schedule", "exponential", "schedule='exponential': choose one of cosine"),
    ("train", "lr", ".inf", "lr=inf: must be a finite number greater than 0"),
    ("train", "lr", ".nan", "lr=nan: must be a finite number"),
    ("train", "log_every", "0", "log_every=0: must be at least 1"),
    ("train", "warmup_steps", "-1", "warmup_steps=-1: must be at least 0"),
    ("train", "save_every", "-5", "save_every=-5: must be at least 0"),
    ("train", "max_grad_norm", "-1.0", r"max_grad_norm=-1.0: must be at least 0"),
    ("train", "weight_decay", "-0.1", r"weight_decay=-0.1: must be at least 0"),
    ("train", "min_lr_ratio", "1.5", r"min_lr_ratio=1.5: must be at least 0 and at most 1"),
    ("train", "eval_batches", "0", "eval_batches=0: must be at least 1"),
    ("adapter", "rank", "0", r"rank=0: must be at least 1 \(try 8, 16 or 64\)"),
    ("data", "fim_rate", "1.2", "fim_rate=1.2: must be at least 0 and at most 1"),
    ("eval", "suites", "[loss, mbpp]", "'mbpp' is not one of loss, humaneval, fim"),
]


@pytest.mark.parametrize("section,key,text,match", BAD_VALUES)
def test_yaml_and_flag_values_get_the_same_check(section, key, text, match):
    value = yaml.safe_load(f"{key}: {text}")[key]  # as PyYAML reads it from a file
    with pytest.raises(ConfigError, match=match):
        build([section], {section: {key: value}})
    flag = value if isinstance(value, list) else text.lstrip(".")  # a flag is text: '.inf' is written 'inf'
    with pytest.raises(ConfigError, match=match):
        build([section], flags={f"{section}.{key}": flag})


def test_a_section_built_in_python_is_checked_too():
    with pytest.raises(ConfigError, match="log_every=0"):
        TrainConfig(log_every=0).validate()
    with pytest.raises(ConfigError, match="timeout=0.0: must be greater than 0"):
        EvalConfig(timeout=0).validate()


def test_numbers_as_people_write_them():
    data = yaml.safe_load("train:\n  lr: 3e-3\n  steps: 1e2\n  warmup_steps: 1_0\n  weight_decay: 0\n")
    assert isinstance(data["train"]["lr"], str)  # what PyYAML hands over
    cfg = build(["train"], data)["train"]
    assert cfg.lr == 3e-3 and cfg.steps == 100 and isinstance(cfg.steps, int)
    assert cfg.warmup_steps == 10 and cfg.weight_decay == 0.0 and isinstance(cfg.weight_decay, float)
    assert build(["train"], flags={"train.steps": "1e2", "train.lr": "2E-4"})["train"].steps == 100
    for bad in ("1.5", 1.5, "1e-1", True):
        with pytest.raises(ConfigError, match="steps: expected an integer"):
            build(["train"], {"train": {"steps": bad}})


def test_yaml_keys_of_other_commands_are_skipped_but_typos_are_not():
    shared = {"data": {"fim_rate": 5, "sources": ["/nonexistent"], "seq_len": 256}, "eval": {"limit": -3}}
    cfgs = build(sections_for("train"), shared, command="train")
    assert cfgs["data"].seq_len == 256 and cfgs["data"].fim_rate == 0.5 and cfgs["data"].sources == []
    with pytest.raises(ConfigError, match="fim_rate=5"):  # prepare reads it: checked
        build(sections_for("prepare"), shared, command="prepare")
    with pytest.raises(ConfigError, match="'fim_rat'.*'fim_rate'"):
        build(sections_for("train"), {"data": {"fim_rat": 0.5}}, command="train")


def test_dump_yaml_reads_back_to_the_same_settings():
    preset = load_yaml(REPO / "configs" / "tiny.yaml")
    cfgs = build(sections_for("train"), preset, {"train.steps": "1e2"}, command="train")
    text = dump_yaml(cfgs, "train")
    again = build(sections_for("train"), yaml.safe_load(text), command="train")
    assert to_dict(again) == to_dict(cfgs) and again["train"].steps == 100
    dumped = yaml.safe_load(text)
    assert list(dumped) == ["model", "adapter", "data", "train"]
    assert set(dumped["data"]) == {"data_dir", "seq_len"}  # what train reads, not prepare's settings
    assert "sources" in yaml.safe_load(dump_yaml(cfgs))["data"]  # without a command: every field


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
