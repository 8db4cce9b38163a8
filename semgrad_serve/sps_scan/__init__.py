"""The SPS scan that finds a model's t* and band (``sps.py``) and writes its profile and heatmap (``profile_scan.py``).

What ``semgrad-serve calibrate`` runs; "calibration" elsewhere means the confidence's probability calibration.
"""
