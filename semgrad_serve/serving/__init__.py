"""SemGrad inside vLLM's OpenAI-compatible server, laid out by the process each part runs in.

``api_server/`` runs in vLLM's API server and never imports torch: the endpoint plugin (``plugin.py``, entry point
group ``vllm.endpoint_plugins``), the routes that tag scored requests and attach scores to each choice, the page,
the recent answers, the Prometheus metrics and the client of each engine's scoring service.
``worker/`` runs in vLLM's engine and worker processes: the worker extension (``--worker-extension-cls``) that starts
the scoring service, the KV connector that copies a finished scored request's prompt keys/values out of vLLM's
cache, the step recorder, the capture store, the view of vLLM's weights and the tensor-parallel rank sync.
``messages.py`` holds what crosses between them; ``settings.py`` the names vLLM is given and the settings read from
the environment; ``capture_keys.py`` the signed keys that tie a request to its capture.
Importing this package does not import vLLM.
"""
