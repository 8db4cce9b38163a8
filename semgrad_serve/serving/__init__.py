"""SemGrad inside vLLM's OpenAI-compatible server.

``plugin.py`` is an endpoint plugin (entry point group ``vllm.endpoint_plugins``)
whose routes (``routes.py``; ``responses_route.py`` for the Responses API) tag
scored requests and attach the scores to each choice; ``capture_connector.py`` is a KV connector that copies a finished scored
request's prompt keys/values out of vLLM's cache (``kv_layout.py``, ``captures.py``);
``worker.py`` is a worker extension (``--worker-extension-cls``) that starts the
scoring service (``scoring_service.py``), a thread of the worker process that scores
answers on the weights the worker holds (``weights.py``), fed by the API server's
``scoring_client.py`` (one per engine under data parallelism, which ``data_parallel.py``
sets up and routes each request to). ``config.py``: the names vLLM is given and the settings read
from the environment; ``metrics.py``: the Prometheus metrics.
Importing this package does not import vLLM.
"""
