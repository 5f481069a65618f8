"""What one micro-batch goes through on its way to a loss: the batch on the device with its packed
documents' spans (`batch_inputs`), and the model's summed token loss (`CausalLMLoss`). Used by the trainer
(train/recipe.py) and the benchmarks, so they run the same step."""

from __future__ import annotations

import torch

from codetune.model.layers import graph_bank


class CausalLMLoss(torch.nn.Module):
    """model -> summed token loss, computed from hidden states by the fused chunked cross-entropy so the
    full logits never exist. A Module (not a function) so DDP sees the forward. Where the model runs
    model/attention.py's packed attention, the batch's document spans go on to every layer."""

    def __init__(self, model):
        from codetune.model.adapters import causal_lm
        from codetune.model.attention import uses_packed_attention

        super().__init__()
        self.model = model
        self.packed = uses_packed_attention(causal_lm(model))
        self.graphs = graph_bank(model)  # model/graphs.py's bank, or None

    def forward(self, input_ids, position_ids, labels, **spans):
        from codetune.model.adapters import causal_lm
        from codetune.model.loss import linear_cross_entropy

        lm = causal_lm(self.model)
        hidden = lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                          **(spans if self.packed else {})).last_hidden_state
        return linear_cross_entropy(hidden, lm.lm_head.weight, labels, self.graphs)


def run_graphs(run):
    """The graph bank of the run's loss function (unwrapped from DDP)."""
    return getattr(getattr(run.loss_fn, "module", run.loss_fn), "graphs", None)


def batch_inputs(batch: dict, device: torch.device, graphs=None) -> dict:
    """A CPU batch as the loss function's keyword arguments on `device`: the tensors, plus the documents'
    spans (model/attention.py), computed here on the CPU so no step waits on the GPU for them; in the fixed
    shapes CUDA graphs need where the model's layers replay as graphs at this size (`graphs`: its bank)."""
    from codetune.model.attention import document_spans, spans_to

    static = graphs is not None and graphs.graphed(batch["input_ids"].numel())
    spans = spans_to(document_spans(batch["position_ids"], static=static), device)
    return {**{k: v.to(device, non_blocking=True) for k, v in batch.items()}, **spans}
