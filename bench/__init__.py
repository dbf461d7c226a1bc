"""mythos benchmarks: ``python -m bench`` (quick), ``python -m bench --full``; see README.md.

Op cases live in ``bench/ops_*.py`` (discovered automatically), the model-level suites in
``bench/model.py``, device ceilings in ``bench/ceilings.py``, plots in ``bench/plot.py``.
"""
