"""model/static_cache.rewind on the cache layers of both transformers APIs: layers with crop() (5.2x)
and layers without one (5.17, where StaticCache.crop raised AttributeError on the GPU image)."""

import pytest
import torch

from codetune.model.static_cache import rewind


class _OldLayer:  # transformers 5.17's StaticLayer: a device-side counter and no crop
    def __init__(self, n):
        self.cumulative_length = torch.tensor(n)


class _NewLayer(_OldLayer):  # 5.2x: crop(-k) moves the counter back k
    def crop(self, tokens_to_remove):
        self.cumulative_length.sub_(abs(tokens_to_remove))


class _Cache:
    def __init__(self, layers):
        self.layers = layers


@pytest.mark.parametrize("layer", [_OldLayer, _NewLayer])
def test_rewind_moves_every_layer_back_in_place(layer):
    cache = _Cache([layer(7), layer(7)])
    counters = [lyr.cumulative_length for lyr in cache.layers]
    rewind(cache)
    rewind(cache, 2)
    assert [int(c) for c in counters] == [4, 4]
    assert all(lyr.cumulative_length is c for lyr, c in zip(cache.layers, counters))  # (a graph reads these)


def test_rewind_refuses_a_layer_it_cannot_move():
    with pytest.raises(TypeError, match="--decode eager"):
        rewind(_Cache([object()]))


def test_rewind_on_this_transformers_static_cache():
    """The installed transformers' StaticCache, filled by a real forward: rewind moves its length back."""
    from transformers import StableLmConfig, StableLmForCausalLM, StaticCache

    cfg = StableLmConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = StableLmForCausalLM(cfg).eval()
    cache = StaticCache(config=cfg, max_cache_len=16)
    with torch.no_grad():
        model(input_ids=torch.arange(5)[None], past_key_values=cache, use_cache=True)
    assert int(cache.get_seq_length()) == 5
    rewind(cache)
    assert int(cache.get_seq_length()) == 4


def test_step_attention_takes_a_subset_of_its_backends_and_refuses_others():
    import torch.nn.functional as F

    from codetune.model.static_cache import step_attention

    q = torch.randn(1, 2, 1, 8)
    k = v = torch.randn(1, 2, 5, 8)
    mask = torch.tensor([[True, True, True, False, False]])  # (query, key)
    with step_attention():
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with step_attention(("math",)):
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), ref)
    for bad in ((), ("cudnn",)):
        with pytest.raises(ValueError, match="choose from flash, efficient, math"):
            step_attention(bad)
