"""mythos.train: training forward, truncated backprop, ponder term, router-bias balancing, data,
checkpoints and exact resume, the command line, and the Triton path under the interpreter."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import needs_kernels, spy, tiny_kwargs

import mythos_kernels as K
from mythos import MythosConfig, OpenMythos
from mythos.train import (
    IGNORE,
    LoadTracker,
    LoopSampler,
    PointerTask,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    lm_loss,
    load_checkpoint,
    train_forward,
    update_router_bias,
)
from mythos.train.cli import main
from mythos.train.data import BindingTask, TextLM
from mythos.train.trainer import resume_trainer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def micro_cfg(**over) -> MythosConfig:
    kw = dict(vocab_size=40, dim=32, n_heads=2, n_kv_heads=1, max_seq_len=32, max_loop_iters=4,
              prelude_layers=1, coda_layers=1, attn_type="gqa", n_experts=4, n_shared_experts=1,
              n_experts_per_tok=2, expert_dim=16, lora_rank=2)
    kw.update(over)
    return MythosConfig(**kw)


def small_run(out, **over) -> TrainConfig:
    kw = dict(task="pointer", steps=6, batch_size=4, seq_len=16, out=str(out), eval_every=0,
              save_every=0, warmup=2, lr=3e-3, n_loops=3)
    kw.update(over)
    return TrainConfig(**kw)


# -- training forward ----------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_train_forward_equals_model_forward(attn):
    torch.manual_seed(0)
    model = OpenMythos(MythosConfig(**tiny_kwargs(attn, act_threshold=0.9))).train()
    ids = torch.randint(0, 97, (2, 11))
    for n in (1, 3, 4):
        out = train_forward(model, ids, n)
        assert torch.equal(model.logits(out.h), model(ids, n_loops=n)), n


def _reference_truncated(model, ids, n, k, act):
    """The recurrence written out with the graph cut by detach() before iteration n - k."""
    rb = model.recurrent
    x = model.embed(ids)
    T = ids.shape[1]
    freqs = model.freqs_cis[:T]
    from mythos.model import CAUSAL
    for layer in model.prelude:
        x = layer(x, freqs, CAUSAL)
    e, h = x, x
    cum_p = torch.zeros(h.shape[:2])
    h_out = torch.zeros_like(h)
    inj, halt = rb.injection, rb.act.halt
    for t in range(n):
        if t == n - k:
            h, h_out, cum_p = h.detach(), h_out.detach(), cum_p.detach()
        xin = K.loop_input_reference(h, e, t, rb.norm.weight, rb.norm.eps, rb.loop_dim)
        out = rb.block(xin, freqs, CAUSAL)
        out = out + rb.lora(out, t)
        h, h_out, cum_p = K.lti_act_step_reference(h, e, out, h_out, cum_p, inj.log_A, inj.log_dt,
                                                   inj.B, halt.weight, halt.bias,
                                                   rb.cfg.act_threshold)
    y = h_out if act else h
    for layer in model.coda:
        y = layer(y, freqs, CAUSAL)
    return y


def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    fn().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("act", [True, False])
def test_truncated_backprop_cuts_the_graph_at_the_right_iteration(act):
    torch.manual_seed(1)
    model = OpenMythos(micro_cfg(act_threshold=5.0)).train()   # never halts: every loop runs
    ids = torch.randint(0, 40, (2, 9))
    n, k = 4, 2
    got = _grads(model, lambda: train_forward(model, ids, n, act=act, grad_loops=k).h)
    ref = _grads(model, lambda: _reference_truncated(model, ids, n, k, act))
    full = _grads(model, lambda: train_forward(model, ids, n, act=act).h)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-7, msg=name)
    # the cut matters: the full graph gives other gradients (else this test could not fail)
    assert not torch.allclose(full["recurrent.injection.log_A"], got["recurrent.injection.log_A"])
    # the prelude still gets gradients through e
    assert got["prelude.0.attn.wq.weight"].abs().sum() > 0


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(2)
    model = OpenMythos(micro_cfg(act_threshold=5.0)).train()   # every loop runs
    ids = torch.randint(0, 40, (2, 9))
    a = _grads(model, lambda: train_forward(model, ids, 3).h)
    with LoadTracker(model) as loads:
        b = _grads(model, lambda: train_forward(model, ids, 3, checkpoint=True).h)
        # recomputation in backward is not counted again: 3 loops x 18 tokens x top-2
        assert int(next(iter(loads.counts.values())).sum()) == 3 * 18 * 2
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.parametrize("n", [1, 3])
def test_expert_grads_summed_over_loops(monkeypatch, n):
    """The routed experts' weight gradients summed over the loops in one buffer per weight
    (``moe_summed_grads``) equal the per-loop gradients autograd adds up (variant off) and the
    reference backend's; a second backward through a kept graph gives them again."""
    import importlib

    M = importlib.import_module("mythos_kernels.cpu.moe")
    torch.manual_seed(5)
    model = OpenMythos(micro_cfg(act_threshold=5.0, n_experts=7)).train()   # every loop runs
    ids = torch.randint(0, 40, (3, 10))
    takes = spy(monkeypatch, M._LoopGrads, "take")
    got = _grads(model, lambda: train_forward(model, ids, n).h)
    assert len(takes) == 2                                          # w13 and w2, once each
    with K.cpu_variant("moe_summed_grads", False):
        off = _grads(model, lambda: train_forward(model, ids, n).h)
    with K.use_backend("reference"):
        ref = _grads(model, lambda: train_forward(model, ids, n).h)
    assert got.keys() == off.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], off[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-7, msg=name)
    model.zero_grad(set_to_none=True)
    loss = train_forward(model, ids, n).h.pow(2).mean()
    loss.backward(retain_graph=True)
    first = model.recurrent.block.ffn.w13.grad.clone()
    model.zero_grad(set_to_none=True)
    loss.backward()
    torch.testing.assert_close(model.recurrent.block.ffn.w13.grad, first, rtol=0, atol=0)
    # accumulation over two passes (other tokens): the second pass's kept sum buffer is not the
    # gradient the first pass left in .grad
    ids2 = ids.flip(1)
    second = _grads(model, lambda: train_forward(model, ids2, n).h)["recurrent.block.ffn.w13"]
    model.zero_grad(set_to_none=True)
    train_forward(model, ids, n).h.pow(2).mean().backward()
    train_forward(model, ids2, n).h.pow(2).mean().backward()
    torch.testing.assert_close(model.recurrent.block.ffn.w13.grad, first + second, rtol=1e-5,
                               atol=1e-8)


def test_checkpointing_recomputes_prelude_and_coda_in_backward():
    torch.manual_seed(3)
    model = OpenMythos(micro_cfg(act_threshold=5.0)).train()
    ids = torch.randint(0, 40, (2, 9))
    calls = []
    for name, layer in (("prelude", model.prelude[0]), ("coda", model.coda[0])):
        layer.register_forward_pre_hook(lambda *_, n=name: calls.append(n))
    for ckpt, per_layer in ((False, 1), (True, 2)):
        calls.clear()
        train_forward(model, ids, 2, checkpoint=ckpt).h.sum().backward()
        assert calls.count("prelude") == calls.count("coda") == per_layer, (ckpt, calls)


def test_ponder_depth_and_gradients():
    torch.manual_seed(3)
    model = OpenMythos(micro_cfg(act_threshold=0.9)).double()
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        model.recurrent.act.halt.bias.fill_(-0.5)
    out = train_forward(model, ids, 4)
    assert out.depth.shape == (2, 7)
    assert ((out.depth >= 1) & (out.depth <= out.n_loops + 1e-9)).all()
    b = model.recurrent.act.halt.bias
    (g,) = torch.autograd.grad(out.ponder, b)
    eps = 1e-6
    vals = []
    with torch.no_grad():
        for s in (1, -1):
            b.add_(s * eps)
            vals.append(float(train_forward(model, ids, 4).ponder))
            b.sub_(s * eps)
    fd = (vals[0] - vals[1]) / (2 * eps)
    assert abs(float(g) - fd) <= 1e-5 * max(1.0, abs(fd)), (float(g), fd)
    assert float(g) < 0          # a larger halting bias halts earlier


@pytest.mark.parametrize("thr", [2.0, 5.0, float("inf")])
def test_depth_stays_in_range_above_a_threshold_of_one(thr):
    """With act_threshold above 1 the halting probabilities sum past 1 unhalted: the depth
    still lies in [1, loops run] (capped mass), and without ACT it is the loops run."""
    import math

    torch.manual_seed(4)
    model = OpenMythos(micro_cfg(act_threshold=thr))
    with torch.no_grad():
        model.recurrent.act.halt.bias.fill_(1.0)          # p ~ 0.7 per loop
    ids = torch.randint(0, 40, (2, 7))
    out = train_forward(model, ids, 4)
    assert ((out.depth >= 1) & (out.depth <= out.n_loops + 1e-6)).all(), out.depth
    if math.isinf(thr):
        # p ~ 0.7: the capped mass reaches 1 within the second loop for every position
        assert (out.depth < 2.5).all()
    flat = train_forward(model, ids, 3, act=False)
    assert torch.equal(flat.depth, torch.full_like(flat.depth, 3.0))


# -- router-bias balancing -----------------------------------------------------------------------

def test_router_bias_update_balances_a_skewed_router():
    torch.manual_seed(4)
    model = OpenMythos(micro_cfg(n_experts=6))
    ffn = model.recurrent.block.ffn
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        ffn.router.weight[0] = x.mean((0, 1)) * 4      # expert 0 takes nearly every token
        ffn.router.weight[1] = x.mean((0, 1)) * 3
    tracker = LoadTracker(model)

    def loads():
        tracker.reset()
        with tracker, torch.no_grad():
            ffn(x)
        return tracker.counts[ffn]

    first = loads().double()
    update_router_bias(model, tracker.counts, rate=1e-2)
    assert ffn.router_bias[0] < 0 and ffn.router_bias[first.argmin()] > 0
    for _ in range(300):
        c = loads()
        update_router_bias(model, tracker.counts, rate=1e-2)
    last = c.double()
    assert (last.max() / last.mean()) < 0.6 * (first.max() / first.mean())
    assert abs(float(ffn.router_bias.mean())) < 1e-6


def test_router_bias_update_rejects_bad_input():
    model = OpenMythos(micro_cfg())
    with pytest.raises(ValueError, match="rate"):
        update_router_bias(model, {}, rate=float("nan"))
    with pytest.raises(ValueError, match="shape"):
        update_router_bias(model, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="rate"):
        update_router_bias(model, {}, rate="1e-3")
    update_router_bias(model, {}, rate=np.float32(1e-3))        # numpy scalars pass


# -- data ----------------------------------------------------------------------------------------

def test_pointer_task_answers_and_splits():
    task = PointerTask(20, hops=3)
    b = task.batch(0, "train", 5, 0, 4)
    assert b.ids.shape == (4, 20) and (b.targets[:, :-1] == IGNORE).all()
    for row, ans in zip(b.ids.tolist(), b.targets[:, -1].tolist()):
        body = row[row.index(1) - 2 * task.n:row.index(1)]
        pi = dict(zip(body[0::2], body[1::2]))
        cur = row[-2]
        for _ in range(3):
            cur = pi[cur]
        assert cur == ans
    assert torch.equal(task.batch(0, "train", 5, 0, 4).ids, b.ids)
    assert not torch.equal(task.batch(0, "eval", 5, 0, 4).ids, b.ids)
    c = BindingTask(30, hops=2).batch(1, "train", 0, 0, 3)
    assert (c.targets[:, -1] >= 5).all() and (c.targets[:, -1] < 15).all()


def test_pointer_answers_at_huge_hop_counts():
    """The answer is pi^hops(start) (repeated squaring: a hop count of 10^18 costs ~60
    compositions), the same tokens as walking the permutation hop by hop."""
    import time

    from mythos.train.data import _permutation_power

    rng = np.random.default_rng(1)
    pi = np.stack([rng.permutation(23) for _ in range(5)])
    for k in (0, 1, 2, 5, 46, 97):
        walk = np.tile(np.arange(23), (5, 1))
        for _ in range(k):
            walk = np.take_along_axis(pi, walk, 1)
        assert np.array_equal(_permutation_power(pi, k), walk), k
    t0 = time.perf_counter()
    b = PointerTask(40, hops=10 ** 18).batch(0, "train", 0, 0, 4)
    assert time.perf_counter() - t0 < 5 and b.ids.shape == (4, 40)


def test_text_data_needs_a_held_out_window(tmp_path):
    """Fewer tokens than one training and one held-out window, or token ids outside the
    vocabulary: a ValueError (the held-out split never overlaps the training one)."""
    with pytest.raises(ValueError, match="held out"):
        TextLM(np.arange(30) % 256, 16)
    with pytest.raises(ValueError, match="vocab_size"):
        TextLM(np.arange(1000), 8)
    t = TextLM(np.arange(34) % 256, 16)
    (a, b), (c, d) = t._split["train"], t._split["eval"]
    assert b <= c and b - a >= 17 and d - c >= 17


def test_text_data(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(bytes(range(256)) * 4)
    task = TextLM.from_files([str(f)], 16)
    b = task.batch(0, "train", 0, 0, 3)
    assert torch.equal(b.ids[:, 1:], b.targets[:, :-1])
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        TextLM.from_files([str(tmp_path / "empty.txt")], 16)


def test_loop_sampler():
    s = LoopSampler("poisson-lognormal", 4, 10)
    draws = [s(0, i) for i in range(400)]
    assert draws == [s(0, i) for i in range(400)] and 1 <= min(draws) and max(draws) <= 10
    assert 3.3 < sum(draws) / len(draws) < 4.7
    u = LoopSampler("uniform", 3, 5, min_loops=2)
    assert set(u(1, i) for i in range(100)) == {2, 3, 4, 5}
    with pytest.raises(ValueError, match="loop sampling"):
        LoopSampler("gauss", 3, 5)
    for bad, msg in [(dict(sigma=float("inf")), "sigma"), (dict(sigma=0), "sigma"),
                     (dict(mean=True), "mean"), (dict(mean=float("nan")), "mean"),
                     (dict(max_loops=5.0), "max_loops"), (dict(min_loops=0), "min_loops")]:
        with pytest.raises(ValueError, match=msg):
            LoopSampler(**{"mode": "poisson-lognormal", "mean": 3, "max_loops": 5, **bad})
    # numpy scalars, as the rest of the API takes them
    n = LoopSampler("poisson-lognormal", np.float32(3), np.int64(5), sigma=np.float64(0.5))
    assert type(n.max_loops) is int and 1 <= n(0, 0) <= 5


# -- training, checkpoints, resume ---------------------------------------------------------------

def test_loss_falls_on_pointer_task(tmp_path):
    tc = small_run(tmp_path, steps=40, batch_size=8, seq_len=12, hops=1, lr=1e-2, warmup=4)
    rows = Trainer(tc).run(progress=False)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    keys = {"step", "loss", "lr", "tokens_per_s", "n_loops", "grad_norm", "rho_A",
            "load_max_over_mean", "load_entropy", "mean_halt_depth", "skipped"}
    assert keys <= set(rows[0])


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_exact_resume_through_the_command_line(tmp_path):
    common = ["--seq-len", "12", "--batch-size", "3", "--grad-accum", "2", "--n-loops", "2.5",
              "--loop-sampling", "poisson-lognormal", "--max-loops", "4", "--eval-every", "0",
              "--warmup", "2", "--decay-steps", "6", "--no-progress"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(common + ["--steps", "6", "--out", a]) == 0
    assert main(common + ["--steps", "3", "--out", b]) == 0
    assert main(["--resume", b, "--steps", "6", "--no-progress"]) == 0
    from mythos.train.presets import tiny
    ma, mb = OpenMythos(tiny()), OpenMythos(tiny())
    load_checkpoint(latest_checkpoint(a), ma)
    load_checkpoint(latest_checkpoint(b), mb)
    pa, pb = _params(ma), _params(mb)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert pa["recurrent.block.ffn.router_bias"].abs().sum() > 0
    rows = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_resume_keeps_the_schedule_and_replaces_rows_after_the_checkpoint(tmp_path):
    """The cosine horizon defaults to the first command's --steps and a resume with more steps
    keeps it (the lr does not jump back up); rows a killed run wrote after its last checkpoint
    are replaced by the resumed run's, not followed by them."""
    common = ["--seq-len", "12", "--batch-size", "2", "--eval-every", "0", "--warmup", "0",
              "--no-progress"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(common + ["--steps", "4", "--save-every", "2", "--out", a]) == 0
    assert main(["--resume", a, "--steps", "7", "--no-progress"]) == 0
    lrs = [r["lr"] for r in map(json.loads, open(os.path.join(a, "metrics.jsonl")))]
    assert len(lrs) == 7
    assert all(x >= y for x, y in zip(lrs, lrs[1:])), lrs          # never back up
    d = TrainConfig()
    assert lrs[4:] == [pytest.approx(d.lr * d.min_lr_ratio)] * 3, lrs   # past the horizon 4
    # a run "killed" after step 3 (rows 1-3 written, newest checkpoint at step 2)
    assert main(common + ["--steps", "4", "--save-every", "2", "--out", b]) == 0
    import shutil
    ckpts = sorted(os.listdir(os.path.join(b, "checkpoints")))
    shutil.rmtree(os.path.join(b, "checkpoints", ckpts[-1]))        # drop step 4's checkpoint
    rows = open(os.path.join(b, "metrics.jsonl")).readlines()
    open(os.path.join(b, "metrics.jsonl"), "w").writelines(rows[:3])
    assert main(["--resume", b, "--steps", "4", "--no-progress"]) == 0
    steps = [r["step"] for r in map(json.loads, open(os.path.join(b, "metrics.jsonl")))]
    assert steps == [1, 2, 3, 4]


def test_out_folders_a_run_cannot_use(tmp_path, capsys):
    """--out that is a file, under a file, empty, or a folder with an earlier run's metrics (no
    checkpoint); --out with --resume naming another folder: errors naming the flag, exit 2,
    nothing written."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    base = ["--seq-len", "12", "--batch-size", "2", "--steps", "1", "--eval-every", "0",
            "--no-progress"]
    for out, msg in [(str(tmp_path / "afile"), "not a folder"),
                     (str(tmp_path / "afile" / "sub"), "not a writable folder"),
                     ("", "empty path"), (str(tmp_path / "old"), "earlier run")]:
        with pytest.raises(SystemExit) as e:
            main(base + ["--out", out])
        assert e.value.code == 2 and msg in capsys.readouterr().err, out
    assert (tmp_path / "old" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'
    run = str(tmp_path / "run")
    assert main(base + ["--out", run]) == 0
    with pytest.raises(SystemExit) as e:
        main(["--resume", run, "--steps", "2", "--out", str(tmp_path / "fork")])
    assert e.value.code == 2 and "omit --out" in capsys.readouterr().err
    assert not (tmp_path / "fork").exists()


def test_ctrl_c_saves_the_step_reached_and_resumes(tmp_path):
    """SIGINT to a running `python -m mythos.train`: it ends after the step in progress with a
    checkpoint of it (exit 130, a message naming --resume), and --resume continues from there."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mythos.train", "--seq-len", "12", "--batch-size", "2",
           "--steps", "100000", "--save-every", "0", "--eval-every", "0", "--no-progress",
           "--out", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "--resume" in err
    reached = latest_checkpoint(str(out))
    assert reached is not None
    step = int(os.path.basename(reached).split("-")[1])
    assert step >= 2
    assert main(["--resume", str(out), "--steps", str(step + 1), "--no-progress"]) == 0
    steps = [r["step"] for r in map(json.loads, open(metrics))]
    assert steps == list(range(1, step + 2))


def test_training_memory_is_checked_before_building(tmp_path, monkeypatch):
    """Weights, gradients and AdamW's two states (4 x the weights) beyond the device's memory:
    a ValueError naming the sizes before any model is built or anything is written."""
    import mythos.train.trainer as tr
    from mythos.config import allocation_terms

    weights = sum(allocation_terms(micro_cfg(), 4).values())
    monkeypatch.setattr(tr, "device_memory_bytes", lambda dev: 3 * weights)
    monkeypatch.setattr(tr, "OpenMythos", lambda cfg: pytest.fail("model built"))
    with pytest.raises(ValueError, match="AdamW's two states"):
        Trainer(small_run(str(tmp_path / "r")), micro_cfg())
    assert not (tmp_path / "r").exists()


def test_a_task_object_of_ones_own_trains_and_resumes_with_it(tmp_path, capsys):
    """Trainer(tc, task=obj) needs no task or data in the settings; a resume needs the object
    again (the command line and resume_trainer without it say so instead of training on the
    settings' default task); seq_len beyond the model's is refused up front."""
    from mythos.train import Task
    from mythos.train.data import Batch
    from mythos.train.trainer import resume_trainer

    class Copy(Task):
        name = "copy"
        vocab_size = 40

        def batch(self, seed, split, step, micro, batch_size):
            g = torch.Generator().manual_seed(seed * 1000 + step * 10 + micro)
            x = torch.randint(3, 40, (batch_size, self.seq_len + 1), generator=g)
            return Batch(x[:, :-1], x[:, 1:])

    out = str(tmp_path / "own")
    tc = TrainConfig(steps=2, batch_size=2, seq_len=12, out=out, eval_every=0)
    t = Trainer(tc, micro_cfg(), task=Copy(12))
    t.run(progress=False)
    with pytest.raises(ValueError, match="Task object"):
        resume_trainer(out, {"steps": 3})
    with pytest.raises(SystemExit) as e:
        main(["--resume", out, "--steps", "3", "--no-progress"])
    assert e.value.code == 2 and "Task object" in capsys.readouterr().err
    r = resume_trainer(out, {"steps": 3}, task=Copy(12))
    assert r.step == 2 and isinstance(r.task, Copy)
    r.run(progress=False)
    assert r.step == 3
    with pytest.raises(ValueError, match="max_seq_len"):
        Trainer(TrainConfig(out=str(tmp_path / "y")), micro_cfg(), task=Copy(64))


def test_data_paths_are_kept_absolute_for_a_resume_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_bytes(bytes(range(256)) * 4)
    monkeypatch.chdir(tmp_path / "d")
    base = ["--seq-len", "12", "--batch-size", "2", "--eval-every", "0", "--no-progress"]
    assert main(base + ["--data", "notes.txt", "--steps", "1", "--out", str(tmp_path / "r")]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["--resume", str(tmp_path / "r"), "--steps", "2", "--no-progress"]) == 0


def test_plot_skips_rows_it_cannot_place(tmp_path):
    """Hand-made or torn rows (no step, not an object, null values) are skipped, not a
    traceback."""
    (tmp_path / "metrics.jsonl").write_text(
        '{"loss": 3}\n[1, 2]\n{"step": 1, "loss": 2.0}\n{"step": 2, "loss": null}\n{"step": 3, "lo')
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").stat().st_size > 0


def test_checkpoints_past_eight_digit_steps_are_found(tmp_path):
    from mythos.train.checkpoint import list_checkpoints

    root = tmp_path / "checkpoints"
    for name in ("step-00000007", "step-123456789"):
        (root / name).mkdir(parents=True)
    assert latest_checkpoint(str(tmp_path)).endswith("step-123456789")
    assert len(list_checkpoints(str(tmp_path))) == 2


def test_checkpoint_loads_into_open_mythos_layouts(tmp_path, om):
    from safetensors.torch import load_file

    from mythos import to_open_mythos_state_dict
    cfg = micro_cfg()
    t = Trainer(small_run(tmp_path, steps=2, seq_len=12), cfg)
    t.run(progress=False)
    sd = load_file(os.path.join(latest_checkpoint(str(tmp_path)), "model.safetensors"))
    fresh = OpenMythos(cfg)
    fresh.load_state_dict(sd)
    ids = torch.randint(0, 40, (1, 8))
    assert torch.equal(fresh(ids, n_loops=2), t.model(ids, n_loops=2))
    ref = om.OpenMythos(om.MythosConfig(**cfg.__dict__))
    ref.load_state_dict(to_open_mythos_state_dict(sd))
    import importlib.util  # the converter tool reads the safetensors file too
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", os.path.join(os.path.dirname(__file__), "..", "tools", "convert_checkpoint.py"))
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    dst = str(tmp_path / "om.pt")
    assert conv.main([os.path.join(latest_checkpoint(str(tmp_path)), "model.safetensors"), dst,
                      "--to", "open-mythos"]) == 0
    ref.load_state_dict(torch.load(dst, weights_only=True))


def test_non_finite_step_is_skipped(tmp_path, monkeypatch):
    import mythos.train.trainer as tr
    t = Trainer(small_run(tmp_path), micro_cfg())
    before = _params(t.model)
    real = tr.lm_loss
    monkeypatch.setattr(tr, "lm_loss", lambda *a: real(*a) * float("nan"))
    row = t.train_step()
    assert row["skipped"] == 1 and t.step == 1
    after = _params(t.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.setattr(tr, "lm_loss", real)
    assert t.train_step()["skipped"] == 0
    t.log(row)                                  # strict JSON: the NaN loss written as null
    line = open(os.path.join(str(tmp_path), "metrics.jsonl")).read().splitlines()[-1]
    logged = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert logged["loss"] is None and logged["skipped"] == 1


def test_killed_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import mythos.train.checkpoint as ck
    t = Trainer(small_run(tmp_path, steps=2), micro_cfg())
    t.run(progress=False)
    good = latest_checkpoint(str(tmp_path))

    def boom(state, path):
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", boom)
    t.train_step()
    with pytest.raises(KeyboardInterrupt):
        t.save()
    monkeypatch.undo()
    assert latest_checkpoint(str(tmp_path)) == good
    r = resume_trainer(str(tmp_path), {"steps": 3})
    assert r.step == 2


def test_bad_command_lines_fail_before_training(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["--steps", "2", "--seq-len", "12", "--batch-size", "2", "--eval-every", "0",
                 "--out", run, "--no-progress"]) == 0
    ck = os.path.join(latest_checkpoint(run), "model.safetensors")
    stamp = os.stat(ck).st_mtime_ns
    bad = [["--bogus"], ["--steps", "0"], ["--batch-size", "-2"], ["--lr", "nan"], ["--lr", "0"],
           ["--task", "nope"], ["--data", str(tmp_path / "missing.txt")],
           ["--resume", str(tmp_path)], ["--resume", run, "--config", "small"],
           ["--resume", run, "--lr", "0.5"], ["--out", run], ["--config", "nope"],
           ["--seq-len", "100000"], ["--seed", str(2 ** 64)],
           ["--data", __file__, "--hops", "3"], ["--task", "pointer", "--tokenizer", "x"],
           ["--min-loops", "6", "--out", str(tmp_path / "m")]]
    (tmp_path / "empty.txt").write_bytes(b"")
    bad.append(["--data", str(tmp_path / "empty.txt")])
    for argv in bad:
        with pytest.raises(SystemExit) as exc:
            main(argv + ["--no-progress"])
        assert exc.value.code == 2, argv
        assert "error:" in capsys.readouterr().err, argv
    assert os.stat(ck).st_mtime_ns == stamp
    with open(ck, "r+b") as f:               # a corrupt checkpoint
        f.write(b"\0" * 64)
    with pytest.raises(SystemExit):
        main(["--resume", run, "--steps", "4", "--no-progress"])
    assert "corrupt" in capsys.readouterr().err
    import shutil
    older = os.path.join(run, "checkpoints", "step-00000001")     # an older one kept: named
    shutil.copytree(os.path.dirname(ck), older)
    with pytest.raises(SystemExit):
        main(["--resume", run, "--steps", "4", "--no-progress"])
    assert "step-00000001' is kept" in capsys.readouterr().err
    assert main(["plot", run]) == 0 and os.path.isfile(os.path.join(run, "metrics.png"))


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--config", "--task", "--hops", "--data", "--steps", "--batch-size", "--seq-len",
                 "--lr", "--seed", "--out", "--resume", "--eval-every", "--save-every",
                 "--n-loops", "--loop-sampling", "--max-loops", "--grad-loops", "--no-act",
                 "--ponder-weight", "--checkpoint-activations", "--bias-update-rate",
                 "--grad-accum", "--clip", "--warmup", "--keep", "--device", "--dtype",
                 "--log-every"):
        assert flag in text, flag


@pytest.mark.parametrize("fused", [True, False])
def test_lm_loss_matches_cross_entropy(fused):
    torch.manual_seed(5)
    model = OpenMythos(micro_cfg())
    h = torch.randn(2, 7, 32, requires_grad=True)
    t = torch.randint(0, 40, (2, 7))
    t[0, :3] = IGNORE
    ref = torch.nn.functional.cross_entropy(model.logits(h).reshape(-1, 40), t.reshape(-1),
                                            ignore_index=IGNORE)
    ref_g = torch.autograd.grad(ref, [h, model.head.weight, model.norm.weight])
    loss = lm_loss(model, h, t, fused=fused)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    got_g = torch.autograd.grad(loss, [h, model.head.weight, model.norm.weight])
    for name, g, r in zip(("dh", "dW_head", "dnorm"), got_g, ref_g):
        torch.testing.assert_close(g, r, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("fused", [True, False])
def test_lm_loss_on_the_forward_output_shares_the_tied_gradient(fused, monkeypatch):
    """``lm_loss(model, out)`` (the tied weight's gradients in one sink) gives the gradients of
    the plain path (no sink: ``model.embed`` and autograd's sum) for every parameter; no sink
    without autograd, for an untied head or an embedding with a padding index."""
    import mythos.train.recurrence as rec
    from mythos.train.recurrence import tied_sink

    torch.manual_seed(6)
    model = OpenMythos(micro_cfg(vocab_size=37))
    ids = torch.randint(0, 37, (2, 9))
    t = torch.randint(0, 37, (2, 9))
    t[1, :4] = IGNORE
    grads = []
    for use_sink in (False, True):
        with monkeypatch.context() as m:
            if not use_sink:
                m.setattr(rec, "tied_sink", lambda model: None)
            model.zero_grad(set_to_none=True)
            out = train_forward(model, ids, 3)
        assert (out.grad_sink is not None) == (out.head_weight is not None) == use_sink
        (lm_loss(model, out, t, fused=fused) * 0.7).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "embed.weight" in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
    with torch.no_grad():
        assert train_forward(model, ids, 2).grad_sink is None
    model.head.weight = torch.nn.Parameter(model.embed.weight.detach().clone())
    assert tied_sink(model) is None
    model.head.weight = model.embed.weight
    assert tied_sink(model) is not None
    model.embed.padding_idx = 0
    assert tied_sink(model) is None


def test_train_forward_takes_numpy_integers_and_checks_them():
    torch.manual_seed(1)
    model = OpenMythos(micro_cfg())
    ids = torch.randint(0, 40, (1, 5))
    a = train_forward(model, ids, np.int64(2), grad_loops=np.int32(1))
    b = train_forward(model, ids, 2, grad_loops=1)
    assert a.n_loops == b.n_loops == 2 and torch.equal(a.h, b.h)
    for kw, msg in [(dict(n_loops=2.0), "n_loops"), (dict(n_loops=0), "n_loops"),
                    (dict(n_loops=2, grad_loops=True), "grad_loops")]:
        with pytest.raises(ValueError, match=msg):
            train_forward(model, ids, **kw)


def test_lm_loss_rejects_a_non_bool_flag():
    model = OpenMythos(micro_cfg())
    with pytest.raises(TypeError, match="fused"):
        lm_loss(model, torch.randn(1, 3, 32), torch.zeros(1, 3, dtype=torch.long), fused=1)


@pytest.mark.parametrize("bad,msg", [
    (torch.zeros(2, 5, dtype=torch.long), r"leading shape \(2, 6\)"),   # shifted targets
    (torch.zeros(12, dtype=torch.long), "leading shape"),
    (torch.zeros(2, 7, dtype=torch.long), "leading shape"),
    (torch.zeros(2, 6), "int64 or int32"),
    ([[0] * 6] * 2, "int64 or int32"),
])
def test_lm_loss_and_accuracy_reject_targets_not_matching_h(bad, msg):
    """Targets that do not line up with h (the usual shift-by-one slip) are an error naming
    them, not a loss over mispaired rows; accuracy takes the ForwardOut as lm_loss does."""
    from mythos.train import answer_accuracy

    torch.manual_seed(2)
    model = OpenMythos(micro_cfg())
    ids = torch.randint(0, 40, (2, 6))
    out = train_forward(model, ids, 2)
    for call in (lambda t: lm_loss(model, out, t), lambda t: lm_loss(model, out.h, t, fused=False),
                 lambda t: answer_accuracy(model, out, t)):
        with pytest.raises(ValueError, match=msg):
            call(bad)
    t = torch.randint(0, 40, (2, 6))
    assert answer_accuracy(model, out, t) == answer_accuracy(model, out.h, t)
    assert answer_accuracy(model, out, t)[1] == 12


# -- the Triton path (interpreter on CPU) --------------------------------------------------------

@needs_kernels
def test_triton_training_steps_match_reference(tmp_path):
    def run(backend):
        with K.use_backend(backend):
            t = Trainer(small_run(tmp_path / backend, steps=2, batch_size=2, seq_len=12,
                                  warmup=0, lr=1e-2), micro_cfg(max_loop_iters=3))
            losses = [t.train_step()["loss"] for _ in range(2)]
        return losses, _params(t.model)

    la, pa = run("reference")
    K.reset_dispatch_counts()
    lb, pb = run("triton")
    assert K.dispatch_counts().get(("lti_act_step", "triton"), 0) > 0
    assert K.dispatch_counts().get(("moe_experts", "triton"), 0) > 0
    for x, y in zip(la, lb):
        assert abs(x - y) <= 1e-5 * abs(x)
    for k in pa:
        if not pa[k].is_complex():
            torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-5, msg=k)
