"""The adaptive bench suite on a trained model: paths checked before any compute, the frontier
rows of a model trained a few steps on the multi-hop task (answer agreement with full depth)."""

from __future__ import annotations

import json

import pytest
import torch

import mythos_kernels as K
from bench import adaptive as bench_adaptive
from mythos.experiments.common import Size, model_config, save_model, train_model

pytestmark = pytest.mark.usefixtures("on_cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained 8 steps as ``python -m mythos.experiments depth --quick`` trains and saves
    its models (``DIR/models/NAME.safetensors`` + ``NAME.json``)."""
    size = Size(dim=32, expert_dim=16, n_experts=4, nodes=5, train_loops=2, steps=8,
                batch_size=8, seeds=(0,), train_hops=(1, 2), eval_every=0)
    cfg = model_config(size)
    with torch.device("cpu"), K.use_backend("reference"):
        m, _ = train_model(cfg, size, 0, n_loops=2, device="cpu", progress=False)
    path = tmp_path_factory.mktemp("exp") / "models" / "fixed-seed0.safetensors"
    save_model(m, str(path), {"config": cfg.__dict__, "regime": "fixed", "seed": 0}, size)
    return path


def test_trained_model_frontier(trained, monkeypatch):
    monkeypatch.setitem(bench_adaptive.LEVELS["tiny"], "thresholds", {"latent": [0.3]})
    with K.use_backend("reference"):     # the plain torch ops: fast, also under the interpreter
        rows = bench_adaptive.trained_rows(bench_adaptive.model_paths(str(trained))[0], "tiny")
    assert [r["mode"] for r in rows] == ["full_depth"] + ["early_exit"] * 3
    full = rows[0]
    assert full["model"] == str(trained) and full["task"] == "multihop-pointer"
    assert full["nodes"] == 5 and full["answer_agree"] == 1.0 and full["top1_agree"] == 1.0
    for r in rows[1:]:
        assert 1 <= r["mean_loops"] <= full["n_loops"] == 4
        assert 0 <= r["answer_agree"] <= 1 and 0 <= r["answer_acc"] <= 1 and r["mean_kl"] >= 0
    # recompute fills the exact cache: the same loops as the other fills, not fewer
    by = {(r["criterion"], r["fill"]): r for r in rows[1:]}
    assert by["latent", "recompute"]["mean_loops"] == by["latent", "latest"]["mean_loops"]


def _write(tmp_path, name, meta):
    p = tmp_path / f"{name}.safetensors"
    p.write_bytes(b"")
    if meta is not None:
        (tmp_path / f"{name}.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return str(p)


def test_bad_model_paths_refused_before_compute(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(bench_adaptive, "_model", boom)
    cases = [str(tmp_path / "missing.safetensors"), str(tmp_path),
             _write(tmp_path, "nojson", None), _write(tmp_path, "badjson", "{"),
             _write(tmp_path, "noconfig", {"regime": "x"}), _write(tmp_path, "listcfg", {"config": [1]})]
    for bad in cases:
        with pytest.raises(ValueError, match=bench_adaptive.MODELS_ENV):
            bench_adaptive.run_adaptive("tiny", models=bad)
    monkeypatch.setenv(bench_adaptive.MODELS_ENV, f"{_write(tmp_path, 'ok', {'config': {}})},{cases[0]}")
    with pytest.raises(ValueError, match="missing.safetensors"):
        bench_adaptive.run_adaptive("tiny")
    assert bench_adaptive.model_paths(" , ") == []
