"""Runs of runs: teacher-assistant chains, student-size sweeps and hyper-parameter tuning, with
their common part (``common.py``) and the sizing of built-in students (``sizing.py``)."""
