"""Scoring: answers in, SemGrad / ParaGrad / HybridGrad / ExGrad out.

``scorer.py`` (the user-facing ``Scorer``: items, batches, reports) over ``batch.py`` (one
batch: band forward, closed-form head gradient, one backward), ``band_pass.py`` and
``shared_prefix.py`` (the forward with autograd only where SemGrad needs it),
``tied_head.py`` (the opt-in tied-head ParaGrad), ``items.py`` (what goes in and comes out,
and the scores' names), ``given.py`` (what vLLM computed for an answer, and the forward it selects),
``semgrad_object.py`` (the ``"semgrad"`` object of a response) and ``profiles.py`` (t*, band and threshold per
model; built-ins in ``profiles/``).
"""
