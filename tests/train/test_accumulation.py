"""Gradient accumulation must equal one big batch even when micro-batches hold different numbers of
target tokens (the bug where each micro-batch's mean is averaged, over-weighting short ones)."""

from types import SimpleNamespace

import torch

from codetune.config import build
from codetune.model.adapters import apply_adapters
from codetune.model.load import load_model
from codetune.train.inputs import CausalLMLoss
from codetune.train.memory import PeakMeter
from codetune.train.recipe import train_step


class RecordingOptimizer:
    def __init__(self, params):
        self.param_groups = [{"params": list(params)}]
        self.grads = None

    def step(self):
        self.grads = [p.grad.clone() for p in self.param_groups[0]["params"]]

    def zero_grad(self, set_to_none=True):
        for p in self.param_groups[0]["params"]:
            p.grad = None


class Acc:
    num_processes = 1

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def backward(self, loss):
        loss.backward()


def _batch(ids, n_targets):
    labels = torch.full_like(ids, -100)
    labels[:, :n_targets] = ids[:, 1:n_targets + 1]
    return {"input_ids": ids, "position_ids": torch.arange(ids.shape[1])[None].expand_as(ids), "labels": labels}


def _run(model, batches, grad_accum, batch_size):
    cfgs = build(["train"], flags={"train.grad_accum": grad_accum, "train.batch_size": batch_size,
                                   "train.max_grad_norm": 0.0})
    opt = RecordingOptimizer(p for p in model.parameters() if p.requires_grad)
    sched = SimpleNamespace(step=lambda: None, get_last_lr=lambda: [0.0])
    stream = SimpleNamespace(batch=lambda k: batches[k])
    run = SimpleNamespace(cfgs=cfgs, peaks=PeakMeter(torch.device("cpu")), accelerator=Acc(), device=torch.device("cpu"), loss_fn=CausalLMLoss(model),
                          optimizer=opt, scheduler=sched, train_stream=stream)
    rec = train_step(run, 0)
    return rec, opt.grads


def test_accumulated_gradient_equals_one_batch_with_uneven_targets():
    base, _ = load_model(build(["model"], flags={"model.random_init": True})["model"], torch.device("cpu"), vocab_size=256)
    model = apply_adapters(base, build(["adapter"])["adapter"])
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 256, (1, 40), generator=g), torch.randint(0, 256, (1, 40), generator=g)
    ba, bb = _batch(a, 30), _batch(b, 3)
    rec_acc, g_acc = _run(model, [ba, bb], grad_accum=2, batch_size=1)
    both = {k: torch.cat([ba[k], bb[k]]) for k in ba}
    rec_one, g_one = _run(model, [both], grad_accum=1, batch_size=2)
    assert rec_acc["tokens"] == rec_one["tokens"] == 33
    assert abs(rec_acc["loss"] - rec_one["loss"]) < 1e-5
    for x, y in zip(g_acc, g_one):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_a_step_without_target_tokens_is_skipped_and_the_schedule_moves_on():
    """Every micro-batch all prompt (labels all IGNORE): no forward, no optimizer step (weight decay and
    AdamW's momentum would still move the weights), no loss in the record; the learning-rate schedule
    advances as it would have, so the steps after it are where they would be."""
    base, _ = load_model(build(["model"], flags={"model.random_init": True})["model"], torch.device("cpu"), vocab_size=256)
    model = apply_adapters(base, build(["adapter"])["adapter"])
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    empty = _batch(ids, 0)
    assert (empty["labels"] == -100).all()
    sched_steps = []
    cfgs = build(["train"], flags={"train.grad_accum": 2, "train.batch_size": 1, "train.max_grad_norm": 0.0})
    opt = RecordingOptimizer(p for p in model.parameters() if p.requires_grad)
    sched = SimpleNamespace(step=lambda: sched_steps.append(1), get_last_lr=lambda: [1e-4])
    calls = []

    def loss_fn(**kw):
        calls.append(kw)
        return CausalLMLoss(model)(**kw)

    run = SimpleNamespace(cfgs=cfgs, peaks=PeakMeter(torch.device("cpu")), accelerator=Acc(), device=torch.device("cpu"),
                          loss_fn=loss_fn, optimizer=opt, scheduler=sched,
                          train_stream=SimpleNamespace(batch=lambda k: empty))
    rec = train_step(run, 0)
    assert "loss" not in rec and rec["tokens"] == 0 and rec["skipped"]
    assert calls == [] and opt.grads is None and sched_steps == [1]
    run.train_stream = SimpleNamespace(batch=lambda k: _batch(ids, 5))  # a batch with targets steps as before
    rec = train_step(run, 1)
    assert rec["tokens"] == 10 and rec["loss"] > 0 and opt.grads is not None and sched_steps == [1, 1]
