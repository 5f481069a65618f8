"""`codetune plan`: will these settings fit my card? Prints the predicted memory per component and, when
it does not fit, the settings changes that would (in the order that costs the least quality or speed).

Exit codes: 0 the settings fit; 1 they don't, but a suggested change does; 3 nothing tried fits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from codetune.config import parse_size
from codetune.plan.memory import CUDA_CONTEXT, Breakdown, GiB, estimate, model_shape

DEFAULT_GPU = "10GiB"  # an RTX 3080, the card the project targets
MIN_SEQ_LEN = 512

CLI_FLAGS = [
    (("--gpu-memory",), dict(default=None, metavar="SIZE",
                             help="memory of the card to plan for, e.g. 10GiB or 24GB "
                                  f"(default: this machine's GPU, else {DEFAULT_GPU})")),
]


@dataclass
class Suggestion:
    flags: str           # what to pass to `codetune train`, cumulative over earlier suggestions
    cfgs: dict
    breakdown: Breakdown
    fits: bool


def gpu_memory(text: str | None) -> int:
    if text:
        return parse_size(text)
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return parse_size(DEFAULT_GPU)


def _with(cfgs: dict, section: str, **changes) -> dict:
    return {**cfgs, section: dataclasses.replace(cfgs[section], **changes)}


def _changes(cfgs: dict):
    """(flags, cfgs) steps, each applied on top of the previous one, cheapest loss first."""
    model, adapter, data, train = cfgs["model"], cfgs["adapter"], cfgs["data"], cfgs["train"]
    flags: list[str] = []
    if not train.grad_checkpointing or train.offload_activations == "off":
        flags.append("--grad-checkpointing --offload-activations on")
        cfgs = _with(cfgs, "train", grad_checkpointing=True, offload_activations="on")
        yield " ".join(flags), cfgs
    if model.precision not in ("auto", "nf4") or adapter.method == "full":
        step = "--precision nf4" + (" --method lora" if adapter.method == "full" else "")
        flags.append(step)
        cfgs = _with(_with(cfgs, "model", precision="nf4"), "adapter", method="lora")
        yield " ".join(flags), cfgs
    layers = model_shape(model.model).layers
    current = adapter.last_n_layers() or layers
    tried = None
    for n in sorted({max(1, layers // d) for d in (2, 4, 8)}, reverse=True):
        if n < current:  # the frozen prefix keeps no activations and needs no gradients
            tried = _with(cfgs, "adapter", train_layers=f"last:{n}")
            yield " ".join(flags + [f"--train-layers last:{n}"]), tried
    if tried is not None:  # go on from a quarter of the layers: fewer trains too little
        n = max(1, layers // 4) if layers // 4 < current else current
        cfgs = _with(cfgs, "adapter", train_layers=f"last:{n}")
        flags.append(f"--train-layers last:{n}")
    batch, accum = train.batch_size, train.grad_accum
    while batch > 1:  # same tokens per optimizer step
        batch, accum = batch // 2, accum * 2
        cfgs = _with(cfgs, "train", batch_size=batch, grad_accum=accum)
        yield " ".join(flags + [f"--batch-size {batch} --grad-accum {accum}"]), cfgs
    if batch != train.batch_size:
        flags.append(f"--batch-size {batch} --grad-accum {accum}")
    seq = data.seq_len
    while seq // 2 >= MIN_SEQ_LEN:
        seq //= 2
        cfgs = _with(cfgs, "data", seq_len=seq)
        yield " ".join(flags + [f"--seq-len {seq} (re-run prepare)"]), cfgs


def recommend(cfgs: dict, gpu_bytes: int) -> tuple[list[Suggestion], Suggestion | None]:
    """Try the changes in order; return those tried up to and including the first that fits (or all)."""
    tried = []
    for flags, c in _changes(cfgs):
        b = estimate(c, gpu_bytes)
        tried.append(Suggestion(flags, c, b, b.fits(gpu_bytes)))
        if tried[-1].fits:
            return tried, tried[-1]
    return tried, None


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def render(console, cfgs: dict, b: Breakdown, gpu_bytes: int) -> None:
    from rich.table import Table

    m, d, t = cfgs["model"], cfgs["data"], cfgs["train"]
    table = Table(title=f"{m.model}  {b.settings['precision']}  seq_len={d.seq_len}  batch={t.batch_size}  "
                        f"train_layers={cfgs['adapter'].train_layers}")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("what")
    for name, value in b.parts.items():
        table.add_row(name, _gib(value), b.notes.get(name, ""))
    table.add_section()
    table.add_row("peak allocated", _gib(b.peak_allocated), "loss and recompute are separate phases: the larger counts")
    table.add_row("peak reserved", _gib(b.peak_reserved), "torch's reserved (allocator overhead included)")
    table.add_row("on the card", _gib(b.on_card), f"+ {CUDA_CONTEXT / GiB:.2f} CUDA context")
    console.print(table)
    verdict = "[green]fits[/]" if b.fits(gpu_bytes) else "[red]does not fit[/]"
    console.print(f"{verdict} a {_gib(gpu_bytes)} GiB card; tokens per step: {b.tokens_per_step:,} "
                  f"(~{b.flops_per_step / 1e12:,.0f} TFLOP of matmuls)"
                  + (f"; offloaded layer inputs: {_gib(b.cpu_pinned)} GiB pinned CPU RAM" if b.cpu_pinned else ""))


def run(cfgs: dict, ns) -> int:
    from rich.console import Console

    console = Console()
    gpu_bytes = gpu_memory(getattr(ns, "gpu_memory", None))
    b = estimate(cfgs, gpu_bytes)
    render(console, cfgs, b, gpu_bytes)
    if b.fits(gpu_bytes):
        return 0
    tried, found = recommend(cfgs, gpu_bytes)
    console.print("\nsuggestions, in order (each keeps the ones before it):")
    for s in tried:
        mark = "[green]fits[/]" if s.fits else "[red]no[/]  "
        console.print(f"  {mark} {_gib(s.breakdown.on_card):>6} GiB  {s.flags}", soft_wrap=True)
    if found is None:
        console.print(f"[red]nothing tried fits {_gib(gpu_bytes)} GiB[/]: use a larger card, or "
                      "--weights-max-vram to keep part of the weights in CPU RAM")
        return 3
    console.print(f"\nrecommended: codetune train {found.flags}", soft_wrap=True)
    render(console, found.cfgs, found.breakdown, gpu_bytes)
    return 1
