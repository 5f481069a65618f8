"""The frozen input-embedding table in CPU RAM while training.

Why: a lookup reads one row per token, yet the table (stable-code-3b: 50,304 x 2,560 bf16 = 246 MiB) sits
on the GPU for the whole run — about a tenth of a 2k-token QLoRA step's peak. Looked up on the CPU, only
the rows for this micro-batch cross PCIe (10 MiB at 2k tokens, 80 MiB at 16k), from a pinned buffer, once
per forward. The result is bit-identical: the same rows of the same bf16 table.

When it applies: the table is frozen (LoRA targets linears; `full` and trained embeddings keep it on the
GPU), not shared with the output layer (tied weights must stay where lm_head runs), a plain
`nn.Embedding` without max_norm, on CUDA, in one process (DDP and FSDP expect every parameter on the
process's GPU). Anything else: the table stays where it is.

Costs: reading the ids back to the CPU waits for the GPU, at the start of each micro-batch only — where
`train_step` has already synchronised on the previous step's loss — and a CPU gather of the rows
(~1 ms at 2k tokens). The swap is an instance attribute on the one embedding module (like
model/layers.py's runners), undone by `restore_input_embeddings`.
"""

from __future__ import annotations

import torch

from codetune.model.graphs import single_process


class CpuEmbedding:
    """Replaces one nn.Embedding's forward: gather on the CPU into a pinned buffer, copy to `device`."""

    def __init__(self, module: torch.nn.Embedding, device: torch.device):
        self.module, self.device = module, device
        self.buf: torch.Tensor | None = None
        self.copied: torch.cuda.Event | None = None  # the last copy out of `buf`

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.module.weight
        cuda = self.device.type == "cuda"
        flat = ids.reshape(-1).to("cpu")
        if self.copied is not None:
            self.copied.synchronize()  # the previous micro-batch's copy has read the buffer
        n = flat.numel()
        if self.buf is None or self.buf.shape[0] < n or self.buf.dtype != w.dtype:
            self.buf = torch.empty(n, w.shape[1], dtype=w.dtype, pin_memory=cuda)
        rows = self.buf[:n]
        torch.index_select(w, 0, flat, out=rows)
        out = rows.to(self.device, non_blocking=True) if cuda else rows.clone()
        if cuda:
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(self.device))  # (the stream the copy went on)
        return out.view(*ids.shape, w.shape[1])


def why_it_stays(model) -> str | None:
    """Why the input-embedding table must stay on the GPU (None: it may move). Device aside."""
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    w = getattr(emb, "weight", None)
    if type(emb) is not torch.nn.Embedding or w is None or emb.max_norm is not None:
        return "not a plain nn.Embedding"
    if w.requires_grad:
        return "it trains"
    if "forward" in emb.__dict__:
        return "its forward is already swapped (an offload hook, or moved before)"
    if out is not None and getattr(out, "weight", None) is not None and out.weight.data_ptr() == w.data_ptr():
        return "tied to the output layer"
    if not single_process():
        return "several processes (DDP/FSDP keep every parameter on the GPU)"
    return None


def offload_input_embeddings(model) -> bool:
    """Move the model's input-embedding table to CPU RAM where that is exact and allowed (see the module
    docstring). Returns whether it moved."""
    emb = model.get_input_embeddings()
    if why_it_stays(model) is not None or not emb.weight.is_cuda:
        return False
    device = emb.weight.device
    emb.weight.data = emb.weight.data.to("cpu")
    emb.forward = CpuEmbedding(emb, device)
    torch.cuda.empty_cache()  # give the table's old block back, so it doesn't stay reserved
    return True


def restore_input_embeddings(model) -> None:
    emb = model.get_input_embeddings()
    runner = emb.__dict__.get("forward")
    if isinstance(runner, CpuEmbedding):
        del emb.forward
        emb.weight.data = emb.weight.data.to(runner.device)
