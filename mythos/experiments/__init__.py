"""Experiments on depth: ``python -m mythos.experiments {depth,act-scan,vs-dense}``."""
