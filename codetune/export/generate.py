"""`codetune generate`: complete a prompt, or fill in the middle between --prefix and --suffix, with the
base model alone or base + adapter (unmerged), in 4-bit on a GPU or bf16/fp32; tokens stream to stdout.

Also the loading entry point `load_for_inference` and the chat-template lookup `chat_rendering`, shared
with `codetune serve`, and `complete`, the one-call helper the demo uses.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from codetune.config import ConfigError, ModelConfig
from codetune.export.sampling import SamplingParams, fim_ids, generate_text, max_context, prompt_ids
from codetune.export.static_decode import DECODE_FLAG, Decoder
from codetune.model.load import pick_device

CLI_FLAGS = [
    (("--adapter",), dict(metavar="DIR", help="adapter directory from `codetune train`; without it the base "
                                                "model (--model) is used alone")),
    (("--prompt",), dict(metavar="TEXT", help="text to continue; @FILE reads a file, - reads stdin")),
    (("--prefix",), dict(metavar="TEXT", help="fill-in-the-middle: code before the gap (@FILE reads a file)")),
    (("--suffix",), dict(metavar="TEXT", help="fill-in-the-middle: code after the gap (@FILE reads a file)")),
    (("--chat",), dict(metavar="TEXT", help="a user message, answered as a chat model: rendered exactly as "
                                              "`prepare` rendered the chat rows the adapter trained on (@FILE reads "
                                              "a file)")),
    (("--max-new-tokens",), dict(type=int, default=128, help="tokens to generate at most")),
    (("--temperature",), dict(type=float, default=0.0, help="sampling temperature; 0 = greedy")),
    (("--top-p",), dict(type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                       "with this much probability")),
    (("--top-k",), dict(type=int, default=0, help="sample only from the k most likely tokens; 0 = off")),
    (("--repetition-penalty",), dict(type=float, default=1.0, help="> 1 discourages repeats; 1 = off")),
    (("--stop",), dict(action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")),
    (("--seed",), dict(type=int, default=None, help="sampling seed, for repeatable samples")),
    (("--device",), dict(default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")),
    DECODE_FLAG,
]


def load_for_inference(model_cfg: ModelConfig, adapter: str | None, device: torch.device,
                       model_cfg_given: bool = False):
    """(model, tokenizer, the adapter's run info or {}) ready for decoding. With an adapter, its codetune.json
    says how to rebuild the base (unless --model was given explicitly); `model_cfg.precision` picks
    nf4/int8/bf16/fp32 (auto: nf4 on a GPU, fp32 on the CPU)."""
    from codetune.model.load import check_vocab, load_model, load_tuned, padded_vocab
    from codetune.model.tokenizer import load_tokenizer

    if adapter:
        if not Path(adapter).is_dir():
            raise ConfigError(f"--adapter {adapter}: no such directory; point it at <run>/adapter")
        return load_tuned(adapter, device, precision=model_cfg.precision,
                          model_cfg=model_cfg if model_cfg_given else None)
    tok = load_tokenizer(model_cfg)  # (a TokenizerError is a ConfigError: one line)
    # a random-init model is sized to its tokenizer, as `codetune train` builds it
    vocab = padded_vocab(tok) if model_cfg.random_init else None
    model, _ = load_model(model_cfg, device, vocab_size=vocab)
    check_vocab(model, tok)
    model.eval()
    return model, tok, _merged_info(model_cfg.model)


def _merged_info(model: str) -> dict:
    """A model folder `codetune merge` wrote carries its adapter's codetune.json (how its data was rendered)."""
    from codetune.model.load import RUN_INFO, read_run_info

    try:
        return read_run_info(model) if (Path(model) / RUN_INFO).is_file() else {}
    except ConfigError:  # unreadable: it only informs the chat rendering, which then goes by the tokenizer
        return {}


NO_CHAT_TEMPLATE = ("this model has no chat template and was not trained on chat data: use an adapter trained on "
                    "chat rows (codetune prepare with messages, prompt/completion or instruction data), or an "
                    "instruct model whose tokenizer has a chat template (e.g. stabilityai/stable-code-instruct-3b)")


@dataclass(frozen=True)
class ChatRendering:
    choice: str  # "auto" (the tokenizer's template) or "plain", as codetune.data.chat.prompt_ids takes it
    stop_token_ids: tuple[int, ...]  # the template's end-of-turn token: where an answer ends
    known: bool  # the tokenizer has a template, or the adapter trained on chat rows; else plain is a guess


def chat_rendering(tok, info: dict) -> ChatRendering:
    """How a conversation is rendered for this model: as `prepare` rendered the chat rows the adapter trained
    on (its manifest's chat_template, the plain template included), else with the tokenizer's own template.
    A ConfigError when that template cannot render a conversation."""
    from codetune.data import chat

    manifest = info.get("data_manifest") or {}
    trained = bool((((manifest.get("counts") or {}).get("kinds") or {}).get("chat") or {}).get("kept"))
    # a manifest written for code alone also names a template; the adapter learned nothing of it
    choice = "plain" if trained and manifest.get("chat_template") == "plain" else "auto"
    t = chat.template_of(tok, choice)
    try:
        eot = chat.end_of_turn(t)
    except Exception as e:  # noqa: BLE001 - any failure of someone's Jinja is a configuration problem
        raise ConfigError(f"the model's chat template cannot render a conversation ({type(e).__name__}: {e}); "
                          "fix the tokenizer's chat_template") from None
    return ChatRendering(choice, (int(tok.convert_tokens_to_ids(eot)),), trained or t.jinja is not None)


def chat_ids(tok, text: str, info: dict) -> list[int]:
    """Prompt ids for one user message, rendered as `chat_rendering` says, so training and inference agree."""
    from codetune.data.chat import prompt_ids as chat_prompt_ids

    choice = chat_rendering(tok, info).choice
    return [int(i) for i in chat_prompt_ids(tok, [{"role": "user", "content": text}], choice)]


def complete(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0,
             stop: list[str] | None = None, on_text=None, decoder: Decoder | None = None) -> str:
    """The continuation of `prompt` (stop string excluded); `on_text` receives it piece by piece."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop=list(stop or []))
    return generate_text(model, tokenizer, prompt_ids(tokenizer, prompt), params, on_text=on_text,
                         decoder=decoder).text


def make_decoder(model, mode: str, reuse_prefix: bool = False) -> Decoder:
    """The --decode flag's Decoder (serve's --reuse-prefix too); a mode that cannot run here is a one-line
    ConfigError."""
    try:
        return Decoder(model, mode, reuse_prefix=reuse_prefix)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def read_arg(value: str | None) -> str | None:
    """Flag text as given, '@path' for a file's contents, '-' for stdin."""
    if value is None:
        return None
    if value == "-":
        return sys.stdin.read()
    if value.startswith("@"):
        p = Path(value[1:]).expanduser()
        if not p.is_file():
            raise ConfigError(f"{value}: no such file (a leading @ reads the text from a file)")
        return p.read_text(encoding="utf-8")
    return value


def run(cfgs: dict, ns: argparse.Namespace) -> int:
    prompt, prefix, suffix, chat = read_arg(ns.prompt), read_arg(ns.prefix), read_arg(ns.suffix), read_arg(ns.chat)
    fim = prefix is not None or suffix is not None
    if sum((fim, prompt is not None, chat is not None)) > 1:
        raise ConfigError("give one of --prompt (continue text), --prefix/--suffix (fill in the middle) or --chat "
                          "(answer a message)")
    if not fim and prompt is None and chat is None:
        raise ConfigError("nothing to complete: pass --prompt TEXT, or --prefix TEXT and --suffix TEXT for "
                          "fill-in-the-middle, or --chat TEXT (@FILE reads a file)")
    params = SamplingParams(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_p=ns.top_p,
                            top_k=ns.top_k, repetition_penalty=ns.repetition_penalty, stop=ns.stop, seed=ns.seed)
    try:
        params.check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    device = pick_device(ns.device)
    model, tok, info = load_for_inference(cfgs["model"], ns.adapter, device, model_cfg_given=hasattr(ns, "model.model"))
    decoder = make_decoder(model, ns.decode)
    if chat is not None:
        rendering = chat_rendering(tok, info)
        if not rendering.known:
            print(f"codetune generate: warning: {NO_CHAT_TEMPLATE}; using codetune's plain template",
                  file=sys.stderr)
        ids = chat_ids(tok, chat, info)
        params.stop_token_ids = rendering.stop_token_ids  # the answer ends at the template's end of turn
    else:
        ids = fim_ids(tok, prefix or "", suffix or "") if fim else prompt_ids(tok, prompt)
    room = max_context(model) - len(ids)
    if room < 1:
        raise ConfigError(f"the prompt is {len(ids)} tokens; the model's context is {max_context(model)}: shorten it")
    if params.max_new_tokens > room:
        print(f"codetune generate: only {room} tokens fit after the prompt; generating at most that many",
              file=sys.stderr)
        params.max_new_tokens = room

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    t0 = time.perf_counter()
    out = generate_text(model, tok, ids, params, on_text=show, decoder=decoder)
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"[{out.completion_tokens} tokens in {dt:.2f}s, {out.completion_tokens / max(dt, 1e-9):.1f} tok/s, "
          f"finish: {out.finish_reason}; decode: {decoder.describe()}]", file=sys.stderr)
    return 0
