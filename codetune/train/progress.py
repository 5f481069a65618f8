"""The training progress bar: loss, learning rate, tokens/s, GPU memory (allocated / reserved), ETA.
Off a terminal (CI logs) it prints a plain line every 10% instead of redrawing. Also what `train --dry-run`
prints in place of training."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.bar = None
        self._every = max(1, total // 10)
        if self.live:
            self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task("train", total=total, completed=start, stats="")
            self.bar.start()

    @staticmethod
    def _stats(rec: dict) -> str:
        loss = f"loss {rec['loss']:.4f}" if "loss" in rec else "skipped (no target token)"
        parts = [loss, f"lr {rec['lr']:.2e}", f"{rec.get('tok_per_s', 0):,.0f} tok/s"]
        if "val_loss" in rec:
            parts.append(f"val {rec['val_loss']:.4f}")
        if "alloc_gib" in rec:
            parts.append(f"mem {rec['alloc_gib']:.2f}/{rec['reserved_gib']:.2f} GiB")
        return "  ".join(parts)

    def update(self, rec: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=rec["step"], stats=self._stats(rec))
        elif rec["step"] % self._every == 0 or rec["step"] == self.total or "val_loss" in rec:
            print(f"step {rec['step']}/{self.total}  {self._stats(rec)}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def dry_run_report(run) -> dict:
    """--dry-run: setup() built data, model and optimizer (and the resume was checked); print the memory
    plan and what would run. Nothing is trained or written."""
    from codetune.plan.memory import estimate
    from codetune.plan.planner import gpu_memory, render

    if not run.accelerator.is_main_process:
        return {"dry_run": True}
    tcfg, console = run.cfgs["train"], Console(stderr=True)
    gpu_bytes = gpu_memory(None)
    render(console, run.cfgs, estimate(run.cfgs, gpu_bytes), gpu_bytes)
    if run.device.type != "cuda":
        console.print("(this run is on the CPU: the plan is for a GPU of the planner's default size)")
    info = {"dry_run": True, "device": str(run.device), "out_dir": str(run.out_dir),
            "train_sequences": len(run.train_stream.ds), "val_sequences": len(run.val_ds) if run.val_ds is not None else 0,
            "trainable_params": run.run_info["trainable_params"], "total_params": run.run_info["total_params"],
            "optimizer": type(run.optimizer).__name__, "from_step": run.start_step, "steps": tcfg.steps}
    console.print(f"dry run: data, model and optimizer built; would train steps {run.start_step + 1}-{tcfg.steps} "
                  f"into {run.out_dir}. No step ran and nothing was written.")
    print(json.dumps(info, indent=1))
    return info
