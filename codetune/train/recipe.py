"""`codetune train`: setup -> fit -> validate, top to bottom, over plain components.

One optimizer step = grad_accum micro-steps (x processes). The loss of a step is the SUM of token
cross-entropies over all its micro-batches divided by the step's total target-token count (summed over
processes too) — not the mean of per-batch means, which weights short batches more (the accumulation
bug transformers had). Several processes go through Accelerate: train/launch.py starts them for
--num-gpus, train/distributed.py wraps the run for DDP or FSDP2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from codetune.config import ConfigError
from codetune.model.layers import graph_bank
from codetune.train.distributed import mixed_precision  # noqa: F401  (bench/train_bench.py)
from codetune.train.inputs import CausalLMLoss, batch_inputs, run_graphs
from codetune.train.memory import PeakMeter, cap_vram, configure_allocator, explain_oom, snapshot
from codetune.train.resume import maybe_resume, run_config


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
    start_totals: dict = dataclasses.field(default_factory=dict)  # whole-run tokens/seconds at start_step
    peaks: PeakMeter | None = None  # train/memory.py: peak memory of the training steps and of validation

    def __post_init__(self):
        self.peaks = self.peaks or PeakMeter(self.device)


def build_model(cfgs: dict, device: torch.device, vocab_size: int | None = None, options=None):
    """Load -> adapters/freezing -> train mode -> layer runners (checkpointing, offload, frozen prefix).
    Shared by `codetune train` and bench/train_bench.py so the benchmark measures the real engine.
    `options`: model/engine_state.EngineOptions (None: the defaults `codetune train` runs)."""
    from codetune.model.adapters import apply_adapters, causal_lm
    from codetune.model.attention import use_packed_attention
    from codetune.model.engine_plan import engine_plan
    from codetune.model.engine_state import EngineState
    from codetune.model.graphs import single_process
    from codetune.model.layers import install_layer_runners
    from codetune.model.load import load_model
    from codetune.model.lora_fast import install_fast_lora

    mcfg, acfg, tcfg = cfgs["model"], cfgs["adapter"], cfgs["train"]
    model, _ = load_model(mcfg, device, vocab_size=vocab_size, seed=0)
    model = apply_adapters(model, acfg, seed=tcfg.seed)
    lm = causal_lm(model)
    plan = engine_plan(cfgs, cuda=device.type == "cuda", processes=1 if single_process() else 2,
                       weights_offloaded=any(str(d) in ("cpu", "disk")
                                             for d in (getattr(model, "hf_device_map", None) or {}).values()),
                       tied_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)))
    if plan.packed_attention:
        use_packed_attention(lm)  # (before the layer runners: the fused layers pick it up)
    model.train()  # transformers only checkpoints in train mode; our layer runners key on it too
    state = EngineState(options)  # (one per model: both installers share its cast cache and kernel check)
    if plan.fused_lora:
        install_fast_lora(model, state)
    offloader = install_layer_runners(model, checkpoint=tcfg.grad_checkpointing, offload=plan.offload_activations,
                                      fast=plan.fused_layers, cuda_graphs=plan.cuda_graphs, state=state)
    if plan.cpu_embeddings:
        from codetune.model.embeddings import offload_input_embeddings

        offload_input_embeddings(model)
    return model, offloader


def setup(cfgs: dict) -> Run:
    from transformers import AutoTokenizer

    from codetune.data.shards import PackedDataset, read_manifest, stale_fim
    from codetune.model.adapters import count_parameters
    from codetune.model.load import check_vocab, padded_vocab, resolve_precision
    from codetune.model.tokenizer import ensure_special_tokens, tokenizer_fingerprint
    from codetune.train.batches import BatchStream
    from codetune.train.distributed import make_accelerator, prepare
    from codetune.train.optim import build_optimizer, build_scheduler

    mcfg, acfg, dcfg, tcfg = cfgs["model"], cfgs["adapter"], cfgs["data"], cfgs["train"]
    accelerator = make_accelerator(tcfg)
    device = accelerator.device
    if accelerator.num_processes > 1:  # (config.yaml and run.json say how many processes the run had)
        tcfg = dataclasses.replace(tcfg, num_gpus=accelerator.num_processes)
        cfgs = {**cfgs, "train": tcfg}
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
    if (why := stale_fim(manifest)) and accelerator.is_main_process:
        print(f"codetune train: warning: {dcfg.data_dir}: {why}", file=sys.stderr)

    precision = resolve_precision(mcfg, device)
    mcfg = dataclasses.replace(mcfg, precision=precision)
    cfgs = {**cfgs, "model": mcfg}
    with accelerator.main_process_first():  # one process builds/caches a random-init checkpoint, then all load
        model, offloader = build_model(cfgs, device, padded_vocab(tokenizer) if mcfg.random_init else None)
    check_vocab(model, tokenizer)
    trainable, total = count_parameters(model)

    optimizer = build_optimizer(model, tcfg, device)
    scheduler = build_scheduler(optimizer, tcfg)
    loss_fn, optimizer = prepare(accelerator, CausalLMLoss(model), optimizer, model)
    stream = BatchStream(train_ds, tcfg.batch_size, tcfg.seed, accelerator.process_index, accelerator.num_processes)
    out = Path(tcfg.out_dir)
    info = {"model": dataclasses.asdict(mcfg), "vocab_size": model.get_input_embeddings().weight.shape[0],
            "init_seed": 0, "method": acfg.method, "adapter": dataclasses.asdict(acfg),
            "train": dataclasses.asdict(tcfg), "data_manifest": {k: manifest.get(k) for k in ("sources", "counts", "splits", "run_key", "chat_template")},
            "trainable_params": trainable, "total_params": total}
    return Run(cfgs, accelerator, device, model, loss_fn, tokenizer, optimizer, scheduler, stream, val_ds, out,
               info, offloader)


def write_adapter(run: Run, path: Path) -> None:
    from codetune.model.adapter_files import save_adapter

    save_adapter(run.model, run.tokenizer, run.run_info, path)


@torch.no_grad()
def validate(run: Run) -> dict:
    from codetune.train.batches import eval_batches

    tcfg = run.cfgs["train"]
    run.model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)
    with run.peaks.phase("val"):
        for b in eval_batches(run.val_ds, tcfg.batch_size, tcfg.eval_batches, run.accelerator.process_index,
                              run.accelerator.num_processes):
            with run.accelerator.autocast():
                total[0] += run.loss_fn(**batch_inputs(b, run.device, run_graphs(run))).double()
            total[1] += (b["labels"] != -100).sum()
    total = run.accelerator.reduce(total, reduction="sum") if run.accelerator.num_processes > 1 else total
    run.model.train()
    if run.device.type == "cuda":  # validation's blocks (other sizes than a training step's) go back to the
        torch.cuda.empty_cache()   # driver instead of staying reserved beside the training working set
    if total[1] == 0:
        return {}
    loss = (total[0] / total[1]).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}


def train_step(run: Run, step: int) -> dict:
    """One optimizer step over grad_accum micro-batches; loss normalised by the step's target count."""
    with run.peaks.phase("train"):
        out = _train_step(run, step)
    return {**out, **run.peaks.summary()}


def _train_step(run: Run, step: int) -> dict:
    from codetune.train.distributed import norm_value

    tcfg, acc = run.cfgs["train"], run.accelerator
    micro = [run.train_stream.batch(step * tcfg.grad_accum + i) for i in range(tcfg.grad_accum)]
    n_local = int(sum((b["labels"] != -100).sum() for b in micro))  # (labels are on the host: no sync)
    n_tgt = torch.tensor(float(n_local), device=run.device)
    if acc.num_processes > 1:
        n_tgt = acc.reduce(n_tgt, reduction="sum")
    if (n_tgt.item() if acc.num_processes > 1 else n_local) == 0:
        # no token of this step's batch is a target (e.g. a set prepared before prepare dropped such rows):
        # there is no loss to follow, and an optimizer step would still move the weights (weight decay,
        # AdamW's momentum). Every process sees the same global count, so all skip together.
        with warnings.catch_warnings():  # ("scheduler.step() before optimizer.step()": on purpose here)
            warnings.simplefilter("ignore", UserWarning)
            run.scheduler.step()  # the schedule stays a function of the step number (resume relies on it)
        return {"lr": run.scheduler.get_last_lr()[0], "tokens": 0, "skipped": "no target token in the batch"}
    # DDP averages gradients over processes; scaling by world size turns that into a global token sum.
    scale = acc.num_processes / n_tgt.clamp(min=1)
    loss_sum = 0.0
    for i, b in enumerate(micro):
        ctx = acc.no_sync(run.loss_fn) if (acc.num_processes > 1 and i < len(micro) - 1) else contextlib.nullcontext()
        with ctx, acc.autocast():
            s = run.loss_fn(**batch_inputs(b, run.device, run_graphs(run)))
        acc.backward(s * scale)
        loss_sum += s.detach().float()
    grad_norm = None
    if tcfg.max_grad_norm > 0:
        grad_norm = norm_value(acc.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]],
                                                   tcfg.max_grad_norm))  # (a DTensor under FSDP2)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss_tot = torch.as_tensor(loss_sum, device=run.device)
    if acc.num_processes > 1:
        loss_tot = acc.reduce(loss_tot, reduction="sum")
    out = {"loss": (loss_tot / n_tgt.clamp(min=1)).item(), "lr": run.scheduler.get_last_lr()[0],
           "tokens": int(n_tgt.item())}
    if grad_norm is not None:
        out["grad_norm"] = grad_norm
    return out


def fit(run: Run) -> dict:
    from codetune.metrics import MetricsLog
    from codetune.train.distributed import optimizer_state, sharded, whole_parameters
    from codetune.train.interrupt import Stopped, StopRequest
    from codetune.train.progress import Progress
    from codetune.train.state import Diverged, checkpoint_path, nonfinite_check, save_checkpoint

    tcfg, acc = run.cfgs["train"], run.accelerator
    main_proc = acc.is_main_process
    log = MetricsLog(run.out_dir, tcfg.tensorboard, run.start_step, enabled=main_proc)
    bar = Progress(tcfg.steps, run.start_step, enabled=tcfg.progress and main_proc)
    best, bad_evals, last = float("inf"), 0, {}
    tokens_seen, t0 = 0, time.perf_counter()  # (peak memory: run.peaks, reset per phase by PeakMeter)

    def totals() -> dict:  # the whole run's, across resumed sessions
        prev = run.start_totals
        return {"tokens": prev.get("tokens", 0) + tokens_seen,
                "seconds": prev.get("seconds", 0.0) + time.perf_counter() - t0}

    def checkpoint(step):
        acc.wait_for_everyone()
        with whole_parameters(run.loss_fn):  # (FSDP2: every process gathers, the main one writes)
            opt_state = optimizer_state(run.optimizer) if (main_proc or sharded(run.loss_fn)) else None
            if not main_proc:  # (the main process checks inside save_checkpoint: all stop at the same step)
                nonfinite_check(run.model, step, run.out_dir)
                return None
            return save_checkpoint(run.out_dir, step, run.model, opt_state, run.scheduler,
                                   {"micro_step": step * tcfg.grad_accum}, run_config(run), tcfg.keep_last,
                                   write_adapter=lambda p: write_adapter(run, p), totals=totals())

    def stop_asked(stop) -> bool:
        if acc.num_processes == 1:
            return stop.requested
        flag = torch.tensor(float(stop.requested), device=run.device)  # every process stops at the same step
        return bool(acc.reduce(flag, reduction="sum").item())

    step, saved_at = run.start_step, run.start_step
    with StopRequest() as stop:
        try:
            for step in range(run.start_step, tcfg.steps):
                ts = time.perf_counter()
                rec = train_step(run, step)
                if not math.isfinite(rec.get("loss", 0.0)):  # (already a float: no extra sync)
                    raise Diverged(step + 1, f"the loss is {rec['loss']}", run.out_dir)
                dt = time.perf_counter() - ts
                tokens_seen += rec["tokens"]
                rec.update(step=step + 1, tok_per_s=round(rec["tokens"] / dt, 1),
                           **{**snapshot(run.device), **run.peaks.summary()})  # (run-wide peaks, not the phase's)
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
                    saved_at = done
                if tcfg.early_stopping and bad_evals >= tcfg.early_stopping:
                    bar.note(f"early stopping: validation loss did not improve for {bad_evals} evaluations")
                    break
                if done != tcfg.steps and stop_asked(stop):
                    if saved_at != done:
                        checkpoint(done)
                    raise Stopped(done, stop.signum or signal.SIGTERM,
                                  checkpoint_path(run.out_dir, done) if main_proc else None)
            bar.close()
            final = step + 1 if tcfg.steps > run.start_step else run.start_step
            if final > run.start_step:  # (a resumed finished run already validated and saved its last step)
                if "val_loss" not in last and run.val_ds is not None and len(run.val_ds):
                    last.update(validate(run))
                    log.log({"step": final, **{k: v for k, v in last.items() if k.startswith("val_")}})
                checkpoint(final)
        except torch.OutOfMemoryError:
            raise SystemExit(f"codetune train: {explain_oom(run.cfgs, run.device)}") from None
        finally:
            bar.close()
            log.close()
    elapsed = time.perf_counter() - t0
    whole = totals()
    bank = graph_bank(run.model)  # model/graphs.py: did the layers run as CUDA graphs?
    graphs = {"captured": bank.captured, "failure": bank.failure} if bank is not None else None
    val = last["val_loss"] if "val_loss" in last else log.last("val_loss", final)
    return {"steps": final, "tokens": whole["tokens"], "seconds": round(whole["seconds"], 1),
            "tok_per_s": round(whole["tokens"] / max(whole["seconds"], 1e-9), 1),
            "this_session": {"from_step": run.start_step, "steps": final - run.start_step, "tokens": tokens_seen,
                             "seconds": round(elapsed, 1)},
            "final_loss": last.get("loss", log.last("loss")), "val_loss": val, "cuda_graphs": graphs,
            **snapshot(run.device), **run.peaks.summary()}


def finish(run: Run, summary: dict) -> None:
    from codetune.atomic import write_text
    from codetune.metrics import plot_losses
    from codetune.train.distributed import whole_parameters

    with whole_parameters(run.loss_fn):  # (FSDP2: all gather; the adapter is written once)
        if run.accelerator.is_main_process:
            write_adapter(run, run.out_dir / "adapter")
    if not run.accelerator.is_main_process:
        return
    png = plot_losses(run.out_dir / "metrics.jsonl", run.out_dir / "loss.png")
    summary = {**summary, "adapter": str(run.out_dir / "adapter"), "loss_plot": str(png) if png else None,
               "trainable_params": run.run_info["trainable_params"]}
    write_text(run.out_dir / "summary.json", json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


def main(cfgs: dict) -> dict:
    from codetune.train.rundir import check_out_dir, claim, write_config
    from codetune.train.state import remove_leftovers

    tcfg = cfgs["train"]
    check_out_dir(tcfg.out_dir, tcfg.resume)  # reads only, before anything heavy is built
    run = setup(cfgs)
    if tcfg.dry_run:
        from codetune.train.progress import dry_run_report

        maybe_resume(run)  # (reads the checkpoint: a resume that would be refused is refused now)
        return dry_run_report(run)
    with contextlib.ExitStack() as held:
        if run.accelerator.is_main_process:
            held.enter_context(claim(run.out_dir))  # (held to the end: no second run writes here meanwhile)
            for p in remove_leftovers(run.out_dir):
                print(f"codetune train: removed {p}, left by an interrupted save", file=sys.stderr)
        run.accelerator.wait_for_everyone()
        maybe_resume(run)
        if run.accelerator.is_main_process:
            write_config(run.out_dir, run.cfgs)
        summary = fit(run)
        finish(run, summary)
    return summary


def run(cfgs: dict, ns) -> int:
    from codetune.train.launch import exit_recorder, launch, launched

    if (cfgs["train"].num_gpus or 1) > 1 and not launched():
        return launch(cfgs, ns)
    with exit_recorder() as record:  # (a launched worker: the code it ends with is the command's)
        code = _run(cfgs, ns)
        record(code)
    return code


def _run(cfgs: dict, ns) -> int:
    from codetune.train.interrupt import Stopped
    from codetune.train.rundir import resume_command
    from codetune.train.state import Diverged

    note = configure_allocator()  # before anything touches CUDA
    if note:
        print(f"codetune train: {note}", file=sys.stderr)
    try:
        main(cfgs)
    except Diverged as e:
        print(f"codetune train: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        if e.checkpoint is not None:  # (the main process; the others stop quietly)
            print(f"codetune train: stopped at step {e.step} ({signal.Signals(e.signum).name}); checkpoint "
                  f"{e.checkpoint}. Continue with:\n  {resume_command(ns, Path(cfgs['train'].out_dir))}",
                  file=sys.stderr)
        return 128 + int(e.signum)
    return 0
