"""SemGrad inside vLLM's OpenAI-compatible server.

``worker.py`` is a vLLM worker extension (``--worker-extension-cls``) that scores
answers with the weights the worker already holds; ``plugin.py`` is an endpoint
plugin (entry point group ``vllm.endpoint_plugins``) that replaces the
completion routes, batches scoring requests and attaches the scores to each
choice. Importing this package does not import vLLM.
"""
