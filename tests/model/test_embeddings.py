"""The input-embedding table in CPU RAM (model/embeddings.py): same rows, and where it must not apply."""

import torch

from codetune.model.embeddings import CpuEmbedding, offload_input_embeddings, restore_input_embeddings, why_it_stays


def test_cpu_lookup_returns_the_same_rows_as_the_module():
    emb = torch.nn.Embedding(50, 8).to(torch.bfloat16).requires_grad_(False)
    ids = torch.randint(0, 50, (2, 7))
    ref = emb(ids)
    emb.forward = CpuEmbedding(emb, torch.device("cpu"))
    torch.testing.assert_close(emb(ids), ref, rtol=0, atol=0)
    torch.testing.assert_close(emb(ids[:, :3]), ref[:, :3], rtol=0, atol=0)  # a shorter batch reuses the buffer
    torch.testing.assert_close(emb(torch.randint(0, 50, (3, 9))).shape, torch.Size([3, 9, 8]))


class _LM(torch.nn.Module):
    def __init__(self, tied: bool, trained: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4).requires_grad_(trained)
        self.head = torch.nn.Linear(4, 10, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def test_it_steps_aside_for_tied_trained_or_non_plain_tables_and_off_cuda():
    assert why_it_stays(_LM(tied=False)) is None
    assert why_it_stays(_LM(tied=True)) == "tied to the output layer"
    assert why_it_stays(_LM(tied=False, trained=True)) == "it trains"
    lm = _LM(tied=False)
    lm.embed.max_norm = 1.0
    assert why_it_stays(lm) == "not a plain nn.Embedding"
    lm = _LM(tied=False)
    assert offload_input_embeddings(lm) is False  # CPU weights: nothing to move
    lm.embed.forward = CpuEmbedding(lm.embed, torch.device("cpu"))
    assert why_it_stays(lm).startswith("its forward is already swapped")
    restore_input_embeddings(lm)
    assert "forward" not in lm.embed.__dict__
