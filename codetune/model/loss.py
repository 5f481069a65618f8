"""Cross-entropy fused with the output projection, in chunks, so full-vocabulary fp32 logits never
exist: at 16k tokens they would be 16,384 x 50,304 x 4 B = 3.1 GiB, plus as much again for their
gradient. Each chunk's logits are made, turned into the loss and into the gradient for the hidden
states in the same pass, and dropped. Backward is then a scale of the stored gradient — no recompute.

The loss comes back as a SUM over target tokens; the caller divides by the target count of the whole
optimizer step (all micro-steps, all processes), which is what makes gradient accumulation exact.
"""

from __future__ import annotations

import torch

IGNORE = -100
LOGIT_CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk (333 rows of a 50k vocab): the largest transient of a short step


def chunk_rows(vocab: int) -> int:
    return max(64, min(8192, LOGIT_CHUNK_BYTES // (4 * vocab)))


def _loss_and_grads(hidden, weight, labels, rows, need_h, need_w):
    """(summed loss, d loss/d hidden or None, d loss/d weight or None), one chunk of rows at a time."""
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    # Compute in the weight's width: under CUDA autocast the final LayerNorm hands us fp32 hidden
    # states, and casting the 50k-row head up to match them would copy 0.5 GiB per chunk.
    cdt = weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else hidden.dtype
    w = weight.to(cdt)
    for s in range(0, hidden.shape[0], rows):
        h, y = hidden[s:s + rows].to(cdt), labels[s:s + rows]
        valid = y != IGNORE
        logits = (h @ w.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        target = logits.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
        loss += ((lse - target) * valid).sum()
        if need_h or need_w:
            probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            probs[torch.arange(len(y), device=y.device), y.clamp(min=0)] -= 1.0
            probs.mul_(valid.unsqueeze(1))
            g = probs.to(cdt)
            if need_h:
                grad_h[s:s + rows] = g @ w
            if need_w:
                grad_w += g.t().float() @ h.float()
            del probs, g
        del logits
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, rows, graphed):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # the training step's computation replayed as a CUDA graph (model/graphs.py); also for a loss with no
        # gradient (validation), so its logits chunks stay in the graphs' pool (the unused grad_h: one matmul)
        out = graphed(hidden, labels) if (graphed is not None and not need_w) else None
        if out is not None:
            loss, grad_h, grad_w = out[0], (out[1] if need_h else None), None
        else:
            loss, grad_h, grad_w = _loss_and_grads(hidden, weight, labels, rows, need_h, need_w)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.need, ctx.w_dtype = (need_h, need_w), weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.need
        gh = saved.pop(0) if need_h else None
        gw = saved.pop(0) if need_w else None
        if gh is not None:
            gh = gh * grad_loss.to(gh.dtype)
        if gw is not None:
            gw = (gw * grad_loss).to(ctx.w_dtype)
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, graphs=None) -> torch.Tensor:
    """Sum of token cross-entropies of softmax(hidden @ weight.T) against labels (IGNORE skipped).
    hidden: (..., H), labels: (...) already aligned (labels[t] is the token after t). graphs: the model's
    model/graphs.GraphBank, to run as a CUDA graph in the layers' memory pool (frozen `weight` only)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    rows = chunk_rows(weight.shape[0])
    graphed = None
    if graphs is not None and h.is_cuda:
        graphed = graphs.call(("loss", weight.data_ptr(), rows),
                              lambda hh, yy: _loss_and_grads(hh, weight, yy, rows, True, False)[:2])
    return _LinearCrossEntropy.apply(h, weight, y, rows, graphed)


def reference_cross_entropy(hidden, weight, labels) -> torch.Tensor:
    """The plain formula, for tests: full logits, fp32."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
    return torch.nn.functional.cross_entropy(logits, labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
