"""What `codetune merge` checks before it loads a model: the adapter's files are there, readable and
consistent with each other (ranks in adapter_config.json against the tensor shapes in the safetensors
header), the base it is merged into is the one it trained on, and --out may be written. Each failure is
one ConfigError naming the cause and the fix, instead of PEFT's "Repo id must be in the form ..." or
torch's "size mismatch" after minutes of loading."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from codetune.config import ConfigError
from codetune.model.adapter_files import FULL_WEIGHTS, BaseShape, base_shape
from codetune.model.load import RUN_INFO

LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"
MAX_HEADER = 100_000_000  # safetensors' own bound on the JSON header


def read_header(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's JSON header, without reading any tensor. A file too
    short for the offsets its header declares (a copy or save cut off) is refused here."""
    what = f"{path} is not a complete safetensors file"
    fix = "copy it again, or re-save the adapter (a checkpoint's adapter/ is a good fallback)"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConfigError(f"{what} ({size} bytes); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ConfigError(f"{what} (header of {n} bytes in a {size}-byte file); {fix}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}; check that the file exists and is readable") from None
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{what} (its header is not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{what} (its header is not a JSON object); {fix}")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: [int(d) for d in v["shape"]] for k, v in tensors.items()}
    except (TypeError, KeyError, IndexError, ValueError):
        raise ConfigError(f"{what} (its header does not describe tensors); {fix}") from None
    if 8 + n + end > size:
        raise ConfigError(f"{what}: its tensors need {8 + n + end} bytes but it has {size} (truncated); {fix}")
    return shapes


def _rank_for(module: str, lora_cfg: dict) -> int:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first rank_pattern key matching the end of the
    module's name, else r."""
    for key, rank in (lora_cfg.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return int(rank)
    return int(lora_cfg["r"])


# name suffix -> which dimension of the tensor is the rank
_LORA_RANK_DIM = {".lora_A.weight": 0, ".lora_B.weight": 1, ".lora_embedding_A": 0, ".lora_embedding_B": 1}


def rank_mismatches(lora_cfg: dict, shapes: dict[str, list[int]]) -> list[str]:
    """'module: config rank R, weights rank W' for every LoRA tensor whose shape disagrees with the config."""
    out = []
    for name, shape in shapes.items():
        for suffix, dim in _LORA_RANK_DIM.items():
            if name.endswith(suffix) and len(shape) == 2:
                module = name[: -len(suffix)].removeprefix("base_model.model.")
                want = _rank_for(module, lora_cfg)
                if shape[dim] != want:
                    out.append(f"{module}: config rank {want}, weights rank {shape[dim]}")
    return out


def check_adapter(adapter_dir: Path, info: dict) -> None:
    """The files load_tuned will read are present, readable and agree with each other."""
    method = info.get("method", "lora")
    if method == "full":
        if not (adapter_dir / FULL_WEIGHTS).is_file():
            raise ConfigError(f"{adapter_dir} has no {FULL_WEIGHTS} (its {RUN_INFO} says method 'full'); copy the "
                              "whole adapter folder, or use a checkpoint's adapter/")
        read_header(adapter_dir / FULL_WEIGHTS)
        return
    cfg_path, weights = adapter_dir / LORA_CONFIG, adapter_dir / LORA_WEIGHTS
    missing = [p.name for p in (cfg_path, weights) if not p.is_file()]
    if missing:
        raise ConfigError(f"{adapter_dir} has no {' or '.join(missing)}: the adapter is incomplete; copy the whole "
                          "adapter folder again, or point --adapter at a checkpoint's adapter/")
    try:
        lora_cfg = json.loads(cfg_path.read_text())
        int(lora_cfg["r"])
    except OSError as e:
        raise ConfigError(f"cannot read {cfg_path}: {e.strerror}; check that it is readable") from None
    except (ValueError, TypeError, KeyError):
        raise ConfigError(f"{cfg_path} is not a PEFT LoRA config (no integer 'r'); copy the adapter again") from None
    bad = rank_mismatches(lora_cfg, read_header(weights))
    if bad:
        raise ConfigError(f"{cfg_path} does not match {weights.name} ({len(bad)} tensors, e.g. {bad[0]}): they are not "
                          "from the same save; copy both from one adapter folder (a checkpoint's adapter/ is one)")


def is_merged_model(path: Path) -> bool:
    """A folder `codetune merge` wrote: its codetune.json names the adapter it was merged from."""
    try:
        return "merged_from" in json.loads((path / RUN_INFO).read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_out(out_dir: Path, force: bool) -> None:
    """--out must be new, empty, or (with --force) a model merged by codetune: nothing else is replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; merge writes a folder: choose another path")
    above = next((p for p in out_dir.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"--out {out_dir}: {above} is a file, not a folder; choose another path")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not is_merged_model(out_dir):
        raise ConfigError(f"--out {out_dir} is a non-empty folder that codetune merge did not write; it is never "
                          "replaced (not even with --force): choose a new or empty folder")
    if not force:
        raise ConfigError(f"--out {out_dir} already holds a merged model; pass --force to replace it (the old one "
                          "is removed only after the new one is written) or choose another folder")


def recorded_base(adapter_dir: Path, info: dict) -> BaseShape:
    """The base the adapter trained on, from its codetune.json; adapters saved before "base" was recorded
    give their vocabulary size and the tokenizer saved beside them."""
    if isinstance(info.get("base"), dict):
        return BaseShape(**info["base"])
    from transformers import AutoTokenizer

    from codetune.model.tokenizer import ensure_special_tokens, tokenizer_fingerprint

    tok = ensure_special_tokens(AutoTokenizer.from_pretrained(str(adapter_dir)))
    return BaseShape(vocab_size=info.get("vocab_size"), tokenizer=tokenizer_fingerprint(tok))


def _base_tokenizer(model_cfg, src: str):
    """The tokenizer that comes with the base, or None where it has none (random init, a folder of
    weights only)."""
    from codetune.model.tokenizer import TokenizerError, load_tokenizer

    if not model_cfg.tokenizer and Path(src).is_dir() and not any(
            (Path(src) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        return load_tokenizer(model_cfg)
    except (TokenizerError, OSError, ValueError):  # none to compare with; loading the weights says why, if it fails
        return None


def check_base(adapter_dir: Path, info: dict, model_cfg, described_as: str) -> None:
    """The base about to be loaded has the recorded shape and tokenizer; reads config.json and the tokenizer
    only, not the weights."""
    from transformers import AutoConfig

    from codetune.model.load import model_source

    source = model_source(model_cfg, info.get("vocab_size"), info.get("init_seed", 0))
    src = source.path
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=model_cfg.trust_remote_code,
                                            local_files_only=source.cache_only)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the base model's config.json from {src!r} ({str(e).splitlines()[0]}); "
                          "give --model a local model folder, or a hub id while online") from None
    want = recorded_base(adapter_dir, info)
    have = base_shape(config, _base_tokenizer(model_cfg, src))
    diff = want.differences(have)
    if diff:
        trained_on = info.get("model", {}).get("model", "?")
        raise ConfigError(f"the adapter was trained on {trained_on} ({want.describe(diff)}) but the base is "
                          f"{described_as} ({have.describe(diff)}); merge into the base it trained on, or pass "
                          "--ignore-base-mismatch if you know they are compatible")
