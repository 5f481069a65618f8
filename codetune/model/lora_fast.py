"""One autograd node for one or several frozen linears (bf16, NF4 or int8) that read the same input,
each with an optional LoRA adapter, followed by an optional epilogue:

    y = x [W_1; ...; W_n]^T + [s_i (x A_i^T) B_i^T]_i          then  none | rotary(q, k) | silu(g) * u

Why not PEFT's forward: PEFT runs the base layer (bitsandbytes' own autograd function), clones its
output, casts the input to fp32 for the adapter, and runs two more autograd nodes — each a kernel
launch and a saved tensor. Here the quantized weights are dequantized straight to the compute dtype
into one concatenated matrix (q/k/v: one matmul instead of three; gate/up: one instead of two), the
adapters are added in place, and backward needs only x and the rank-r products x A_i^T (the base
weights are dequantized again instead of stored: they are 2-3x smaller than x at 4k tokens and free
to rebuild). The 4k training step was measured CPU-bound on launches and Python calls, which is why
the epilogues (partial rotary embedding of q and k, SwiGLU) live in the same node.

The adapter tensors stay PEFT's own parameters, so saving/loading is unchanged. Used only where it is
exact: one active adapter, no dropout, no DoRA, not merged. Anything else keeps PEFT's forward.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import torch

from codetune.model.engine_state import EngineState
from codetune.model.rotary import RotaryInputs
from codetune.model.swiglu import swiglu_backward, swiglu_forward


def weight_source(base: torch.nn.Module, nf4_kernel: bool = True):
    """A function (dtype, out=None) -> the base layer's weight as a dense (out, in) tensor. nf4_kernel=False:
    NF4 weights through bitsandbytes' own dequantization (EngineOptions.nf4_dequant)."""
    if type(base.weight).__name__ == "Params4bit":
        from codetune.model.nf4 import Nf4Weight

        return Nf4Weight(base.weight, kernel=nf4_kernel)

    def dense(dtype, out=None):
        w = dequantized_weight(base, dtype)
        return w if out is None else out.copy_(w)
    return dense


def dequantized_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) tensor in `dtype` (int8 and plain weights)."""
    w = base.weight
    kind = type(w).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).to(dtype)
    if kind == "Int8Params":
        # LLM.int8 keeps int8 rows and one fp32 scale per output row (absmax / 127)
        scb = w.SCB if getattr(w, "SCB", None) is not None else base.state.SCB
        return w.data.to(dtype) * (scb.to(dtype) / 127.0).unsqueeze(1)
    return w.to(dtype)


class LoraParts(NamedTuple):
    """One projection of a fused node: its frozen base layer and, when it has one, its LoRA adapter."""
    base: torch.nn.Module
    A: torch.Tensor | None      # (r, in), PEFT's own parameter
    B: torch.Tensor | None      # (out, r)
    scale: float                # alpha / r


class Projections:
    """The frozen part of a fused node: n weight sources, their output sizes and (frozen) biases, and the
    installation's state (engine_state.EngineState: the adapter cast cache, the NF4 dequant choice)."""

    def __init__(self, bases: list[torch.nn.Module], state: EngineState | None = None):
        self.bases = bases
        self.state = state or EngineState()
        self.sources = [weight_source(b, self.state.options.nf4_dequant == "triton") for b in bases]
        self.sizes = [int(b.out_features) for b in bases]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]  # first column of each output
        self.in_features = int(bases[0].in_features)
        self.held: tuple | bool | None = None  # see holding()
        self._bias: dict[torch.dtype, torch.Tensor | None] = {}

    def weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if isinstance(self.held, tuple) and self.held[0] == dtype:
            return self.held[1]
        if len(self.sources) == 1:
            w = self.sources[0](dtype)
        else:
            w = torch.empty(sum(self.sizes), self.in_features, dtype=dtype, device=device)
            for src, row, n in zip(self.sources, self.offsets, self.sizes):
                src(dtype, out=w[row:row + n])  # row blocks of a contiguous matrix are contiguous
        if self.held is False:  # holding, first use: keep it
            self.held = (dtype, w)
        return w

    @contextmanager
    def holding(self):
        """Keep the dequantized weight between calls inside this block (the MLP's sequence chunks use the
        same weights once per chunk: one dequantization instead of one per chunk)."""
        self.held = False
        try:
            yield
        finally:
            self.held = None

    def adapters(self, As, Bs, lora: list[int], dtype: torch.dtype):
        """(concatenated A_i, [B_i]) of the adapted projections in the compute dtype. Cached until an
        optimizer step or an in-place write changes a tensor (engine_state.AdapterCasts says how it
        knows) — each cast and the concatenation is a kernel launch, and the node runs three times per
        step (forward, recompute, backward)."""
        if As[lora[0]].is_cuda and torch.cuda.is_current_stream_capturing():
            # inside a CUDA graph (model/graphs.py) the casts are part of the graph, so every replay
            # reads the parameters' current values; a cached copy would be frozen into it
            return self._cast(As, Bs, lora, dtype)
        key = (dtype,) + tuple((As[i]._version, As[i].data_ptr(), Bs[i]._version, Bs[i].data_ptr()) for i in lora)
        return self.state.casts.get(self, key, lambda: self._cast(As, Bs, lora, dtype))

    @staticmethod
    def _cast(As, Bs, lora: list[int], dtype: torch.dtype):
        a = torch.cat([As[i] for i in lora]) if len(lora) > 1 else As[lora[0]]
        return a.to(dtype), [Bs[i].to(dtype) for i in lora]

    def bias(self, dtype: torch.dtype):
        """The concatenated biases in `dtype` (None without any), built once: lora_parts only admits
        frozen biases."""
        if dtype not in self._bias:
            bs = [b.bias for b in self.bases]
            self._bias[dtype] = None if all(b is None for b in bs) else torch.cat(
                [(b if b is not None else torch.zeros(n, device=self.bases[0].weight.device)).to(dtype)
                 for b, n in zip(bs, self.sizes)])
        return self._bias[dtype]


def holding(projections) -> ExitStack:
    """Projections.holding() of several at once."""
    stack = ExitStack()
    for p in projections:
        stack.enter_context(p.holding())
    return stack


class FusedSpec(NamedTuple):
    """What a fused node computes, besides its tensor inputs."""
    proj: Projections
    scales: list[float]               # per projection: its adapter's alpha / r (1.0 without one)
    dtype: torch.dtype                # the compute dtype
    epilogue: str                     # "none" | "rotary" | "swiglu" | "unused" (see _Fused)
    rotary: RotaryInputs | None       # with epilogue "rotary"


class _Fused(torch.autograd.Function):
    """x -> outputs; args after `spec` (a FusedSpec): A_1, B_1, ..., A_n, B_n (None where a projection has
    no adapter).

    Epilogue "unused": the caller will never read the output's values, only back-propagate through it
    (the last projection of a layer recomputed for its backward: the recomputed layer output is thrown
    away). Then the base matmul is skipped and the output is left uninitialised; x and x A^T are still
    saved, so the backward is exactly the ordinary one."""

    @staticmethod
    def forward(ctx, x, spec, *ab):
        proj, scales, dtype, epi = spec.proj, spec.scales, spec.dtype, spec.epilogue
        in_dtype, shape = x.dtype, x.shape
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            unused = epi == "unused"
            if unused:  # only the graph is wanted (see the class docstring): no matmul, no values
                y = torch.empty(x2.shape[0], sum(proj.sizes), dtype=dtype, device=x.device)
            else:
                w = proj.weight(dtype, x.device)
                y = x2 @ w.t()
                del w
                bias = proj.bias(dtype)
                if bias is not None:
                    y += bias
            As, Bs = ab[0::2], ab[1::2]
            lora = [i for i, a in enumerate(As) if a is not None]
            xa = None
            if lora:
                a_cat, b_list = proj.adapters(As, Bs, lora, dtype)
                xa = x2 @ a_cat.t()  # every adapter's x A_i^T in one matmul (backward needs it)
                r0 = 0
                for j, i in enumerate(lora):
                    r, c = As[i].shape[0], proj.offsets[i]
                    if not unused:
                        y[:, c:c + proj.sizes[i]].addmm_(xa[:, r0:r0 + r], b_list[j].t(), alpha=scales[i])
                    r0 += r
            if epi == "rotary":
                rot = spec.rotary
                rot.rotary.apply_(y, rot.cos, rot.sin, shape[0])
                outs = [o.view(*shape[:-1], o.shape[-1]) for o in y.split(proj.sizes, dim=1)]
            elif epi == "swiglu":
                outs = [swiglu_forward(y, proj.sizes[0]).view(*shape[:-1], proj.sizes[0])]
            else:
                outs = [y.view(*shape[:-1], y.shape[-1])]
        ctx.save_for_backward(x2, xa, *ab, y if epi == "swiglu" else None)
        ctx.spec, ctx.lora, ctx.in_dtype, ctx.shape = spec, lora, in_dtype, shape
        return tuple(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        spec = ctx.spec
        proj, scales, dtype, epi = spec.proj, spec.scales, spec.dtype, spec.epilogue
        x2, xa, *ab, y = ctx.saved_tensors
        As, Bs = ab[0::2], ab[1::2]
        n_rows = x2.shape[0]
        with torch.autocast(x2.device.type, enabled=False):
            # the output gradient as column blocks [(tensor, first column)], never concatenated
            if epi == "swiglu":
                # dg|du are written over the saved gate|up output, which nothing reads after this
                blocks = [(swiglu_backward(y, grads[0].reshape(n_rows, -1).to(dtype), proj.sizes[0], out=y), 0)]
            else:
                blocks = [(torch.zeros(n_rows, n, dtype=dtype, device=x2.device) if d is None
                           else d.reshape(n_rows, n).to(dtype), c)
                          for d, n, c in zip(grads, proj.sizes, proj.offsets)]
                if epi == "rotary":
                    # in place on dq and dk: each is attention's own gradient buffer, read by nothing else
                    rot = spec.rotary
                    blocks[:2] = [(t if t.stride(1) == 1 else t.contiguous(), c) for t, c in blocks[:2]]
                    rot.rotary.apply_qk_(blocks[0][0], blocks[1][0], rot.cos, rot.sin, ctx.shape[0], inverse=True)

            def dy_of(i: int) -> torch.Tensor:  # projection i's columns of the output gradient
                c = proj.offsets[i]
                for blk, c0 in blocks:
                    if c0 <= c < c0 + blk.shape[1]:
                        return blk[:, c - c0:c - c0 + proj.sizes[i]]
                raise AssertionError(c)

            dx = None
            lora = ctx.lora
            if lora:
                a_cat, b_list = proj.adapters(As, Bs, lora, dtype)
                dyb = [dy_of(i) @ b_list[j] for j, i in enumerate(lora)]
                dyb = dyb[0] if len(dyb) == 1 else torch.cat(dyb, dim=1)
                svec = [scales[i] for i in lora for _ in range(As[i].shape[0])]
                # the scale s goes into the rank-r factors once (s = alpha/r is a power of two by default)
                s_t = svec[0] if len(set(svec)) == 1 else torch.tensor(svec, dtype=dtype, device=dyb.device)
                sdyb, sxa = dyb * s_t, xa * s_t
            if ctx.needs_input_grad[0]:
                w = proj.weight(dtype, x2.device)
                for blk, c0 in blocks:  # dx = sum over blocks of dy_block @ W_block
                    wb = w[c0:c0 + blk.shape[1]]
                    dx = blk @ wb if dx is None else dx.addmm_(blk, wb)
                del w
                if lora:
                    dx.addmm_(sdyb, a_cat)
                dx = dx.view(ctx.shape).to(ctx.in_dtype)
            out = [None] * (2 * len(As))
            if lora:
                dA = sdyb.t() @ x2  # (sum r, in): every adapter's A gradient in one matmul
                r0 = 0
                for i in lora:
                    r = As[i].shape[0]
                    if ctx.needs_input_grad[2 + 2 * i]:
                        out[2 * i] = dA[r0:r0 + r].to(As[i].dtype)
                    if ctx.needs_input_grad[3 + 2 * i]:
                        out[2 * i + 1] = (dy_of(i).t() @ sxa[:, r0:r0 + r]).to(Bs[i].dtype)
                    r0 += r
        return (dx, None, *out)


def lora_parts(module) -> LoraParts | None:
    """The LoraParts of a PEFT LoRA linear on the fast path (A, B None for a frozen plain linear); None when
    the fast path would not be exact."""
    if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
        if getattr(module, "disable_adapters", False) or not _fast_eligible(module):
            return None
        name = module.active_adapters[0]
        base = module.base_layer
        parts = LoraParts(base, module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]))
    elif hasattr(module, "weight") and hasattr(module, "in_features") and not hasattr(module, "lora_A"):
        base = module
        parts = LoraParts(module, None, None, 1.0)
    else:
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None  # fully trained weights take the ordinary autograd path
    if hasattr(base, "_hf_hook"):  # weights streamed in by Accelerate's offload hooks
        return None
    return parts


def fused(x: torch.Tensor, proj: Projections, parts: list[LoraParts], dtype: torch.dtype, epilogue: str = "none",
          rotary: RotaryInputs | None = None):
    """Run the fused node; parts[i] = lora_parts(...) of projection i."""
    ab = []
    for p in parts:
        ab += [p.A, p.B]
    return _Fused.apply(x, FusedSpec(proj, [p.scale for p in parts], dtype, epilogue, rotary), *ab)


def compute_dtype_of(x: torch.Tensor) -> torch.dtype:
    """autocast's dtype when it is on (fp16 GPUs), else the activations' own (bf16, or fp32)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _fast_eligible(module) -> bool:
    active = getattr(module, "active_adapters", None)
    if not active or len(active) != 1 or getattr(module, "merged", False):
        return False
    name = active[0]
    if name not in module.lora_A or module.use_dora.get(name, False):
        return False
    drop = module.lora_dropout[name]
    return isinstance(drop, torch.nn.Identity) or getattr(drop, "p", 1.0) == 0.0


class FastLoRAForward:
    """Replaces one PEFT LoRA layer's forward (instance attribute). Falls back to PEFT's own forward
    whenever the fast path would not be exact (adapter disabled/merged, several adapters, dropout)."""

    def __init__(self, module, state: EngineState):
        self.m = module
        self.original = type(module).forward.__get__(module)
        self.proj = Projections([module.base_layer], state)

    def __call__(self, x, *args, **kwargs):
        parts = None if (args or kwargs) else lora_parts(self.m)
        if parts is None:
            return self.original(x, *args, **kwargs)
        return fused(x, self.proj, [parts], compute_dtype_of(x))


def install_fast_lora(model, state: EngineState | None = None) -> int:
    """Swap the forward of every eligible PEFT LoRA linear; returns how many were swapped. `state`: the
    installation's (train/recipe.build_model shares one with install_layer_runners); a new one if None."""
    state = state or EngineState()
    n = 0
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "scaling"):
            if isinstance(module.__dict__.get("forward"), FastLoRAForward):
                continue
            if not _fast_eligible(module):
                continue
            module.forward = FastLoRAForward(module, state)
            n += 1
    return n


def uninstall_fast_lora(model) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), FastLoRAForward):
            del module.forward
