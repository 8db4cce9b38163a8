"""Evaluation: how well each score detects wrong answers, against the baselines.

``generation.py`` (answers through vLLM or Hugging Face), ``judges.py``
(correctness), ``baselines.py``, ``metrics.py`` (AUROC, AUPRC, PRR, flag
thresholds) and ``evaluate.py`` (the whole run and its reports).
"""
