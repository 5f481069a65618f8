"""`codetune eval`: held-out loss, sandboxed HumanEval and FIM accuracy for a model or base + adapter;
with --compare, the same suites on the base model and on base + adapter, and report.md comparing them.

Outputs (in --eval-dir): results.json, per-model humaneval_*.jsonl and fim.jsonl, report.md, *.png.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from codetune import registry
from codetune.atomic import own_output_dir, write_text
from codetune.config import ConfigError, ModelConfig, to_dict
from codetune.model.load import pick_device

CLI_FLAGS = [
    (("--train-metrics",), dict(metavar="JSONL", default=None,
                                help="training metrics file for the loss curves in report.md "
                                     "(default: metrics.jsonl of the adapter's run, if there is one)")),
]


def log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def base_tokenizer(model_cfg: ModelConfig, data_dir: str):
    """The model's tokenizer; for a random-init model without --tokenizer, the one `prepare` saved."""
    from transformers import AutoTokenizer

    from codetune.model.tokenizer import TokenizerError, ensure_special_tokens, load_tokenizer

    try:
        return load_tokenizer(model_cfg)
    except TokenizerError as e:
        saved = Path(data_dir) / "tokenizer"
        if saved.is_dir():
            return ensure_special_tokens(AutoTokenizer.from_pretrained(str(saved)))
        raise ConfigError(f"{e} (or run `codetune prepare` so {saved} exists)") from None


def load_base(model_cfg: ModelConfig, data_dir: str, device: torch.device, vocab_size=None, seed: int = 0, tok=None):
    from codetune.model.load import check_vocab, load_model, padded_vocab

    tok = tok or base_tokenizer(model_cfg, data_dir)
    spec = registry.lookup(model_cfg.model)
    if vocab_size is None and model_cfg.random_init and spec is not None and spec.hub_id is None:
        vocab_size = padded_vocab(tok)  # test-only shapes are sized to their tokenizer, as in training
    model, _ = load_model(model_cfg, device, vocab_size=vocab_size, seed=seed)
    check_vocab(model, tok)
    model.eval()
    return model, tok


def adapter_precision(model_cfg: ModelConfig, adapter_path: str, device: torch.device) -> str | None:
    """How to hold the base weights under an adapter: --precision if given; else as in training, except
    that an nf4/int8 (GPU-only) base is evaluated in fp32 on a machine without CUDA."""
    from codetune.model.load import read_run_info

    if model_cfg.precision != "auto":
        return model_cfg.precision
    trained = read_run_info(adapter_path)["model"].get("precision", "auto")
    if device.type != "cuda" and trained in ("nf4", "int8"):
        log(f"the adapter was trained on a {trained} base; no CUDA here, so the base is held in fp32")
        return "fp32"
    return None


def fim_tasks_for(ecfg, data_dir: str, tok):
    from codetune.eval import fim

    docs = fim.docs_from_dir(ecfg.fim_source) if ecfg.fim_source else fim.docs_from_val(data_dir, tok)
    per_kind = min(ecfg.fim_tasks, ecfg.limit) if ecfg.limit else ecfg.fim_tasks
    return fim.make_tasks(docs, per_kind, context_chars=ecfg.fim_context_chars)


def run_suites(model, tok, ecfg, data_dir: str, out_dir: Path, fim_tasks) -> dict:
    """Every selected suite on one model; per-model files go to out_dir."""
    from codetune.eval import fim, humaneval, loss

    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    if "loss" in ecfg.suites:
        t = time.perf_counter()
        res["loss"] = loss.evaluate(model, data_dir, ecfg.loss_batch_size, ecfg.loss_batches)
        res["loss"]["seconds"] = round(time.perf_counter() - t, 2)
        log(f"val loss {res['loss']['loss']:.4f} (perplexity {res['loss']['perplexity']:.2f}) "
            f"over {res['loss']['tokens']} tokens")
    if "humaneval" in ecfg.suites:
        res["humaneval"] = humaneval.evaluate(model, tok, ecfg, out_dir, log)
    if "fim" in ecfg.suites:
        res["fim"] = fim.evaluate(model, tok, fim_tasks, ecfg, out_dir, log)
    write_json(out_dir / "results.json", res)
    return res


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


def find_train_metrics(ns, adapter_path: str | None) -> Path | None:
    given = getattr(ns, "train_metrics", None)
    if given:
        if not Path(given).is_file():
            raise ConfigError(f"--train-metrics {given!r}: no such file; give the training run's metrics.jsonl")
        return Path(given)
    if adapter_path:
        # <run>/adapter or <run>/checkpoints/step-N/adapter
        for parent in list(Path(adapter_path).resolve().parents)[:3]:
            if (parent / "metrics.jsonl").is_file():
                return parent / "metrics.jsonl"
    return None


def versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


EVAL_MARKER = ".codetune-eval"  # in every folder eval writes: see atomic.own_output_dir


def run(cfgs: dict, ns) -> int:
    from codetune.eval.loss import check_tokenizer
    from codetune.eval.report import write_report
    from codetune.model.load import load_tuned

    ecfg, data_dir = cfgs["eval"], cfgs["data"].data_dir
    needs_val = "loss" in ecfg.suites or ("fim" in ecfg.suites and not ecfg.fim_source)
    if needs_val and not (Path(data_dir) / "val" / "meta.json").exists():
        raise ConfigError(f"no prepared validation split in {data_dir!r} (needed by the loss suite and by FIM "
                          "without --fim-source): run `codetune prepare`, pass --data-dir, or choose "
                          "--suites humaneval / --fim-source DIR")
    # a folder of eval's own (earlier results in it are replaced), or a new one; never a user's folder
    out_dir = own_output_dir(Path(ecfg.eval_dir), EVAL_MARKER, "codetune eval", "--eval-dir")
    device = pick_device("auto")
    t0 = time.perf_counter()
    info = None
    if ecfg.adapter_path:
        log(f"loading base + adapter from {ecfg.adapter_path}")
        precision = adapter_precision(cfgs["model"], ecfg.adapter_path, device)
        model, tok, info = load_tuned(ecfg.adapter_path, device, precision)
    else:
        log(f"loading {cfgs['model'].model}")
        model, tok = load_base(cfgs["model"], data_dir, device)
    if needs_val:
        check_tokenizer(data_dir, tok)
    fim_tasks = fim_tasks_for(ecfg, data_dir, tok) if "fim" in ecfg.suites else []

    by_model: dict[str, dict] = {}
    if ecfg.compare:
        if hasattr(model, "disable_adapter"):
            log("== base model (adapter disabled) ==")
            with model.disable_adapter():
                by_model["base"] = run_suites(model, tok, ecfg, data_dir, out_dir / "base", fim_tasks)
        else:  # full-weight training replaced layers in place: load the untouched base separately
            log("== base model ==")
            base_cfg = ModelConfig(**info["model"])
            base_cfg = dataclasses.replace(base_cfg, precision=precision or base_cfg.precision)
            base, _ = load_base(base_cfg, data_dir, device, info.get("vocab_size"), info.get("init_seed", 0), tok=tok)
            by_model["base"] = run_suites(base, tok, ecfg, data_dir, out_dir / "base", fim_tasks)
            del base
        log("== base + adapter ==")
        by_model["tuned"] = run_suites(model, tok, ecfg, data_dir, out_dir / "tuned", fim_tasks)
    else:
        label = "tuned" if ecfg.adapter_path else "base"
        by_model[label] = run_suites(model, tok, ecfg, data_dir, out_dir, fim_tasks)

    write_json(out_dir / "results.json", {"models": by_model, "config": to_dict(cfgs), "adapter_info": info,
                                          "device": str(device), "versions": versions(),
                                          "seconds": round(time.perf_counter() - t0, 1)})
    report = write_report(out_dir, by_model, find_train_metrics(ns, ecfg.adapter_path))
    log(f"wrote {out_dir / 'results.json'} and {report}")
    return 0
