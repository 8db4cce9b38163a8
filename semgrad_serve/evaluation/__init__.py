"""Evaluation: how well each score detects wrong answers, against the baselines.

``evaluate.py`` runs it: ``prompts.py`` (the paper's prompt), ``config.py`` (the run's
settings), ``runs.py`` (datasets and per-answer results), ``generation.py`` (answers
through vLLM or Hugging Face), ``judges.py`` (correctness), ``baselines.py``,
``metrics.py`` (AUROC, AUPRC, PRR, flag thresholds) and ``report.py`` (tables, ROC
plot, per-answer records).
"""
