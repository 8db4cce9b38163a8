"""The model: a family-neutral frozen view of a decoder's weights and its forward maths.

``weights.py`` (the view), ``decoder.py`` (one layer's maths), ``default_model.py``
(the embedded SmolLM2-135M-Instruct), ``stop_token.py`` (a model's EOS ids).
"""
