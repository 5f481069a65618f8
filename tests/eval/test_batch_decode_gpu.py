"""On a CUDA device (skipped elsewhere): eval's batched decoding with real CUDA graphs gives the eager
path's completions, and the graph is captured rather than fallen back from. bench/suites/eval-speed.txt
runs this; the CPU suite covers the same logic with torch.cuda faked (test_batch_decode.py)."""

import pytest
import torch

from codetune.eval.generation import GenSettings, GenStats, generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["def add(a, b):\n", "import os\nimport sys\n\n\ndef main():\n    x = 1\n    return x\n", "class A:",
           "x = [1, 2, 3]\nfor i in x:\n    print(i)\n# done\n\n\ndef f(y):", "#"]


@pytest.fixture(scope="module")
def cuda_model(tokenizer, shared_tokenizer_path):
    from codetune.config import ModelConfig
    from codetune.model.load import load_model, padded_vocab

    cfg = ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(shared_tokenizer_path), precision="fp32")
    model, _ = load_model(cfg, torch.device("cuda"), vocab_size=padded_vocab(tokenizer), seed=0)
    return model.eval()


@pytest.mark.parametrize("stop", [(), ("\n", " a")])
def test_graphed_batches_equal_eager(cuda_model, tokenizer, stop):
    base = dict(max_new_tokens=48, batch_size=3, stop=stop)
    eager = generate(cuda_model, tokenizer, PROMPTS, GenSettings(**base, decode="eager"))
    stats = GenStats()
    batched = generate(cuda_model, tokenizer, PROMPTS, GenSettings(**base, decode="batched"), stats)
    assert batched == eager
    assert stats.decoder["fallback"] is None, stats.decoder["fallback"]
    assert stats.decoder["captured"] >= 1 and stats.decoder["replays"] > 0
