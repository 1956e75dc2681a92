"""The benchmark suite (`python bench/suite.py`): a small library (lib, models, sims) and one module per benchmark."""
