"""How a run spreads over processes, through Accelerate: one Accelerator per process, the loss function
wrapped for DDP (each process holds the whole model and reduces gradients) or FSDP2 (parameters,
gradients and optimizer state sharded per decoder layer), and what saving and loading a checkpoint
must do where the tensors are sharded (train/state.py stays in one format: whole tensors).

FSDP2's rules kept here: a model and its optimizer are prepared together (their parameters become
DTensors); a sharded tensor is read whole by an all-gather every process takes part in, in the same
order, so saving under FSDP gathers on all processes and only the main one writes; loading scatters
each whole tensor back to the process's shard.
"""

from __future__ import annotations

import contextlib

import torch

from codetune.train.launch import check_processes, world_size


def mixed_precision(device: torch.device) -> str:
    """Accelerate's mixed-precision mode. With bf16 compute the weights already are bf16 (or NF4/int8
    dequantized to bf16) and the LoRA path casts its fp32 adapters itself, so autocast would only add
    casts: LayerNorm outputs in fp32, re-cast for every projection (measured: ~20% of GPU time in copies).
    fp16 compute keeps autocast + loss scaling, which fp16 needs against underflow."""
    from codetune.model.load import compute_dtype

    if device.type != "cuda":
        return "no"
    return "no" if compute_dtype(device) == torch.bfloat16 else "fp16"


def fsdp_plugin(layer_class: str | None = None):
    """FSDP2 as Accelerate builds it: each decoder layer its own shard group (so one layer's whole weights
    exist at a time), resharded after its forward, whole tensors in state dicts. The layer class is
    set once the model is built (`prepare`)."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[layer_class] if layer_class else None, reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False, activation_checkpointing=False)


def make_accelerator(tcfg):
    """This process's Accelerator: DDP over NCCL (gloo on the CPU) when launched as several processes,
    FSDP2 with --distributed fsdp (CUDA only: check_processes refuses it elsewhere)."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    check_processes(tcfg, cuda, world_size())
    plugin = fsdp_plugin() if tcfg.distributed == "fsdp" else None
    return Accelerator(mixed_precision=mixed_precision(torch.device("cuda" if cuda else "cpu")),
                       device_placement=False, cpu=not cuda, fsdp_plugin=plugin)


def sharded(model) -> bool:
    """Is the model FSDP2-sharded (its parameters DTensors)? Asked of the model itself, not of settings."""
    return bool(_fsdp_modules(model))


def prepare(accelerator, loss_fn, optimizer, model):
    """(loss_fn, optimizer) for this many processes. Under FSDP2 the optimizer object is kept (Accelerate
    swaps its parameters for the sharded ones in place; its wrapper adds nothing a step here needs)."""
    if accelerator.num_processes == 1:
        return loss_fn, optimizer
    if not accelerator.is_fsdp2:
        return accelerator.prepare_model(loss_fn, device_placement=False), optimizer
    from codetune.model.layers import decoder_layers

    accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = [type(decoder_layers(model)[0]).__name__]
    wrapped, _ = accelerator.prepare(loss_fn, optimizer)
    return wrapped, optimizer


def _fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def whole_parameters(model):
    """Inside: every parameter a whole tensor on every process (FSDP2: all-gathered; DDP, one process:
    already), so the checkpoint and PEFT's adapter writers read what they read on one GPU. All processes
    must enter it together."""
    groups = _fsdp_modules(model)
    for g in groups:
        g.unshard()
    try:
        yield
    finally:
        for g in groups:
            g.reshard()


def whole(t):
    """A DTensor's whole value (a collective: every process calls it for the same tensors in the same
    order); any other value as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with whole tensors (FSDP2: gathered on every process; elsewhere unchanged)."""
    sd = optimizer.state_dict()
    return {**sd, "state": {k: {n: whole(v) for n, v in s.items()} for k, s in sd["state"].items()}}


def like_param(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a checkpoint in the layout of parameter p: its shard under FSDP2 (every process
    read the same file, so each keeps its own slice), else on p's device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        return distribute_tensor(t.to(p.device_mesh.device_type), p.device_mesh, p.placements)
    return t.to(p.device)


def reshard_optimizer_state(optimizer) -> None:
    """After optimizer.load_state_dict of whole tensors: each moment back into its parameter's layout
    (torch casts them to the parameter's device and dtype, not to its sharding)."""
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            state = optimizer.state.get(p, {})
            for k, v in list(state.items()):
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    state[k] = like_param(v, p)


def norm_value(norm) -> float:
    """clip_grad_norm_'s total norm as a float (under FSDP2 a DTensor: its whole value)."""
    return float(whole(norm))
