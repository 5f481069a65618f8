"""The engine's kernels, each with its reference test in tests/model/test_kernels.py (the CUDA paths in
tests/gpu/test_gpu_engine.py; decode_attention's in tests/model/test_decode_attention.py and
tests/export/test_split_decode.py):

- nf4.py           NF4 (bitsandbytes) weight -> dense bf16/fp16 in one Triton launch
- swiglu.py        silu(g) * u and its backward over the fused gate|up output, no full-size temporaries
- rotary.py        the rotary embedding of q and k in place on a fused q|k|v output (PyTorch ops, or ...)
- rotary_triton.py ... one Triton launch, bit-identical to them
- fused_lora.py    the fused node: frozen linears + LoRA adapters + an epilogue in one autograd node
- decode_attention.py  one query token over a KV cache, the keys split over the GPU (flash-decoding; inference)

Free of transformers and PEFT (the test imports this package in a fresh interpreter and checks): what a
kernel needs from a model comes in as tensors and small records; the modules that read transformers'
and PEFT's objects (model/lora_fast.py, model/fast_layer.py, model/arch/) hand them over.
"""
