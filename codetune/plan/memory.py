"""An analytic model of the GPU memory one training step of `codetune train` needs, term by term.

Parameter terms (weights, adapters, gradients, optimizer states) are exact byte counts of the tensors
the engine creates (tests check them against PEFT and bitsandbytes). Activation terms follow what
autograd saves in one decoder layer with bf16 compute (no autocast: see train/distributed.py
mixed_precision); measured on StableLM, and assumed the same for Qwen2 (its RMSNorm saves about what
LayerNorm does; not measured on a GPU yet); they are estimates whose named constants below are
calibrated against the measured peaks in bench/results/ (docs/memory.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from codetune import registry
from codetune.config import ConfigError
from codetune.model import arch as archs
from codetune.model.engine_plan import engine_plan

MiB, GiB = 2**20, 2**30

# --- weights -------------------------------------------------------------------------------------
NF4_BLOCK = 64              # bitsandbytes 4-bit blocksize: one absmax per 64 weights ...
NF4_NESTED_BLOCK = 256      # ... stored as uint8 (double quant) with one fp32 scale per 256 blocks
NF4_FIXED_BYTES = 256 * 4 + 16 * 4 + 4  # per weight: nested 8-bit code, NF4 code (fp32), offset
# --- optimizer -----------------------------------------------------------------------------------
OPT8_BLOCK = 256            # bitsandbytes 8-bit optimizer: one fp32 absmax per 256 values and state
OPT8_MIN_SIZE = 4096        # smaller tensors keep 32-bit states
# --- activations ---------------------------------------------------------------------------------
LN_SAVED_BYTES = 2       # LayerNorm saves its bf16 input (no autocast, so no fp32 copy)
OFFLOAD_IN_FLIGHT = 2       # offloaded layer inputs on the GPU at once (current + prefetched)
BWD_WIDE_GRADS = 3          # tokens x intermediate gradients alive together in the MLP's backward
BWD_HIDDEN_GRADS = 2        # tokens x hidden gradients into and out of the layer
# Packed documents: transformers sees position_ids restart and, for sdpa/eager, builds a dense
# (batch, 1, seq, seq) bool mask. SDPA then cannot use flash: it converts the mask to an additive bf16
# bias, which the memory-efficient kernel saves for backward. flash_attention_2 (varlen) and
# flex_attention (block mask) have no seq x seq tensor.
MASK_BYTES = 1              # bool mask, alive for the whole step
SDPA_BIAS_BYTES = 2         # the bias made from it, saved by the recomputed layer's attention
EAGER_SCORE_BYTES = 4 + 2   # eager attention: fp32 softmax output + its bf16 copy, per head
# The fused layer (model/fast_layer.py) recomputed for its backward, per token, measured at the peak of
# 8k and 16k steps on an H200 (bench/memory_peak.py, bench/results/raw/s4b.*). It peaks in attention's
# backward, which holds dq|dk|dv, flash's fp32 dq accumulator, the output gradient twice (as given and
# made contiguous) and fp32 softmax sums per head.
def attn_backward_bytes(h: int, kv: int, heads: int, elem: int = 2) -> int:
    return elem * (h + 2 * kv) + 4 * h + 2 * elem * h + 4 * heads


# --- overheads -----------------------------------------------------------------------------------
CUBLAS_WORKSPACE = 32 * MiB  # cuBLAS workspace, allocated through torch's caching allocator
# The three below are calibrated against the 15 measured `codetune train` runs that tests/plan/test_real_runs.py
# holds the planner to (its RECORDS; docs/memory.md says how to re-measure).
# Small allocations no term above names (RNG state, autograd bookkeeping, kernels' scratch): the measured
# allocated peak exceeds the named terms by about this much in every configuration, graphed or eager.
UNTRACKED_ALLOC = 64 * MiB
# A CUDA-graphed step's graph pool holds a little more than its residual-stream buffers (the capture
# stream's own workspaces, the pool's block rounding).
GRAPH_POOL_EXTRA = 64 * MiB
# torch's reserved minus allocated at the peak (expandable_segments): a roughly constant amount, not a share
# of the allocated — 6 GiB of bf16 weights, allocated once and never freed, add almost nothing to it.
ALLOCATOR_SLACK = 256 * MiB
CUDA_CONTEXT = 500 * MiB     # CUDA context + kernels: NOT in torch's numbers, but on the card

WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "nf4": 2, "int8": 2}  # non-linear params (nf4/int8: bf16)


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder that memory depends on (the family's facts: model/arch/ ShapeFacts)."""
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    qkv_bias: bool = False
    tied: bool = False
    norm_tensors: int = 2  # per norm: LayerNorm's weight and bias (StableLM), RMSNorm's weight alone (Qwen2)

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """Per decoder layer: module name -> (in_features, out_features, has_bias)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * (self.hidden // self.heads)
        b = self.qkv_bias
        return {"q_proj": (h, h, b), "k_proj": (h, kv, b), "v_proj": (h, kv, b), "o_proj": (h, h, False),
                "gate_proj": (h, i, False), "up_proj": (h, i, False), "down_proj": (i, h, False)}

    def layer_other_params(self) -> int:
        return 2 * self.norm_tensors * self.hidden  # two norms

    def outside_params(self) -> int:
        """Embedding, final norm and lm_head (one table when tied): never quantized."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.norm_tensors * self.hidden

    def total_params(self) -> int:
        per_layer = sum(i * o + (o if b else 0) for i, o, b in self.linears().values()) + self.layer_other_params()
        return self.layers * per_layer + self.outside_params()


def model_shape(model: str) -> Shape:
    """A registry name, a local model directory or a hub id already in the local cache (no network)."""
    spec = registry.lookup(model)
    if spec is not None:
        a = {**spec.arch, "model_type": spec.family_arch.model_type}
    else:
        from transformers import AutoConfig

        try:
            a = AutoConfig.from_pretrained(model, local_files_only=True).to_dict()
        except (OSError, ValueError) as e:
            raise ConfigError(f"model={model!r}: cannot read its config.json offline ({e.__class__.__name__}). "
                              f"Give a local model directory, a hub id already in the Hugging Face cache, "
                              f"or one of {list(registry.MODELS)}") from None
    # (a family codetune does not know is read as StableLM's, as every model was before there were families)
    facts = (archs.by_model_type(a.get("model_type")) or archs.by_family(registry.DEFAULT_FAMILY)).shape_facts(a)
    return Shape(model, a["vocab_size"], a["hidden_size"], a["intermediate_size"], a["num_hidden_layers"],
                 a["num_attention_heads"], a.get("num_key_value_heads") or a["num_attention_heads"],
                 facts.qkv_bias, facts.tied, facts.norm_tensors)


def linear_weight_bytes(fin: int, fout: int, precision: str) -> int:
    """Bytes of one nn.Linear weight as bitsandbytes / torch stores it on the GPU."""
    n = fin * fout
    if precision == "nf4":
        blocks = -(-n // NF4_BLOCK)
        return -(-n // 2) + blocks + 4 * -(-blocks // NF4_NESTED_BLOCK) + NF4_FIXED_BYTES
    if precision == "int8":
        return n + 4 * fout  # int8 weight + fp32 scale per output row (LLM.int8 SCB)
    return n * WEIGHT_BYTES[precision]


def resolve_targets(targets: str, shape: Shape) -> list[str]:
    from codetune.model.adapters import PRESETS

    names = PRESETS.get(targets) or [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [n for n in names if n not in shape.linears()]
    if unknown:
        raise ConfigError(f"targets: no module named {unknown}; linear modules are {list(shape.linears())} "
                          "(or use all-linear / attention / mlp)")
    return names


def trained_layers(adapter, shape: Shape) -> int:
    n = adapter.last_n_layers()
    if n is not None and n > shape.layers:
        raise ConfigError(f"train_layers=last:{n} but {shape.name} has {shape.layers} layers; "
                          f"use last:{shape.layers} or fewer")
    return shape.layers if n is None else n


def trainable_tensors(cfgs: dict, shape: Shape, precision: str) -> list[tuple[int, int]]:
    """(numel, bytes per element) of every parameter the optimizer updates."""
    adapter = cfgs["adapter"]
    n = trained_layers(adapter, shape)
    if adapter.method == "full":
        if precision in ("nf4", "int8"):
            raise ConfigError("method=full cannot train quantized weights; use --precision bf16 or --method lora")
        per = [i * o for i, o, _ in shape.linears().values()] + [o for _, o, b in shape.linears().values() if b]
        per += [shape.hidden] * 2 * shape.norm_tensors  # the two norms' weight (and bias)
        outside = [(shape.outside_params(), WEIGHT_BYTES[precision])] if adapter.train_embeddings else []
        return [(k, WEIGHT_BYTES[precision]) for k in per] * n + outside
    r = adapter.rank
    per = []
    for name in resolve_targets(adapter.targets, shape):
        fin, fout, _ = shape.linears()[name]
        per += [(r * fin, 4), (fout * r, 4)] + ([(fout, 4)] if adapter.dora else [])  # A, B (fp32), DoRA magnitude
    return per * n


def optimizer_bytes(numel: int, elem: int, optimizer: str) -> int:
    """torch AdamW: exp_avg + exp_avg_sq like the parameter; bitsandbytes 8-bit: uint8 + blockwise absmax."""
    if optimizer == "paged_adamw_8bit" and numel >= OPT8_MIN_SIZE:
        return 2 * (numel + 4 * -(-numel // OPT8_BLOCK))
    if optimizer == "paged_adamw_8bit":
        return 2 * 4 * numel
    return 2 * elem * numel


def layer_saved_bytes(shape: Shape, tokens: int, train_names: list[str], rank: int, attn: str = "sdpa",
                      batch: int = 1) -> int:
    """What autograd keeps from one decoder layer's forward with gradients on (its recompute in backward).
    `train_names` are the linears whose weight (full) or LoRA (rank > 0) trains: those save their input."""
    h, i, nh = shape.hidden, shape.intermediate, shape.heads
    kv = shape.kv_heads * (h // nh)
    per_tok = 2 * (h * LN_SAVED_BYTES + 2 * 4)        # 2 LayerNorms: their input + mean, rstd (fp32)
    for name in train_names:                           # bf16 input of each trained linear (counted per module,
        fin = shape.linears()[name][0]                 # though q, k, v share one tensor) + LoRA's x @ A
        per_tok += 2 * fin + 2 * rank
    per_tok += 2 * (h + 2 * kv) + 2 * h + 4 * nh      # SDPA: rotated q, k, v, its output, logsumexp
    per_tok += 3 * 2 * i                               # MLP: gate (silu input), silu(gate), up (mul inputs)
    seq = tokens // batch
    quadratic = {"sdpa": SDPA_BIAS_BYTES, "eager": nh * EAGER_SCORE_BYTES}.get(attn, 0) * batch * seq * seq
    return tokens * per_tok + quadratic


def fused_layer_bytes(shape: Shape, tokens: int, batch: int, elem: int = 2) -> int:
    """One fused decoder layer (model/fast_layer.py) recomputed for its backward, at its peak: what the
    recompute saves (LN1 output, q|k|v, attention output + logsumexp, the residual after attention), then
    the larger of attention's backward (+ the gradient it hands on) and one MLP chunk's backward (gate|up
    output, overwritten by its gradient; SwiGLU output and its gradient; the held dequantized weights)."""
    from codetune.model.engine_state import EngineOptions
    from codetune.model.fast_layer import mlp_chunk_rows

    h, i, nh = shape.hidden, shape.intermediate, shape.heads
    kv = shape.kv_heads * (h // nh)
    saved = tokens * (elem * (h + (h + 2 * kv) + h + h) + 4 * nh)
    attn = tokens * (attn_backward_bytes(h, kv, nh, elem) + elem * h)
    seq = tokens // batch
    chunk = batch * mlp_chunk_rows(batch, seq, i, elem, EngineOptions().mlp_chunk_bytes)
    chunked = chunk < tokens  # then also: the held weights, and the full-length gradient in and out
    mlp = chunk * elem * (2 * i + i + i) + (elem * (3 * h * i + 2 * tokens * h) if chunked else 0)
    return saved + max(attn, mlp)


@dataclass
class Breakdown:
    """Bytes per component of one training step at its peak, and what they add up to."""
    parts: dict[str, int]
    notes: dict[str, str] = field(default_factory=dict)
    cpu_pinned: int = 0           # offloaded layer inputs, in CPU RAM
    tokens_per_step: int = 0
    flops_per_step: float = 0.0
    settings: dict = field(default_factory=dict)

    @property
    def peak_allocated(self) -> int:
        """The loss and the layer recompute are different phases of the step: only the larger counts."""
        p = self.parts
        return sum(v for k, v in p.items() if k not in ("layer_recompute", "loss_chunk")) + max(
            p["layer_recompute"], p["loss_chunk"])

    @property
    def peak_reserved(self) -> int:
        return self.peak_allocated + ALLOCATOR_SLACK

    @property
    def val_peak_reserved(self) -> int:
        """Validation's peak: the same weights, adapters, gradients and optimizer state stay, and its
        no-grad forward needs less than a training step's recompute + backward (with CUDA graphs it replays
        the training forward's graph in the same pool; eager, its blocks are a subset of the step's). The
        allocator keeps what the step reserved, so validation peaks at the training peak
        (bench/results/headline_*: equal within 2% where measured)."""
        return self.peak_reserved

    @property
    def on_card(self) -> int:
        return self.peak_reserved + CUDA_CONTEXT

    def fits(self, gpu_bytes: int) -> bool:
        return self.on_card <= gpu_bytes


def estimate(cfgs: dict, gpu_bytes: int | None = None) -> Breakdown:
    """Predict the peak GPU memory of `codetune train` with these settings (planned for a CUDA GPU:
    precision auto = nf4, offload_activations auto = on). `gpu_bytes` only fills in the fit note."""
    mcfg, adapter, data, train = cfgs["model"], cfgs["adapter"], cfgs["data"], cfgs["train"]
    shape = model_shape(mcfg.model)
    precision = "nf4" if mcfg.precision == "auto" else mcfg.precision
    # what the engine will run: the same function train/recipe.build_model asks
    plan = engine_plan(cfgs, cuda=True, processes=1, tied_embeddings=shape.tied)
    offload = plan.offload_activations
    full = adapter.method == "full"
    n_train = trained_layers(adapter, shape)
    T, h, v = train.batch_size * data.seq_len, shape.hidden, shape.vocab
    act = 4 if precision == "fp32" else 2  # residual stream dtype between layers

    weights = shape.layers * sum(linear_weight_bytes(i, o, precision) + (2 * o if b else 0)
                                 for i, o, b in shape.linears().values())
    weights += (shape.layers * shape.layer_other_params() + shape.outside_params()) * WEIGHT_BYTES[precision]
    # model/embeddings.py: a frozen, untied input-embedding table stays in CPU RAM
    cpu_embeddings = plan.cpu_embeddings
    if cpu_embeddings:
        weights -= shape.vocab * h * WEIGHT_BYTES[precision]
    tensors = trainable_tensors(cfgs, shape, precision)
    params = 0 if full else sum(k * b for k, b in tensors)  # full: the trained weights are in `weights`
    grads = sum(k * b for k, b in tensors)
    opt = sum(optimizer_bytes(k, b, train.optimizer) for k, b in tensors)

    names = list(shape.linears()) if full else resolve_targets(adapter.targets, shape)
    attn = "packed" if plan.packed_attention else mcfg.attn  # packed attention: no L x L mask or bias
    saved = layer_saved_bytes(shape, T, names, 0 if full else adapter.rank, attn, train.batch_size)
    bwd = T * (BWD_WIDE_GRADS * 2 * shape.intermediate + BWD_HIDDEN_GRADS * act * h)
    layer_in = T * h * act
    # the fused layer (model/fast_layer.py), checkpointed; under method full it runs only the frozen layers
    fused = plan.fused_layers and not full and train.grad_checkpointing
    if train.grad_checkpointing:  # frozen prefix layers run without autograd: only the trained ones keep inputs
        kept = min(n_train, OFFLOAD_IN_FLIGHT) * layer_in if offload else n_train * layer_in
        recompute = saved + bwd
        if fused:
            # (the attention kind's quadratic term alone: same linears and rank on both sides)
            quadratic = saved - layer_saved_bytes(shape, T, names, 0 if full else adapter.rank, "flash_attention_2",
                                                  train.batch_size)
            recompute = fused_layer_bytes(shape, T, train.batch_size) + quadratic
    else:
        kept, recompute = n_train * (saved + layer_in), bwd
    mask = MASK_BYTES * train.batch_size * data.seq_len ** 2 if attn in ("sdpa", "eager") else 0

    # loss: the final LayerNorm's saved input and output and the grad_h the fused CE keeps (all in the
    # compute dtype), plus per chunk the fp32 logits and their bf16 gradient.
    from codetune.model.loss import chunk_rows

    loss = 3 * T * h * act + min(chunk_rows(v), T) * v * (4 + 2)

    dequant = max(i * o for i, o, _ in shape.linears().values()) * 2 if precision in ("nf4", "int8") else 0
    workspace = CUBLAS_WORKSPACE + dequant + 3 * T * 8 + UNTRACKED_ALLOC  # + int64 ids, positions, labels

    # CUDA graphs (model/graphs.py): three static residual-stream buffers (input, output/incoming gradient,
    # input gradient), the copies cloned out of them and the loss graph's outputs — six tokens x hidden
    # tensors — and the pool's extra. The .grad buffers the graphs accumulate into are the `grads` term
    # (an eager step holds them at its peak too: counting them again over-predicted rank 64 by 10%). The
    # layer passes' working set moves into the graphs' pool rather than adding to the ordinary one.
    graphed = plan.graphed(T)
    graphs = 6 * T * h * act + GRAPH_POOL_EXTRA if graphed else 0

    parts = {"weights": weights, "lora_params": params, "grads": grads, "optimizer": opt,
             "activations_kept": kept, "attn_mask": mask, "layer_recompute": recompute, "loss_chunk": loss,
             "workspace": workspace, "cuda_graphs": graphs}
    notes = {"weights": f"{precision}, {shape.total_params() / 1e9:.2f}B params",
             "lora_params": "" if full else f"r={adapter.rank}, {sum(k for k, _ in tensors) / 1e6:.1f}M params, fp32",
             "grads": "trained weights' dtype" if full else "fp32",
             "optimizer": train.optimizer,
             "activations_kept": (f"{n_train} layer inputs" + (", offloaded to CPU" if offload else ""))
             if train.grad_checkpointing else f"{n_train} layers, no checkpointing",
             "attn_mask": f"packed-sequence mask ({mcfg.attn})" if mask else "none (packed attention: document spans)",
             "layer_recompute": "one layer's activations + backward grads",
             "loss_chunk": f"fused CE, {chunk_rows(v)} rows per chunk",
             "workspace": "cuBLAS, dequantized weight, bf16 casts, batch, small buffers"
             + (" (input embeddings in CPU RAM)" if cpu_embeddings else ""),
             "cuda_graphs": "static residual-stream buffers, their clones, the pool" if graphed else "off (eager layers)"}
    flops = T * train.grad_accum * flops_per_token(shape, data.seq_len, n_train, full, train.grad_checkpointing)
    return Breakdown(parts, notes, cpu_pinned=n_train * layer_in if offload else 0,
                     tokens_per_step=T * train.grad_accum, flops_per_step=flops,
                     settings={"precision": precision, "offload": offload, "gpu_bytes": gpu_bytes, "engine": plan})


def flops_per_token(shape: Shape, seq: int, n_train: int, full: bool, checkpoint: bool) -> float:
    """Matmul FLOPs: every layer forward (2 x params + causal attention), the trained layers again for the
    recompute and for input gradients (and weight gradients when full), the head forward + backward."""
    lin = sum(i * o for i, o, _ in shape.linears().values())
    fwd = 2 * lin + 2 * seq * shape.hidden
    per_trained = (fwd if checkpoint else 0) + fwd + (2 * lin if full else 0)
    return shape.layers * fwd + n_train * per_trained + 2 * 2 * shape.vocab * shape.hidden
