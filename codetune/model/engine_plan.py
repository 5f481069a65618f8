"""Which of the training engine's fast paths a configuration runs — decided by one function.

`train/recipe.build_model` installs exactly what `engine_plan` says, and `codetune plan` (plan/memory.py)
predicts memory for exactly that, so the two cannot disagree (they once did: the planner assumed the
fused layer off under `--no-fast-lora` and `--targets attention` while the engine ran it). Each install
step still checks, per module, that its path is exact for the model in hand and steps aside where not
(model/fast_layer.fast_forward, model/embeddings.why_it_stays); this module is the policy, those are the
facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EnginePlan:
    packed_attention: bool      # model/attention.py: documents of a packed batch attend within themselves
    fused_lora: bool            # model/lora_fast.py: dequantize + matmul + LoRA in one autograd node
    fused_layers: bool          # model/fast_layer.py: the decoder layer in four fused nodes
    cuda_graphs: str            # model/graphs.py mode actually used: "off", or the configured auto/on
    cpu_embeddings: bool        # model/embeddings.py: the frozen input-embedding table in CPU RAM
    offload_activations: bool   # model/layers.py: checkpointed layer inputs in pinned CPU RAM
    why_off: dict = field(default_factory=dict)  # path -> why it is off, for the plan's notes and the run report

    def graphed(self, tokens: int) -> bool:
        """Do micro-batches of `tokens` tokens replay as CUDA graphs?"""
        from codetune.model.graphs import graphs_for

        return self.cuda_graphs != "off" and graphs_for(self.cuda_graphs, tokens)


def engine_plan(cfgs: dict, *, cuda: bool = True, processes: int = 1, weights_offloaded: bool = False,
                tied_embeddings: bool = False) -> EnginePlan:
    """The fast paths for these settings on a CUDA GPU (cuda=False: the CPU) with `processes` training
    processes, weights offloaded by Accelerate or not, and input embeddings tied to the head or not."""
    model, adapter, train = cfgs["model"], cfgs["adapter"], cfgs["train"]
    why: dict[str, str] = {}

    packed = model.attn == "sdpa"
    if not packed:
        why["packed_attention"] = f"--attn {model.attn}: transformers' own handling of packed position ids"

    fused_lora = train.fast_lora and adapter.method == "lora" and not adapter.dora and not adapter.lora_dropout \
        and not weights_offloaded
    if not fused_lora:
        why["fused_lora"] = ("--no-fast-lora" if not train.fast_lora else "method full" if adapter.method != "lora"
                             else "DoRA" if adapter.dora else "LoRA dropout" if adapter.lora_dropout
                             else "weights offloaded to CPU (Accelerate's hooks must bring each weight in)")

    # The fused layer runs the fused LoRA nodes: without them (PEFT's forward) it is off too. Under method
    # full it runs the frozen layers (the trained ones keep transformers' forward: their weights train).
    fused_layers = train.fast_layers and not weights_offloaded and (fused_lora or adapter.method == "full")
    if not fused_layers:
        why["fused_layers"] = "--no-fast-layers" if not train.fast_layers else why.get("fused_lora", "")

    graphs = train.cuda_graphs
    if graphs != "off":
        reason = ("not on a CUDA GPU" if not cuda else "the fused layers are off" if not fused_layers
                  else "--no-grad-checkpointing" if not train.grad_checkpointing
                  else f"{processes} processes (DDP/FSDP reduce gradients from hooks a graph bypasses)"
                  if processes > 1 else None)
        if reason:
            why["cuda_graphs"], graphs = reason, "off"

    trained_emb = adapter.method == "full" and adapter.train_embeddings
    cpu_emb = (train.cpu_embeddings and cuda and processes == 1 and not weights_offloaded and not tied_embeddings
               and not trained_emb)
    if train.cpu_embeddings and not cpu_emb:
        why["cpu_embeddings"] = ("not on a CUDA GPU" if not cuda else f"{processes} processes" if processes > 1
                                 else "weights offloaded to CPU" if weights_offloaded else "tied to the output head"
                                 if tied_embeddings else "the embeddings train (--train-embeddings)")

    offload = train.grad_checkpointing and (train.offload_activations == "on"
                                            or (train.offload_activations == "auto" and cuda))
    return EnginePlan(packed, fused_lora, fused_layers, graphs, cpu_emb, offload, why)
