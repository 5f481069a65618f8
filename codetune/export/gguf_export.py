"""`codetune export gguf`: one GGUF file for llama.cpp, Ollama and LM Studio, from a merged model directory or
from base + adapter (merged on the way, as `codetune merge` does), with an Ollama Modelfile beside it.

Nothing is written over: the file and its Modelfile are built in a temporary folder beside --out and
moved into place only if neither name exists (checked first, and again, atomically, at the end).
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from codetune.atomic import ensure_free_space, gib, temp_dir_beside, write_error
from codetune.config import ConfigError

FORMATS = ("gguf",)
# f32/f16/bf16/q8_0 are written by the gguf package; q4_k_m by llama.cpp's quantizer from an f16 file
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
NEEDS_LLAMA_CPP = ("q4_k_m",)
OLLAMA_CONTEXT = 4096  # num_ctx in the Modelfile: the KV cache of stable-code-3b's full 16k is ~5 GiB
ELSEWHERE = "choose --out on another disk or folder"

CLI_FLAGS = [
    (("format",), dict(choices=FORMATS, help="what to write: gguf, the one format so far (llama.cpp, Ollama, "
                                             "LM Studio; default: none, required)")),
    (("--model",), dict(metavar="DIR", help="a merged model directory (`codetune merge --out`); with --adapter, "
                                            "the base to merge it into (default: the base the adapter trained on)")),
    (("--adapter",), dict(metavar="DIR", help="adapter directory from `codetune train`, merged into its base on "
                                              "the way (default: none, --model is already merged)")),
    (("--out",), dict(required=True, metavar="FILE", help="the .gguf file to write; it must not exist. The Ollama "
                                                          "Modelfile goes beside it (FILE with .Modelfile)")),
    (("--quant",), dict(default="f16", choices=QUANTS,
                        help="weight type: f16 (full quality), q8_0 (half the size, near-lossless), q4_k_m (a "
                             "quarter, needs llama-cpp-python), bf16, f32")),
    (("--device",), dict(default="auto", help="where an --adapter is merged: auto (cuda if present), cpu, cuda")),
]


@dataclass(frozen=True)
class Exported:
    gguf: Path
    modelfile: Path
    size: int  # bytes of the .gguf


def check_new(path: Path, what: str) -> None:
    if path.exists() or path.is_symlink():
        raise ConfigError(f"{path} exists; codetune never writes over a file: choose another --out or move the "
                          f"{what} away")


def place_new(tmp: Path, dst: Path, what: str) -> None:
    """Move `tmp` to `dst` only if `dst` does not exist. A hard link fails on an existing name, so a file that
    appeared since the first check is not replaced; file systems without hard links fall back to a rename."""
    try:
        os.link(tmp, dst)
    except FileExistsError:
        check_new(dst, what)  # raises
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        check_new(dst, what)
        os.rename(tmp, dst)
        return
    tmp.unlink()


def llama_cpp_for(quant: str):
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(f"--quant {quant} is made by llama.cpp's quantizer: pip install llama-cpp-python (or use "
                          "--quant q8_0 / f16, which need nothing more)") from None
    return llama_cpp


def quantize_llama_cpp(src: Path, dst: Path, quant: str) -> None:
    llama_cpp = llama_cpp_for(quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {quant}")


def source_dir(work: Path, model_dir: Path | None, adapter: Path | None, device) -> Path:
    """The HF model directory to convert: --model as is, or base + --adapter merged into `work`."""
    if adapter is None:
        if model_dir is None:
            raise ConfigError("nothing to export: give --model DIR (a merged model) or --adapter DIR (from "
                              "`codetune train`)")
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"--model {model_dir}: not a model directory (no config.json); give the folder "
                              "`codetune merge --out` wrote, or --adapter to merge on the way")
        return model_dir
    from codetune.config import ModelConfig
    from codetune.export.merge import merge_adapter

    base = ModelConfig(model=str(model_dir)) if model_dir is not None else None
    return merge_adapter(adapter, work / "merged", device=device, model_cfg=base)


def export_gguf(out, quant: str = "f16", model_dir=None, adapter=None, device=None) -> Exported:
    import torch

    from codetune.export.gguf_file import prepare_conversion, write_gguf
    from codetune.export.modelfile import modelfile_path, modelfile_text

    out = Path(out)
    model_dir = Path(model_dir) if model_dir is not None else None
    adapter = Path(adapter) if adapter is not None else None
    if quant not in QUANTS:
        raise ConfigError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    if out.suffix != ".gguf":
        raise ConfigError(f"--out {out}: name the file *.gguf (the Modelfile beside it takes the same name)")
    mf = modelfile_path(out)
    check_new(out, "file")
    check_new(mf, "Modelfile")
    if model_dir is not None and not model_dir.is_dir():
        raise ConfigError(f"--model {model_dir}: no such folder; give a merged model directory")
    if quant in NEEDS_LLAMA_CPP:
        llama_cpp_for(quant)  # before the slow part
    try:
        work = temp_dir_beside(out)
    except OSError as e:
        raise (write_error(out, e, ELSEWHERE) or e) from None
    try:
        src = source_dir(work, model_dir, adapter, device or torch.device("cpu"))
        written = "f16" if quant in NEEDS_LLAMA_CPP else quant
        conv = prepare_conversion(src, written)
        ensure_free_space(work, conv.size * (2 if written != quant else 1) + 2**24, ELSEWHERE)
        tmp = work / out.name
        try:
            write_gguf(conv, tmp, name=out.stem)
            if written != quant:
                small = work / f"{quant}.gguf"
                quantize_llama_cpp(tmp, small, quant)
                tmp.unlink()
                tmp = small
            mf_tmp = work / mf.name
            mf_tmp.write_text(modelfile_text(out, min(conv.shape.context, OLLAMA_CONTEXT)))
            size = tmp.stat().st_size
            place_new(tmp, out, "file")
            place_new(mf_tmp, mf, "Modelfile")
        except OSError as e:
            err = write_error(out, e, ELSEWHERE)
            if err is None:
                raise
            raise ConfigError(f"{err} (the partial file was removed)") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Exported(out, mf, size)


def run(cfgs: dict, ns: argparse.Namespace) -> int:
    from codetune.model.load import pick_device

    device = pick_device(ns.device) if ns.adapter else None
    done = export_gguf(ns.out, ns.quant, model_dir=ns.model, adapter=ns.adapter, device=device)
    print(f"wrote {done.gguf} ({ns.quant}, {gib(done.size)}) and {done.modelfile}", file=sys.stderr)
    print(f"next: ollama create {done.gguf.stem} -f {done.modelfile}   (or load {done.gguf} in llama.cpp / LM "
          "Studio; see docs/use.md)", file=sys.stderr)
    return 0
