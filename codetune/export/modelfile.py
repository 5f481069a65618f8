"""The Ollama Modelfile written beside an exported GGUF.

Ollama fills in the middle only for a model whose TEMPLATE uses `.Suffix` (an editor's request with a
suffix is refused otherwise); this one renders stable-code's PSM order, the order codetune trains with and
`codetune generate --prefix/--suffix` uses (sampling.fim_ids): <fim_prefix>before<fim_suffix>after<fim_middle>.
Without a suffix the prompt is passed through unchanged (plain completion, no BOS, no chat wrapping).
"""

from __future__ import annotations

from pathlib import Path

from codetune.model.arch import stablelm

PROMPT, SUFFIX = "{{ .Prompt }}", "{{ .Suffix }}"
# GGUF export is StableLM's alone (gguf_file.read_shape refuses other families): its special tokens.
# Ollama also stops at the file's EOS id; these cover a model that writes a FIM marker instead of ending.
STOPS = stablelm.TOKENS.all()


def fim_prompt(prefix: str, suffix: str) -> str:
    """The text a fill-in-the-middle request becomes (the template's `.Suffix` branch, filled in)."""
    pre, suf, mid = stablelm.TOKENS.fim()
    return f"{pre}{prefix}{suf}{suffix}{mid}"


def template() -> str:
    # no whitespace between the actions: every character outside them reaches the model
    return "{{- if .Suffix }}" + fim_prompt(PROMPT, SUFFIX) + "{{- else }}" + PROMPT + "{{- end }}"


def modelfile_path(gguf_path: Path) -> Path:
    """mymodel.gguf -> mymodel.Modelfile, beside it (`ollama create NAME -f mymodel.Modelfile`)."""
    return gguf_path.with_suffix(".Modelfile")


def modelfile_text(gguf_path: Path, num_ctx: int) -> str:
    lines = [
        "# Written by `codetune export gguf`. Create the Ollama model with:",
        f"#   ollama create {gguf_path.stem} -f {modelfile_path(gguf_path).name}",
        f"FROM ./{gguf_path.name}",  # relative to this file's folder
        f'TEMPLATE """{template()}"""',
        *(f'PARAMETER stop "{s}"' for s in STOPS),
        f"PARAMETER num_ctx {num_ctx}",
        "PARAMETER temperature 0",
    ]
    return "\n".join(lines) + "\n"
