"""Our loading path must give the same model as plain transformers, and packing must not leak
attention between documents."""

import torch
from transformers import StableLmForCausalLM

from codetune.config import ModelConfig
from codetune.model.load import load_model, random_init_checkpoint


def test_logits_identical_to_plain_transformers():
    path = random_init_checkpoint("tiny-stablelm", vocab_size=512, seed=3)
    ours, precision = load_model(ModelConfig(model="tiny-stablelm", random_init=True), torch.device("cpu"),
                                 vocab_size=512, seed=3)
    ref = StableLmForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ours.eval()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert precision == "fp32"


def test_local_directory_loads_through_same_path():
    path = random_init_checkpoint("tiny-stablelm", vocab_size=512, seed=3)
    a, _ = load_model(ModelConfig(model=str(path)), torch.device("cpu"))
    b, _ = load_model(ModelConfig(model="tiny-stablelm", random_init=True), torch.device("cpu"), vocab_size=512, seed=3)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(a.eval()(input_ids=ids).logits, b.eval()(input_ids=ids).logits)


def test_packed_documents_do_not_attend_to_each_other():
    model, _ = load_model(ModelConfig(model="tiny-stablelm", random_init=True), torch.device("cpu"), vocab_size=512)
    model.eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(1, 512, (1, 20), generator=g), torch.randint(1, 512, (1, 12), generator=g)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(20), torch.arange(12)])[None]
    with torch.no_grad():
        both = model.model(input_ids=packed, position_ids=pos).last_hidden_state
        alone = model.model(input_ids=b).last_hidden_state
    torch.testing.assert_close(both[:, 20:], alone, rtol=1e-5, atol=1e-5)
