"""The benchmark suite (`python3 bench/suite.py`): a small library (lib, models, sims) and one module per benchmark."""
