"""mythos.experiments: the multi-hop task (deterministic, answers correct by construction),
evaluation past max_loop_iters (the LoRA index clamps), and --quick runs of every command."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from mythos import MythosConfig, OpenMythos
from mythos.experiments.cli import main
from mythos.experiments.common import MultiHopPointer, Size, load_model, model_config, save_model
from mythos.train import IGNORE, train_forward

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _follow(ids: np.ndarray, n: int) -> tuple[int, int]:
    """(answer, hop count) read off one sequence: skip the padding, decode the edge tokens into pi,
    count the ``?`` tokens and chase that many times."""
    assert ids[-1] == 2
    k = int(np.nonzero(ids)[0][0])                # first non-pad token: the first edge
    edges = ids[k:k + n] - 3 - n
    assert (edges >= 0).all() and (edges < n * n).all()
    pi = {int(e) // n: int(e) % n for e in edges}
    s, marks = int(ids[k + n]) - 3, ids[k + n + 1:-1]
    assert 0 <= s < n and (marks == 1).all() and (ids[:k] == 0).all()
    cur = s
    for _ in range(len(marks)):
        cur = pi[cur]
    return cur + 3, len(marks)


@pytest.mark.parametrize("nodes", [2, 5, 8])
def test_multihop_answers_correct(nodes):
    task = MultiHopPointer(nodes, (1, 2, 3), max_hops=5)
    n = nodes
    assert task.vocab_size == 3 + n + n * n and task.seq_len == n + 2 + 5
    for h in (1, 2, 3, 5):
        b = task.batch(3, "eval", 1, 0, 64, hops=h)
        ids, tg = b.ids.numpy(), b.targets.numpy()
        assert ids.shape == (64, n + 2 + 5) and (tg[:, :-1] == IGNORE).all()
        assert (ids[:, :5 - h] == 0).all()               # one layout per hop count: 5 - h pads
        for i in range(64):
            e = ids[i, 5 - h:5 - h + n] - 3 - n          # every node once as a source and as a target
            assert sorted((e // n).tolist()) == list(range(n)) and sorted((e % n).tolist()) == list(range(n))
            assert (tg[i, -1], h) == _follow(ids[i], n)


def test_multihop_mixed_hops_and_determinism():
    task = MultiHopPointer(7, (1, 4))
    a, b = task.batch(7, "train", 5, 0, 128), task.batch(7, "train", 5, 0, 128)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.ids, task.batch(8, "train", 5, 0, 128).ids)
    assert not torch.equal(a.ids, task.batch(7, "eval", 5, 0, 128).ids)
    ids = a.ids.numpy()
    assert ids.shape == (128, 7 + 2 + 4) and task.batch(7, "train", 5, 0, 2, hops=4).ids.shape == (2, 13)
    # every answer is pi^h of the start for the h its ? marks spell (left-padded), 1 and 4 both occur
    got = [_follow(ids[i], 7) for i in range(128)]
    assert all(ans == a.targets[i, -1].item() for i, (ans, _) in enumerate(got))
    assert {h for _, h in got} == {1, 4}


@pytest.mark.parametrize("bad", [dict(hops=()), dict(hops=(0,)), dict(hops=(1, True)), dict(hops=("2",)),
                                 dict(nodes=1), dict(nodes=4.0), dict(nodes=True), dict(max_hops=1),
                                 dict(max_hops=2.0)])
def test_multihop_bad_args(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        MultiHopPointer(**{"hops": (1, 2), **bad})
    with pytest.raises(ValueError, match="hops"):
        MultiHopPointer(4, (1, 2)).batch(0, "eval", 0, 0, 2, hops=3)


def test_eval_past_max_loop_iters_clamps_lora():
    """Beyond max_loop_iters, loop t uses the last LoRA scale row (open-mythos's clamp): a model
    whose extra rows are overwritten gives the same output at 2 * max_loop_iters loops."""
    torch.manual_seed(0)
    cfg = model_config(Size(dim=32, expert_dim=16, nodes=5, train_loops=2))
    big = MythosConfig(**{**cfg.__dict__, "max_loop_iters": 8})
    m, m8 = OpenMythos(cfg).eval(), OpenMythos(big).eval()
    sd = m.state_dict()
    sd8 = {k: v.clone() for k, v in sd.items()}
    scale = sd["recurrent.lora.scale.weight"]                         # [4, r]
    sd8["recurrent.lora.scale.weight"] = torch.cat([scale, scale[-1:].expand(4, -1)])
    m8.load_state_dict(sd8)
    ids = MultiHopPointer(5).batch(0, "eval", 0, 0, 4).ids
    with torch.no_grad():
        a = train_forward(m, ids, 8, act=False).h
        b = train_forward(m8, ids, 8, act=False).h
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        # and the rows past the clamp matter when they differ
        sd8["recurrent.lora.scale.weight"][5:] += 1.0
        m8.load_state_dict(sd8)
        assert not torch.allclose(a, train_forward(m8, ids, 8, act=False).h)
        ref = m(ids, n_loops=8)
        assert torch.isfinite(ref).all()


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    cfg = model_config(Size(dim=32, expert_dim=16, nodes=5, train_loops=2))
    m = OpenMythos(cfg).eval()
    p = save_model(m, str(tmp_path / "m.safetensors"), {"config": cfg.__dict__})
    m2 = load_model(p)
    ids = MultiHopPointer(5).batch(0, "eval", 0, 0, 2).ids
    with torch.no_grad():
        torch.testing.assert_close(m(ids, n_loops=3), m2(ids, n_loops=3), rtol=0, atol=0)


def _finite(x) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return True


@pytest.mark.parametrize("cmd,png", [("depth", "depth.png"), ("act-scan", "act_scan.png"),
                                     ("vs-dense", "vs_dense.png")])
def test_quick_runs(tmp_path, cmd, png):
    out = str(tmp_path / cmd)
    assert main([cmd, "--out", out, "--quick", "--steps", "20", "--no-progress", "--device", "cpu"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert _finite(res)
    with open(os.path.join(out, png), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    models = os.listdir(os.path.join(out, "models"))
    assert any(m.endswith(".safetensors") for m in models)
    if cmd == "depth":
        L = res["train_loops"]
        assert set(res["regimes"]) == {"fixed", "sampled", "sampled-noact"}
        for r in res["regimes"].values():
            assert r["n_loops"] == list(range(1, 4 * L + 1))
            assert len(r["accuracy"]) == 4 * L and all(0 <= a <= 1 for a in r["accuracy"])
            assert len(r["hop_accuracy_at_train_loops"]) == len(res["eval_hops"])
            assert len(r["per_seed"][0]["curves"]["loss"]) == 20
        assert res["regimes"]["sampled-noact"]["act"] is False
    elif cmd == "act-scan":
        assert res["thresholds"] == [0.8, 0.9, 0.95, 0.99, 0.999]
        assert all(1 <= d <= res["eval_loops"] for d in res["halt_depth"])
    else:
        m = res["models"]
        assert m["looped"]["n_params"] == m["same-params"]["n_params"] < m["same-compute"]["n_params"]
        assert m["looped"]["blocks_per_token"] == m["same-compute"]["blocks_per_token"]


def test_cli_rejects_bad_input(tmp_path, capsys):
    for argv in (["depth", "--out", str(tmp_path), "--steps", "0"],
                 ["depth", "--out", str(tmp_path), "--seeds", "a"],
                 ["depth", "--out", str(tmp_path), "--quick", "--scale"],
                 ["act-scan", "--out", str(tmp_path), "--device", "nope"],
                 ["nope", "--out", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert not os.listdir(tmp_path)
