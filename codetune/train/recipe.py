"""`codetune train`: setup -> fit -> validate, top to bottom, over plain components.

One optimizer step = grad_accum micro-steps (x processes). The loss of a step is the SUM of token
cross-entropies over all its micro-batches divided by the step's total target-token count (summed over
processes too) — not the mean of per-batch means, which weights short batches more (the accumulation
bug transformers had). Multi-GPU runs go through Accelerate (`accelerate launch -m codetune train`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from codetune.config import ConfigError, to_dict
from codetune.train.memory import cap_vram, configure_allocator, explain_oom, snapshot


class CausalLMLoss(torch.nn.Module):
    """model -> summed token loss, computed from hidden states by the fused chunked cross-entropy so the
    full logits never exist. A Module (not a function) so DDP sees the forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, labels):
        from codetune.model.adapters import causal_lm
        from codetune.train.loss import linear_cross_entropy

        lm = causal_lm(self.model)
        hidden = lm.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        return linear_cross_entropy(hidden, lm.lm_head.weight, labels, getattr(self.model, "_codetune_graphs", None))


@dataclasses.dataclass
class Run:
    """Everything setup() builds; fit() and validate() read it."""
    cfgs: dict
    accelerator: object
    device: torch.device
    model: object           # PEFT-wrapped (or plain, for method=full) causal LM
    loss_fn: object         # CausalLMLoss, possibly DDP-wrapped
    tokenizer: object
    optimizer: object
    scheduler: object
    train_stream: object
    val_ds: object
    out_dir: Path
    run_info: dict
    offloader: object = None
    start_step: int = 0


def mixed_precision(device: torch.device) -> str:
    """Accelerate's mixed-precision mode. With bf16 compute the weights already are bf16 (or NF4/int8
    dequantized to bf16) and the LoRA path casts its fp32 adapters itself, so autocast would only add
    casts: LayerNorm outputs in fp32, re-cast for every projection (measured: ~20% of GPU time in copies).
    fp16 compute keeps autocast + loss scaling, which fp16 needs against underflow."""
    from codetune.model.load import compute_dtype

    if device.type != "cuda":
        return "no"
    return "no" if compute_dtype(device) == torch.bfloat16 else "fp16"


def build_model(cfgs: dict, device: torch.device, vocab_size: int | None = None):
    """Load -> adapters/freezing -> train mode -> layer runners (checkpointing, offload, frozen prefix).
    Shared by `codetune train` and bench/train_bench.py so the benchmark measures the real engine."""
    from codetune.model.adapters import apply_adapters
    from codetune.model.layers import install_layer_runners
    from codetune.model.load import load_model
    from codetune.model.lora_fast import install_fast_lora

    mcfg, acfg, tcfg = cfgs["model"], cfgs["adapter"], cfgs["train"]
    model, _ = load_model(mcfg, device, vocab_size=vocab_size, seed=0)
    model = apply_adapters(model, acfg, seed=tcfg.seed)
    model.train()  # transformers only checkpoints in train mode; our layer runners key on it too
    offload = tcfg.offload_activations == "on" or (tcfg.offload_activations == "auto" and device.type == "cuda")
    offloaded = any(str(d) in ("cpu", "disk") for d in (getattr(model, "hf_device_map", None) or {}).values())
    if tcfg.fast_lora and acfg.method == "lora" and not offloaded:
        # (with weights offloaded to CPU, Accelerate's hooks must move each weight in: PEFT's forward does that)
        install_fast_lora(model)
    offloader = install_layer_runners(model, checkpoint=tcfg.grad_checkpointing, offload=offload,
                                      fast=tcfg.fast_layers and not offloaded, cuda_graphs=tcfg.cuda_graphs)
    if tcfg.cpu_embeddings and not offloaded:
        from codetune.model.embeddings import offload_input_embeddings

        offload_input_embeddings(model)
    return model, offloader


def setup(cfgs: dict) -> Run:
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from codetune.data.shards import PackedDataset, read_manifest
    from codetune.model.adapters import count_parameters
    from codetune.model.load import check_vocab, padded_vocab, resolve_precision
    from codetune.model.tokenizer import ensure_special_tokens, tokenizer_fingerprint
    from codetune.train.batches import BatchStream
    from codetune.train.optim import build_optimizer, build_scheduler

    mcfg, acfg, dcfg, tcfg = cfgs["model"], cfgs["adapter"], cfgs["data"], cfgs["train"]
    use_cuda = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=mixed_precision(torch.device("cuda" if use_cuda else "cpu")),
                              device_placement=False, cpu=not use_cuda)
    device = accelerator.device
    cap_vram(tcfg.max_vram, device)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(tcfg.seed)

    # data first: it's cheap and the most common thing to get wrong
    manifest = read_manifest(dcfg.data_dir)
    train_ds, val_ds = PackedDataset(dcfg.data_dir, "train"), PackedDataset(dcfg.data_dir, "val")
    if train_ds.seq_len != dcfg.seq_len:
        raise ConfigError(f"shards in {dcfg.data_dir} are packed to seq_len={train_ds.seq_len}, but --seq-len is "
                          f"{dcfg.seq_len}; pass --seq-len {train_ds.seq_len} or re-run prepare")
    tok_dir = Path(dcfg.data_dir) / "tokenizer"
    tokenizer = ensure_special_tokens(AutoTokenizer.from_pretrained(str(tok_dir)))
    if tokenizer_fingerprint(tokenizer) != manifest.get("tokenizer"):
        raise ConfigError(f"{dcfg.data_dir} was prepared with a different tokenizer than the one saved beside it; "
                          "re-run `codetune prepare`")

    precision = resolve_precision(mcfg, device)
    mcfg = dataclasses.replace(mcfg, precision=precision)
    cfgs = {**cfgs, "model": mcfg}
    with accelerator.main_process_first():  # one process builds/caches a random-init checkpoint, then all load
        model, offloader = build_model(cfgs, device, padded_vocab(tokenizer) if mcfg.random_init else None)
    check_vocab(model, tokenizer)
    trainable, total = count_parameters(model)

    optimizer = build_optimizer(model, tcfg, device)
    scheduler = build_scheduler(optimizer, tcfg)
    loss_fn = CausalLMLoss(model)
    if accelerator.num_processes > 1:
        loss_fn = accelerator.prepare_model(loss_fn, device_placement=False)
    stream = BatchStream(train_ds, tcfg.batch_size, tcfg.seed, accelerator.process_index, accelerator.num_processes)
    out = Path(tcfg.out_dir)
    info = {"model": dataclasses.asdict(mcfg), "vocab_size": model.get_input_embeddings().weight.shape[0],
            "init_seed": 0, "method": acfg.method, "adapter": dataclasses.asdict(acfg),
            "train": dataclasses.asdict(tcfg), "data_manifest": {k: manifest.get(k) for k in ("sources", "counts", "splits")},
            "trainable_params": trainable, "total_params": total}
    return Run(cfgs, accelerator, device, model, loss_fn, tokenizer, optimizer, scheduler, stream, val_ds, out,
               info, offloader)


def write_adapter(run: Run, path: Path) -> None:
    from codetune.export.adapter import save_adapter

    save_adapter(run.model, run.tokenizer, run.run_info, path)


def maybe_resume(run: Run) -> None:
    from codetune.train.state import list_checkpoints, load_checkpoint

    if not run.cfgs["train"].resume:
        if list_checkpoints(run.out_dir):
            raise ConfigError(f"{run.out_dir} already holds checkpoints; pass --resume to continue them, or choose "
                              "a new --out-dir (nothing was overwritten)")
        return
    ckpts = list_checkpoints(run.out_dir)
    if not ckpts:
        print(f"--resume: no checkpoint in {run.out_dir}; starting from step 0", file=sys.stderr)
        return
    state = load_checkpoint(ckpts[-1], run.model, run.optimizer, run.scheduler, to_dict(run.cfgs))
    run.start_step = int(state["step"])
    print(f"resumed from {ckpts[-1]} (step {run.start_step})", file=sys.stderr)


@torch.no_grad()
def validate(run: Run) -> dict:
    from codetune.train.batches import eval_batches

    tcfg = run.cfgs["train"]
    run.model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)
    for b in eval_batches(run.val_ds, tcfg.batch_size, tcfg.eval_batches, run.accelerator.process_index,
                          run.accelerator.num_processes):
        b = {k: v.to(run.device) for k, v in b.items()}
        with run.accelerator.autocast():
            total[0] += run.loss_fn(b["input_ids"], b["position_ids"], b["labels"]).double()
        total[1] += (b["labels"] != -100).sum()
    total = run.accelerator.reduce(total, reduction="sum") if run.accelerator.num_processes > 1 else total
    run.model.train()
    if total[1] == 0:
        return {}
    loss = (total[0] / total[1]).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}


def train_step(run: Run, step: int) -> dict:
    """One optimizer step over grad_accum micro-batches; loss normalised by the step's target count."""
    tcfg, acc = run.cfgs["train"], run.accelerator
    micro = [run.train_stream.batch(step * tcfg.grad_accum + i) for i in range(tcfg.grad_accum)]
    n_tgt = torch.tensor(float(sum((b["labels"] != -100).sum() for b in micro)), device=run.device)
    if acc.num_processes > 1:
        n_tgt = acc.reduce(n_tgt, reduction="sum")
    # DDP averages gradients over processes; scaling by world size turns that into a global token sum.
    scale = acc.num_processes / n_tgt.clamp(min=1)
    loss_sum = 0.0
    for i, b in enumerate(micro):
        b = {k: v.to(run.device, non_blocking=True) for k, v in b.items()}
        ctx = acc.no_sync(run.loss_fn) if (acc.num_processes > 1 and i < len(micro) - 1) else contextlib.nullcontext()
        with ctx, acc.autocast():
            s = run.loss_fn(b["input_ids"], b["position_ids"], b["labels"])
        acc.backward(s * scale)
        loss_sum += s.detach().float()
    grad_norm = None
    if tcfg.max_grad_norm > 0:
        grad_norm = acc.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], tcfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss_tot = torch.as_tensor(loss_sum, device=run.device)
    if acc.num_processes > 1:
        loss_tot = acc.reduce(loss_tot, reduction="sum")
    out = {"loss": (loss_tot / n_tgt.clamp(min=1)).item(), "lr": run.scheduler.get_last_lr()[0],
           "tokens": int(n_tgt.item())}
    if grad_norm is not None:
        out["grad_norm"] = float(grad_norm)
    return out


def fit(run: Run) -> dict:
    from codetune.train.metrics import MetricsLog
    from codetune.train.progress import Progress
    from codetune.train.state import save_checkpoint

    tcfg = run.cfgs["train"]
    main_proc = run.accelerator.is_main_process
    log = MetricsLog(run.out_dir, tcfg.tensorboard, run.start_step if tcfg.resume else None, enabled=main_proc)
    bar = Progress(tcfg.steps, run.start_step, enabled=tcfg.progress and main_proc)
    best, bad_evals, last = float("inf"), 0, {}
    tokens_seen, t0 = 0, time.perf_counter()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)

    def checkpoint(step):
        run.accelerator.wait_for_everyone()
        if main_proc:
            save_checkpoint(run.out_dir, step, run.model, run.optimizer, run.scheduler, {"micro_step": step * tcfg.grad_accum},
                            to_dict(run.cfgs), tcfg.keep_last, write_adapter=lambda p: write_adapter(run, p))

    step = run.start_step
    try:
        for step in range(run.start_step, tcfg.steps):
            ts = time.perf_counter()
            rec = train_step(run, step)
            dt = time.perf_counter() - ts
            tokens_seen += rec["tokens"]
            rec.update(step=step + 1, tok_per_s=round(rec["tokens"] / dt, 1), **snapshot(run.device))
            done = step + 1
            if tcfg.eval_every and done % tcfg.eval_every == 0:
                rec.update(validate(run))
                if "val_loss" in rec:
                    if rec["val_loss"] < best - 1e-4:
                        best, bad_evals = rec["val_loss"], 0
                    else:
                        bad_evals += 1
            if done % tcfg.log_every == 0 or "val_loss" in rec or done == tcfg.steps:
                log.log(rec)
            bar.update(rec)
            last = rec
            if tcfg.save_every and done % tcfg.save_every == 0 and done != tcfg.steps:
                checkpoint(done)
            if tcfg.early_stopping and bad_evals >= tcfg.early_stopping:
                bar.note(f"early stopping: validation loss did not improve for {bad_evals} evaluations")
                break
    except torch.OutOfMemoryError:
        bar.close()
        log.close()
        raise SystemExit(f"codetune train: {explain_oom(run.cfgs, run.device)}") from None
    finally:
        bar.close()
    final = step + 1 if tcfg.steps > run.start_step else run.start_step
    if "val_loss" not in last and run.val_ds is not None and len(run.val_ds):
        last.update(validate(run))
        log.log({"step": final, **{k: v for k, v in last.items() if k.startswith("val_")}})
    checkpoint(final)
    log.close()
    elapsed = time.perf_counter() - t0
    bank = getattr(run.model, "_codetune_graphs", None)  # model/graphs.py: did the layers run as CUDA graphs?
    graphs = {"captured": bank.captured, "failure": bank.failure} if bank is not None else None
    return {"steps": final, "tokens": tokens_seen, "seconds": round(elapsed, 1),
            "tok_per_s": round(tokens_seen / max(elapsed, 1e-9), 1), "final_loss": last.get("loss"),
            "val_loss": last.get("val_loss"), "cuda_graphs": graphs, **snapshot(run.device)}


def finish(run: Run, summary: dict) -> None:
    from codetune.train.metrics import plot_losses

    if not run.accelerator.is_main_process:
        return
    write_adapter(run, run.out_dir / "adapter")
    png = plot_losses(run.out_dir / "metrics.jsonl", run.out_dir / "loss.png")
    summary = {**summary, "adapter": str(run.out_dir / "adapter"), "loss_plot": str(png) if png else None,
               "trainable_params": run.run_info["trainable_params"]}
    (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


def main(cfgs: dict) -> dict:
    run = setup(cfgs)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    maybe_resume(run)
    summary = fit(run)
    finish(run, summary)
    return summary


def run(cfgs: dict, ns) -> int:
    note = configure_allocator()  # before anything touches CUDA
    if note:
        print(f"codetune train: {note}", file=sys.stderr)
    main(cfgs)
    return 0
