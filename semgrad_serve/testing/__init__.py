"""Helpers the tests and the benchmarks share, importable wherever the package is installed (as
``transformers.testing_utils`` is): ``naive.py`` (the paper's procedure with full autograd, the reference every
score is checked against), ``launch_server.py`` (``semgrad-serve serve`` or plain vLLM in a subprocess, until
ready), ``family_checkpoints.py`` (tiny random checkpoints of each model family) and ``timing.py`` (the
benchmarks' median timing). Nothing else imports them.
"""
