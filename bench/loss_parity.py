"""Loss parity (performance issue, target 7): the HF + PEFT + bitsandbytes recipe and codetune, same
initial weights (the shared random-init checkpoint), same LoRA init (seed 0 right before get_peft_model
in both), same batches of real code, same optimizer (AdamW lr 1e-4, weight decay 0.01 — torch's default
that the peer script uses), N steps each. Prints one JSON line with both curves and their distance.

Usage (GPU machine, after bench/run_gpu.sh has set PEER_CKPT and PYTHONPATH):
  python3 bench/loss_parity.py --tokenizer tokenizers/gpt-neox-20b.json --peers .bench-peers [--steps 200]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def code_batches(tok_path: str, seq: int, n: int) -> list:
    """n sequences of `seq` tokens of this machine's standard library, GPT-NeoX tokenized, in file order."""
    import torch
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(tok_path)
    ids: list[int] = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids += tk.encode(f.read_text(errors="replace")).ids + [0]
        if len(ids) >= seq * n:
            break
    return [torch.tensor(ids[i * seq:(i + 1) * seq])[None] for i in range(n)]


def run_hf(peer, batches, lr: float) -> list[float]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(peer.load("nf4"), use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=peer.TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    losses = []
    for ids in batches:
        ids = ids.cuda()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return losses


def run_codetune(batches, lr: float) -> list[float]:
    from types import SimpleNamespace

    import torch

    from codetune.config import build
    from codetune.train import recipe
    from codetune.train.memory import PeakMeter
    from codetune.train.optim import build_optimizer, build_scheduler

    flags = {"model.model": "stable-code-3b", "model.random_init": True, "model.precision": "nf4",
             "adapter.rank": 16, "adapter.alpha": 32.0, "data.seq_len": batches[0].shape[1], "train.lr": lr,
             "train.warmup_steps": 0, "train.schedule": "constant", "train.max_grad_norm": 0.0,
             "train.weight_decay": 0.01, "train.steps": len(batches)}
    cfgs = build(["model", "adapter", "data", "train"], flags=flags)
    device = torch.device("cuda")
    model, _ = recipe.build_model(cfgs, device, 50304)
    opt = build_optimizer(model, cfgs["train"], device)
    items = []
    for ids in batches:
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        items.append({"input_ids": ids, "position_ids": torch.arange(ids.shape[1])[None], "labels": labels})
    run = SimpleNamespace(cfgs=cfgs, peaks=PeakMeter(device), accelerator=SimpleNamespace(
        num_processes=1, autocast=lambda: torch.autocast("cuda", enabled=False), backward=lambda x: x.backward()),
        device=device, loss_fn=recipe.CausalLMLoss(model), optimizer=opt, scheduler=build_scheduler(opt, cfgs["train"]),
        train_stream=SimpleNamespace(batch=lambda k: items[k]))
    return [recipe.train_step(run, k)["loss"] for k in range(len(items))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--peers", required=True, help="folder holding peer_qlora_baseline.py")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--reference", help="JSON with an earlier HF curve ({'loss_parity': {'hf': [...]}}) measured "
                                        "by this script on the same GPU model: skips re-running the slow peer")
    a = ap.parse_args()
    sys.path.insert(0, a.peers)

    batches = code_batches(a.tokenizer, a.seq, a.steps)
    ours = run_codetune(batches, a.lr)  # builds the shared random-init checkpoint the peer then loads
    if a.reference:
        ref = json.loads(Path(a.reference).read_text())["loss_parity"]
        if (ref["steps"], ref["seq"]) != (a.steps, a.seq):
            raise SystemExit(f"--reference has steps={ref['steps']} seq={ref['seq']}, not {a.steps}/{a.seq}")
        theirs = ref["hf"]
    else:
        import peer_qlora_baseline as peer

        theirs = run_hf(peer, batches, a.lr)
    rel = [abs(x - y) / abs(y) for x, y in zip(ours, theirs)]
    print(json.dumps({"check": "loss-parity", "steps": a.steps, "seq": a.seq, "hf_from": a.reference or "this run",
                      "max_rel_diff": max(rel),
                      "mean_rel_diff": sum(rel) / len(rel), "codetune": ours, "hf": theirs}))


if __name__ == "__main__":
    main()
