"""Per-token early exit from the recurrent loop during cached decoding.

A decode step runs the prelude, then the looped block at depths ``t = 0, 1, ...``; after each
depth a row (one token) may exit by one of three criteria:

* ``act``: its cumulative ACT halting probability reaches ``threshold`` (default the config's
  ``act_threshold``: open-mythos's own rule; past that depth the ACT output no longer changes);
* ``kl``: ``KL(p_t || p_{t-1}) < threshold`` where ``p_t = softmax(head(norm(coda(y_t))))`` is
  the next-token distribution of the depth-``t`` exit output ``y_t``, from depth 1 on: the real
  prediction path (as Huginn's exit KL), so it costs a coda and a head per depth. The coda reads
  its cache for past positions without writing it (:func:`mythos.cache.read_only`); it writes
  its cache once, for the final output;
* ``latent``: ``||h_t - h_{t-1}|| / ||h_t|| < threshold`` on the recurrent state, from depth 1 on.

An exited row's output is ``y = h_out + r * h`` (``h_out`` the ACT accumulation, ``r`` the
unspent halting mass ``1 - cum_p`` if it has not halted, else 0: ACT's remainder rule applied at
the exit depth); a row that never exits gives the full-depth ``h_out``. Every loop depth's cache
still gets one entry per token; at the depths a row skipped it is, by ``fill``:

* ``recompute``: the row keeps running (its output frozen at the exit): the cache is exactly the
  full-depth one, no time saved;
* ``latest``: a copy of the row's entry at its deepest computed depth (Huginn's rule);
* ``project``: the attention's cache projection of the row's frozen state ``h`` at that depth:
  ``attn_norm(loop_input(h, e, t))`` through the key/value path only (MLA: latent and rope key;
  GQA: K and V), no attention output, no MoE.

Rows exit independently through masks. Two forms of the step give the same tokens and values:
the eager one (the CPU default) stops the loop once every row has exited (one host read per
depth; never for ``recompute``), skipping compute; the capturable one (the CUDA default) runs
every depth with the updates of rows already out masked by ``torch.where``: no host read, no
data-dependent branch, so it can be captured in a CUDA graph. With a position tensor it is the
static step (cache written by index), which ``mythos.adaptive.generate`` captures.
"""

from __future__ import annotations

from typing import Optional

import torch

import mythos_kernels as K

from ._validate import check_choice, check_float
from .cache import read_only

CRITERIA = ("act", "kl", "latent")
FILLS = ("recompute", "latest", "project")


def check_exit_args(criterion, threshold, fill, cfg) -> tuple[Optional[str], Optional[float], str]:
    """Validated ``(exit_criterion, exit_threshold, exit_fill)``; the threshold defaults to the
    config's ``act_threshold`` for ``act`` and is required for ``kl`` and ``latent``."""
    if criterion is not None:
        check_choice("exit_criterion", criterion, CRITERIA + (None,))
    fill = check_choice("exit_fill", fill, FILLS)
    if criterion is None:
        if threshold is not None:
            raise ValueError("exit_threshold given without exit_criterion ('act', 'kl' or 'latent')")
        return None, None, fill
    if threshold is None:
        if criterion != "act":
            raise ValueError(f"exit_criterion={criterion!r} needs exit_threshold (a number > 0)")
        threshold = cfg.act_threshold
    hi = 1.0 if criterion == "act" else None
    threshold = check_float("exit_threshold", threshold, lo=0, hi=hi, lo_open=True)
    return criterion, threshold, fill


def kv_projection(attn: torch.nn.Module, xn: torch.Tensor, freqs: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """What ``attn`` (MLA or GQA) caches for the normed input ``xn`` [B, T, D] at RoPE
    ``freqs``: ``{"c_kv", "k_rope"}`` or ``{"k", "v"}``, computed as its forward does."""
    B, T, _ = xn.shape
    if hasattr(attn, "kv_lora_rank"):
        r = attn.kv_lora_rank
        kv_raw = attn.kv_down(xn)
        k_rope = kv_raw[..., r:].unsqueeze(2)
        k_rope = K.apply_rope(k_rope.expand(B, T, min(2, attn.n_heads), attn.qk_rope_dim),
                              freqs)[:, :, 0]
        c_kv = attn.kv_norm(kv_raw[..., :r])
        return {"c_kv": c_kv.to(kv_raw.dtype), "k_rope": k_rope}
    k = K.apply_rope(attn.wk(xn).view(B, T, attn.n_kv_heads, attn.head_dim), freqs)
    return {"k": k, "v": attn.wv(xn).view(B, T, attn.n_kv_heads, attn.head_dim)}


def _entry(lc, pos: int, positions: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of position ``pos`` (or the position tensor ``positions`` [1]) of every buffer."""
    if positions is None:
        return {n: b[:, pos:pos + 1].clone() for n, b in lc.buffers.items()}
    return {n: b.index_select(1, positions) for n, b in lc.buffers.items()}


def _overwrite(lc, pos: int, positions: Optional[torch.Tensor], rows: torch.Tensor,
               new: dict[str, torch.Tensor]) -> None:
    """Position ``pos`` (or ``positions``) of layer cache ``lc`` set to ``new`` where ``rows``
    [B] (bool) holds."""
    for n, b in lc.buffers.items():
        m = rows.view((-1,) + (1,) * (b.dim() - 1))
        if positions is None:
            b[:, pos:pos + 1] = torch.where(m, new[n].to(b.dtype), b[:, pos:pos + 1])
        else:
            b.index_copy_(1, positions, torch.where(m, new[n].to(b.dtype),
                                                    b.index_select(1, positions)))


def exit_output(h: torch.Tensor, h_out: torch.Tensor, cum_p: torch.Tensor, thr: float
                ) -> torch.Tensor:
    """``h_out + r * h`` with ``r = 1 - cum_p`` for rows that have not halted (else 0)."""
    r = torch.where(cum_p < thr, (1.0 - cum_p).clamp(min=0), torch.zeros_like(cum_p))
    return h_out + r.unsqueeze(-1) * h.to(h_out.dtype)


def hidden_step(model, tok: torch.Tensor, cache: dict, pos: int, n_loops: Optional[int],
                criterion: str, threshold: float, fill: str, capturable: Optional[bool] = None,
                positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step with early exit: tokens [B, 1] at position ``pos`` appended to ``cache``
    (which holds every layer and depth for positions [0, pos)) -> (hidden [B, D] before the
    final norm, loops each row ran [B] int64).

    Args:
        capturable: run every depth with masked updates (no host read; module docstring);
            default: for CUDA tensors. False: stop once every row has exited.
        positions: an int64 tensor [1] holding ``pos`` on ``tok``'s device: the static step
            (cache written at that index of a :class:`~mythos.cache.MythosCache` filled by a
            prefill, attention masked by position; the caller tracks the cache length); always
            capturable.
    """
    if positions is not None:
        if capturable is False:
            raise ValueError("capturable=False with positions: the static step is capturable")
        capturable = True
    elif capturable is None:
        capturable = tok.is_cuda
    cfg, rec = model.cfg, model.recurrent
    n_loops = n_loops or cfg.max_loop_iters
    B = tok.shape[0]
    x = model.embed(tok)
    table = model.freqs_cis_mla if cfg.attn_type == "mla" else model.freqs_cis
    freqs = table[pos:pos + 1] if positions is None else table.index_select(0, positions)
    for i, layer in enumerate(model.prelude):
        x = layer(x, freqs, None, cache, f"prelude_{i}", positions)
    e = h = x
    coda_keys = [f"coda_{i}" for i in range(len(model.coda))]
    peek = read_only(cache, coda_keys) if criterion == "kl" else None

    def log_p(y_t: torch.Tensor) -> torch.Tensor:
        """log softmax of the next-token logits of exit output ``y_t``: coda (reading the cache,
        writing nothing), final norm, head."""
        z = y_t.to(e.dtype)
        for key, layer in zip(coda_keys, model.coda):
            z = layer(z, freqs, None, peek, key, positions)
        return torch.log_softmax(model.logits(z[:, -1]).float(), -1)

    thr_act = cfg.act_threshold
    acc = K.acc_dtype(h.dtype)
    cum_p = torch.zeros(B, 1, device=h.device, dtype=acc)
    h_out = torch.zeros(B, 1, h.shape[-1], device=h.device, dtype=acc)
    y = h_out
    inj, halt, norm = rec.injection, rec.act.halt, rec.norm
    x_in = K.loop_input(h, e, 0, norm.weight, norm.eps, rec.loop_dim)
    active = torch.ones(B, dtype=torch.bool, device=h.device)
    depth = torch.zeros(B, dtype=torch.long, device=h.device)
    last: Optional[dict] = None
    prev_logp = None
    t = -1
    for t in range(n_loops):
        key = f"recurrent_loop_{t}"
        out = rec.block(x_in, freqs, None, cache, key, positions)
        delta = rec.lora(out, t)
        if delta.dtype != out.dtype:
            out, delta = out + delta, None
        nxt = (t + 1, norm.weight, norm.eps, rec.loop_dim) if t + 1 < n_loops else None
        res = K.lti_act_step(h, e, out, h_out, cum_p, inj.log_A, inj.log_dt, inj.B,
                             halt.weight, halt.bias, thr_act, next_loop=nxt, delta=delta)
        a3 = active.view(B, 1, 1)
        lc = cache[key]
        if fill == "latest" and last is not None:   # rows already out: their fill here
            _overwrite(lc, pos, positions, ~active, last)
        entry = _entry(lc, pos, positions)
        last = entry if last is None else {n: torch.where(
            active.view((-1,) + (1,) * (v.dim() - 1)), entry[n], last[n]) for n, v in entry.items()}
        h_prev = h
        if fill == "recompute":
            h = res[0]
        else:
            h = torch.where(a3, res[0], h)
        h_out = torch.where(a3, res[1], h_out)
        cum_p = torch.where(active.view(B, 1), res[2], cum_p)
        depth += active.long()
        y_t = exit_output(h if fill != "recompute" else res[0], h_out, cum_p, thr_act)
        logp = log_p(y_t) if criterion == "kl" else None
        if criterion == "act":
            stop = cum_p[:, 0] >= threshold
        elif t == 0:
            stop = torch.zeros_like(active)
        elif criterion == "latent":
            diff = (res[0] - h_prev).float().norm(dim=-1)[:, 0]
            stop = diff < threshold * res[0].float().norm(dim=-1)[:, 0]
        else:
            kl = (logp.exp() * (logp - prev_logp)).sum(-1)
            stop = kl < threshold
        prev_logp = logp
        stop = stop & active
        y = torch.where(stop.view(B, 1, 1), y_t, y)
        active = active & ~stop
        if nxt is None:
            break
        x_next = res[3]
        if fill == "project":   # rows out: the next block writes the projection of their state
            x_next = torch.where(active.view(B, 1, 1), x_next,
                                 K.loop_input(h, e, t + 1, norm.weight, norm.eps, rec.loop_dim))
        x_in = x_next
        if not capturable and fill != "recompute" and not bool(active.any()):
            break
    for t2 in range(t + 1, n_loops):          # depths no row reached: filled for every row
        lc = cache[f"recurrent_loop_{t2}"]
        if fill == "latest":
            lc.append(**last)
        else:
            blk = rec.block
            xn = blk.attn_norm(K.loop_input(h, e, t2, norm.weight, norm.eps, rec.loop_dim))
            lc.append(**kv_projection(blk.attn, xn, freqs))
    y = torch.where(active.view(B, 1, 1), h_out, y)
    x = y.to(e.dtype)
    for key, layer in zip(coda_keys, model.coda):
        x = layer(x, freqs, None, cache, key, positions)
    return x[:, -1], depth


__all__ = ["CRITERIA", "FILLS", "check_exit_args", "exit_output", "hidden_step", "kv_projection"]
