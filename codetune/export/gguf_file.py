"""A GGUF file (llama.cpp, Ollama, LM Studio) from a Hugging Face StableLM model directory, written with the
`gguf` package (its writer, tensor-name map and quantizers), tensor by tensor so memory stays at one tensor.

llama.cpp's own converter (convert_hf_to_gguf.py, 0.3.36's vendored copy) is followed key for key for
StableLM, except where it is wrong for stable-code:
- it writes no `stablelm.rope.freq_base`, so llama.cpp falls back to 10,000 where stable-code-3b uses
  1,000,000: every position is rotated wrongly and the model is silently worse (max logit difference ~16);
- it writes no FIM token ids, so llama-server's /infill and editor plugins that ask llama.cpp for them
  get none unless llama.cpp's guess from the token texts finds them; here they are written.
It is also not installed by any package (it lives in llama.cpp's source tree), so it is not called.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from codetune.config import ConfigError
from codetune.model.arch import stablelm

ARCH = "stablelm"
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's split regex (GPT-NeoX and stable-code use it)
# The GGUF's own KV keys for the FIM ids (no writer helper exists for them)
# (of StableLM's special tokens: the only family this export writes)
_T = stablelm.TOKENS
FIM_KEYS = {_T.fim_prefix: "tokenizer.ggml.fim_pre_token_id", _T.fim_suffix: "tokenizer.ggml.fim_suf_token_id",
            _T.fim_middle: "tokenizer.ggml.fim_mid_token_id", _T.fim_pad: "tokenizer.ggml.fim_pad_token_id"}
# Weights of the checkpoint that llama.cpp has no tensor for: recomputed at load time
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class StableLmShape:
    """What llama.cpp must be told about the architecture (from config.json, through transformers)."""
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    context: int
    rope_theta: float
    rope_dims: int  # partial rotary: the first rope_dims of each head are rotated
    norm_eps: float
    parallel_residual: bool
    vocab: int  # embedding rows (stable-code pads its 50,2xx tokens to 50,304)
    tied: bool


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    merges: list[str]
    eos: int
    bos: int
    pad: int
    fim: dict[str, int]  # FIM token string -> id


@dataclass(frozen=True)
class TensorPlan:
    name: str  # the GGUF tensor name
    source: str  # the checkpoint's tensor name
    file: Path  # the safetensors file that holds it
    shape: tuple[int, ...]
    qtype: int  # gguf.GGMLQuantizationType


def read_shape(model_dir: Path) -> StableLmShape:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--model {model_dir}: cannot read its config.json ({first}); give a model folder "
                          "written by `codetune merge`") from None
    if cfg.model_type != "stablelm":
        raise ConfigError(f"--model {model_dir} is a {cfg.model_type!r} model; codetune export gguf writes StableLM "
                          "models (stable-code-3b and its fine-tunes) only")
    if getattr(cfg, "qk_layernorm", False):
        raise ConfigError(f"--model {model_dir} uses per-head q/k layer norms (StableLM 2 12B); codetune export "
                          "gguf writes stable-code's architecture only")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"--model {model_dir} uses {rope['rope_type']!r} rope scaling, which this exporter does "
                          "not write; export the model without it")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    partial = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    if theta is None or partial is None:
        raise ConfigError(f"--model {model_dir}: config.json gives no rope_theta / partial_rotary_factor")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return StableLmShape(
        layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, ffn=cfg.intermediate_size,
        heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, context=cfg.max_position_embeddings,
        rope_theta=float(theta), rope_dims=int(partial * head_dim), norm_eps=float(cfg.layer_norm_eps),
        parallel_residual=bool(cfg.use_parallel_residual), vocab=cfg.vocab_size,
        tied=bool(cfg.tie_word_embeddings))


def check_byte_level_bpe(tj: dict, where: Path) -> None:
    """llama.cpp re-implements the tokenizer; only GPT-2-style byte-level BPE (stable-code's) is written, so
    that llama.cpp splits text exactly as the tokenizer the model was trained with (tests check it)."""
    pre, model = tj.get("pre_tokenizer") or {}, tj.get("model") or {}
    if (model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True)
            or pre.get("add_prefix_space", False)):
        raise ConfigError(f"{where}: the tokenizer is not a GPT-2-style byte-level BPE (model {model.get('type')}, "
                          f"pre-tokenizer {pre.get('type')}); codetune export gguf writes stable-code's tokenizer only")


def read_vocab(model_dir: Path, rows: int) -> Vocab:
    import gguf
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"--model {model_dir} has no tokenizer.json; give a folder written by `codetune merge`")
    tj = json.loads(path.read_text(encoding="utf-8"))
    check_byte_level_bpe(tj, path)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = tok.get_vocab()
    if max(vocab.values()) >= rows:
        raise ConfigError(f"--model {model_dir}: the tokenizer has ids up to {max(vocab.values())} but the model "
                          f"only {rows} embedding rows; the tokenizer does not belong to this model")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:  # padding rows: never produced by the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:  # stored as plain text: llama.cpp matches added tokens before splitting, as HF does
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    fim = {}
    for s in FIM_KEYS:
        ids = tok.encode(s, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(f"--model {model_dir}: the tokenizer has no single token for {s}; a model without "
                              "stable-code's FIM tokens cannot fill in the middle")
        fim[s] = ids[0]
    if tok.eos_token_id is None:
        raise ConfigError(f"--model {model_dir}: the tokenizer names no EOS token")
    eos = tok.eos_token_id
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return Vocab(tokens, types, merges, eos, bos, pad, fim)


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"--model {model_dir} holds no .safetensors weights; give a folder written by "
                          "`codetune merge` (or convert the checkpoint to safetensors first)")
    return files


def matrix_type(quant: str, shape: tuple[int, ...]):
    """The GGUF type of one tensor: 1-D tensors (norms, biases) stay f32, as llama.cpp computes them in f32;
    a matrix whose rows do not split into whole quantization blocks falls back to f16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or quant == "f32":
        return Q.F32
    wanted = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[quant]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else Q.F16


def plan_tensors(model_dir: Path, shape: StableLmShape, quant: str) -> list[TensorPlan]:
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.STABLELM, shape.layers)
    plans, embed = [], None
    for f in weight_files(model_dir):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.endswith(SKIPPED_SUFFIXES):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ConfigError(f"--model {model_dir}: tensor {key} has no place in llama.cpp's StableLM; "
                                      "is this a stable-code model?")
                dims = tuple(st.get_slice(key).get_shape())
                plans.append(TensorPlan(name, key, f, dims, matrix_type(quant, dims)))
                if name == "token_embd.weight":
                    embed = plans[-1]
    if shape.tied and embed is not None and not any(p.name == "output.weight" for p in plans):
        # llama.cpp's StableLM requires an output matrix: a tied model gets a copy of the embedding
        plans.append(TensorPlan("output.weight", embed.source, embed.file, embed.shape, embed.qtype))
    return plans


def tensor_bytes(plan: TensorPlan) -> tuple[tuple[int, ...], int]:
    """(the shape the writer is given, bytes on disk)."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if plan.qtype in (Q.F32, Q.F16):
        return plan.shape, int(np.prod(plan.shape)) * (4 if plan.qtype == Q.F32 else 2)
    byte_shape = gguf.quant_shape_to_byte_shape(plan.shape, plan.qtype)
    return byte_shape, int(np.prod(byte_shape))


def gguf_size(plans: list[TensorPlan]) -> int:
    return sum(tensor_bytes(p)[1] for p in plans)


def file_type(quant: str):
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[quant]


def add_metadata(w, name: str, shape: StableLmShape, vocab: Vocab, quant: str) -> None:
    import gguf

    w.add_name(name)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.ffn)
    w.add_rope_dimension_count(shape.rope_dims)
    w.add_rope_freq_base(shape.rope_theta)  # missing in llama.cpp's converter (see the module's doc)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_parallel_residual(shape.parallel_residual)
    w.add_layer_norm_eps(shape.norm_eps)
    w.add_file_type(file_type(quant))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos)
    w.add_eos_token_id(vocab.eos)
    w.add_pad_token_id(vocab.pad)
    w.add_add_bos_token(False)  # prompts are encoded without BOS, in training and in codetune generate
    w.add_add_eos_token(False)
    for s, key in FIM_KEYS.items():
        w.add_uint32(key, vocab.fim[s])


def load_tensor(plan: TensorPlan):
    """The tensor converted to what the writer stores: float arrays for f32/f16, packed bytes otherwise."""
    import gguf
    from safetensors import safe_open

    with safe_open(str(plan.file), framework="pt") as st:
        data = st.get_tensor(plan.source).float().numpy()
    return gguf.quants.quantize(data, plan.qtype)


@dataclass(frozen=True)
class Conversion:
    """Everything read and checked before a byte is written."""
    shape: StableLmShape
    vocab: Vocab
    tensors: list[TensorPlan]
    quant: str

    @property
    def size(self) -> int:
        return gguf_size(self.tensors)


def prepare_conversion(model_dir: Path, quant: str) -> Conversion:
    shape = read_shape(model_dir)
    return Conversion(shape, read_vocab(model_dir, shape.vocab), plan_tensors(model_dir, shape, quant), quant)


def write_gguf(conv: Conversion, path: Path, name: str) -> None:
    """Write the file at `path` (the caller's temporary path)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), ARCH)
    add_metadata(w, name, conv.shape, conv.vocab, conv.quant)
    Q = gguf.GGMLQuantizationType
    for p in conv.tensors:
        dims, nbytes = tensor_bytes(p)
        if p.qtype in (Q.F32, Q.F16):
            w.add_tensor_info(p.name, dims, np.dtype(np.float32 if p.qtype == Q.F32 else np.float16), nbytes)
        else:
            w.add_tensor_info(p.name, dims, np.dtype(np.uint8), nbytes, raw_dtype=p.qtype)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    try:
        for p in conv.tensors:
            w.write_tensor_data(load_tensor(p))
    finally:
        w.close()
