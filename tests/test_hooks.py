"""Forward hooks, patched and replaced modules: where a fused kernel reads a module's weights
instead of calling it (the loop norm, LTI injection, ACT halting, the head, MLA's kv_norm /
kv_up, the LoRA scale, an inactive dropout), a hook on it, a patched forward or another module
in its place makes the model call it, as open-mythos does (``mythos.modules.must_call``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import assert_close, make_pair, tiny_kwargs

import mythos
from mythos.modules import ACTHalting

# modules open-mythos calls and mythos's fast path reads only the weights of
FUSED = ("head", "recurrent.norm", "recurrent.injection", "recurrent.act", "recurrent.act.halt",
         "recurrent.lora.scale")
MLA_FUSED = ("recurrent.block.attn.kv_norm", "recurrent.block.attn.kv_up",
             "prelude.0.attn.kv_norm", "coda.0.attn.kv_up")


def _record(model, names) -> list[str]:
    calls: list[str] = []
    for name in names:
        model.get_submodule(name).register_forward_hook(
            lambda mod, i, o, name=name: calls.append(name))
    return calls


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("grad", [False, True])
def test_hooks_see_the_calls_open_mythos_makes(om, attn, grad):
    """The same hook calls in the same order as open-mythos, the same logits; ACT early exit
    (a low threshold) stops both at the same loop."""
    names = FUSED + (MLA_FUSED if attn == "mla" else ())
    a, b = make_pair(om, **tiny_kwargs(attn, act_threshold=0.6))
    ids = torch.randint(0, 97, (2, 7))
    calls_a, calls_b = _record(a, names), _record(b, names)
    with torch.set_grad_enabled(grad):
        la, lb = a(ids, n_loops=4), b(ids, n_loops=4)
    assert calls_b == calls_a and "recurrent.act" in calls_a and "head" in calls_a
    assert_close("logits", la, lb, 1e-4)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_an_editing_hook_takes_effect_as_in_open_mythos(om, attn):
    """Interventions through hooks: ACT forced to halt at once, the injection's output scaled,
    the logits zeroed -- each as open-mythos gives it."""
    a, b = make_pair(om, **tiny_kwargs(attn))
    ids = torch.randint(0, 97, (1, 6))
    edits = {"recurrent.act": lambda mod, i, o: torch.ones_like(o),
             "recurrent.injection": lambda mod, i, o: o * 0.5}
    if attn == "mla":
        edits["recurrent.block.attn.kv_up"] = lambda mod, i, o: o * 1.5
    with torch.no_grad():
        plain = b(ids)
        for m in (a, b):
            for name, fn in edits.items():
                m.get_submodule(name).register_forward_hook(fn)
        la, lb = a(ids), b(ids)
        assert_close("logits", la, lb, 1e-4)
        assert (lb - plain).abs().max() > 1e-2
        for m in (a, b):
            m.head.register_forward_hook(lambda mod, i, o: o * 0)
        assert a(ids).abs().sum() == 0 and b(ids).abs().sum() == 0


def test_patched_and_replaced_modules_take_effect(monkeypatch):
    """A forward replaced on the class or set on an instance, and a head of another shape
    (a Linear with a bias), are used, not bypassed."""
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("gqa"))).eval()
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        ref = m(ids)
        monkeypatch.setattr(ACTHalting, "forward", lambda self, h: torch.full(h.shape[:-1], 0.3))
        patched = m(ids)
        monkeypatch.undo()
        assert (patched - ref).abs().max() > 1e-3
        torch.testing.assert_close(m(ids), ref, rtol=0, atol=0)
        inj = m.recurrent.injection
        inj.forward = lambda h, e, out: out
        assert (m(ids) - ref).abs().max() > 1e-3
        del inj.forward
        torch.testing.assert_close(m(ids), ref, rtol=0, atol=0)
        head = nn.Linear(60, 97, bias=True)
        head.weight = m.embed.weight
        nn.init.constant_(head.bias, 5.0)
        m.head = head
        torch.testing.assert_close(m(ids), ref + 5.0, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_module_path_gradients_equal_the_fused_path(attn):
    """An identity hook switches to the module path; in training (dropout off) its loss and
    every parameter gradient equal the fused path's within fp32 rounding."""
    torch.manual_seed(3)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs(attn, act_threshold=0.8))).train()
    ids, tgt = torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (2, 6))
    grads = []
    for hooked in (False, True):
        handles = []
        if hooked:
            handles = [m.get_submodule(n).register_forward_hook(lambda mod, i, o: None)
                       for n in FUSED + (MLA_FUSED if attn == "mla" else ())]
        m.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(m(ids, n_loops=3).flatten(0, 1), tgt.flatten())
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                      if p.grad is not None}))
        for h in handles:
            h.remove()
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


def test_hooks_in_decoding_with_a_cache():
    """With a cache (prefill then decode steps), hooks on kv_up and the ACT fire in every step
    and generation gives the same tokens as without them."""
    torch.manual_seed(4)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("mla"))).eval()
    ids = torch.randint(0, 97, (2, 5))
    ref = m.generate(ids, 4, n_loops=3, top_k=1)
    calls = _record(m, ("recurrent.block.attn.kv_up", "recurrent.act", "head"))
    out = m.generate(ids, 4, n_loops=3, top_k=1)
    assert torch.equal(out, ref)
    assert calls.count("head") == 4 and calls.count("recurrent.act") == 4 * 3
    assert calls.count("recurrent.block.attn.kv_up") == 4 * 3


def test_dropout_hook_fires_in_eval(om):
    """An inactive dropout (eval) is skipped unless hooked; hooked, it is called per block as in
    open-mythos."""
    a, b = make_pair(om, **tiny_kwargs("gqa"))
    ids = torch.randint(0, 97, (1, 4))
    name = "recurrent.block.resid_drop"
    calls_a, calls_b = _record(a, (name,)), _record(b, (name,))
    with torch.no_grad():
        a(ids, n_loops=2), b(ids, n_loops=2)
    assert calls_b == calls_a and len(calls_a) > 0


def test_training_loss_calls_a_hooked_or_biased_head():
    """``mythos.train.lm_loss`` calls a hooked head as the model does (same loss and gradients as
    the fused loss), and a head with a bias includes it."""
    from mythos.train import lm_loss, train_forward

    torch.manual_seed(5)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("gqa"))).train()
    ids, tgt = torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (2, 6))
    results = []
    for hooked in (False, True):
        calls = _record(m, ("head",)) if hooked else []
        m.zero_grad(set_to_none=True)
        loss = lm_loss(m, train_forward(m, ids, 2), tgt)
        loss.backward()
        results.append((loss.detach(), m.embed.weight.grad.clone(), calls))
    (l0, g0, _), (l1, g1, calls) = results
    assert calls == ["head"]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)
    m.head._forward_hooks.clear()
    head = nn.Linear(60, 97, bias=True)
    head.weight = m.embed.weight
    nn.init.constant_(head.bias, 0.0)
    head.bias.data[3] = 50.0                     # every position predicts token 3
    m.head = head
    with torch.no_grad():
        loss = lm_loss(m, train_forward(m, ids, 2), torch.full((2, 6), 3))
    assert loss < 1e-3


@pytest.mark.parametrize("grad_loops,checkpoint", [(None, False), (2, False), (None, True)])
def test_train_forward_calls_hooked_loop_modules(grad_loops, checkpoint):
    """The training forward runs the loop's modules where one is hooked: the hook sees each
    loop's call, and the output and gradients equal the fused step's."""
    from mythos.train import train_forward

    torch.manual_seed(6)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("mla", act_threshold=0.9))).train()
    ids = torch.randint(0, 97, (2, 6))
    results = []
    for hooked in (False, True):
        calls = _record(m, ("recurrent.act", "recurrent.norm")) if hooked else []
        m.zero_grad(set_to_none=True)
        out = train_forward(m, ids, 3, grad_loops=grad_loops, checkpoint=checkpoint)
        (out.h.square().mean() + out.ponder).backward()
        results.append((out.h.detach(), out.n_loops, calls,
                        {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (h0, r0, _, g0), (h1, r1, calls, g1) = results
    assert r0 == r1 and calls.count("recurrent.act") >= r1 and calls.count("recurrent.norm") >= r1
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)
