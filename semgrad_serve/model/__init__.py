"""The model: a family-neutral frozen view of a decoder's weights and the forward maths over it.

``weights.py`` (the view, of a Hugging Face model; vLLM's modules: ``serving/worker/vllm_weights.py``),
``decoder.py`` (one layer's maths), ``forward.py`` (no-graph passes: a shared prefix's
keys/values, right-padded batches), ``logprobs.py`` (log-softmax and entropy),
``loading.py`` (a local Hugging Face model, ``--model`` by directory or name, dtypes and devices by name, the chat
template), ``packaged.py`` (the packaged models by name, the embedded SmolLM2-135M-Instruct among them, each
converted once), ``gguf_sources.py`` (their GGUF files, assembled where they ship in parts),
``stop_token.py`` (a model's EOS ids and the tokens of an answer the user receives),
``tokens.py`` (each token's text in a decoded answer).
Nothing here imports the layers above it.
"""
