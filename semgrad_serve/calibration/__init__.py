"""Calibration: the SPS scan that finds a model's t* and band (``sps.py``) and writes its profile (``calibrate.py``)."""
