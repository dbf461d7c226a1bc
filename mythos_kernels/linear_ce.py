"""Fused linear + cross-entropy for the tied LM head, the logits never whole.

For hidden states ``x [N, D]``, the head weight ``W [V, D]`` and targets ``t [N]``::

    z_i    = x_i @ W^T                                   # [V] logits of row i
    loss_i = logsumexp(z_i) - z_i[t_i]                   # 0 where t_i == ignore_index
    dz_i   = s_i * (softmax(z_i) - onehot(t_i))          # s_i: 1/n_valid (mean), 1 (sum)
    dx_i   = dz_i @ W,       dW = sum_i dz_i^T x_i

Rows are taken ``chunk_size`` at a time, so only ``[chunk, V]`` logits exist at once (the full
``[N, V]`` logits of ``F.cross_entropy(x @ W.T)`` are 2 GB in fp32 at N=16k, V=32k). As in
Liger-Kernel's FusedLinearCrossEntropy, for ``reduction="mean"`` / ``"sum"`` the gradients wrt x
and W are computed inside the forward chunk loop (the chunk's logits are at hand; three GEMMs in
all, none recomputed) and saved; the backward only scales them by the incoming scalar gradient.
``reduction="none"`` cannot do that (dW mixes rows with per-row output gradients): its forward
computes the losses only and the backward runs the loop again with ``s_i = grad_out_i``.

Each chunk's logits come from a library GEMM; the row step (log-sum-exp, the target's logit, and
the logits overwritten in place by ``dz``) is one Triton kernel on CUDA and plain torch on the
CPU. The loss sums and dW accumulate in fp32; half inputs are supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import choose
from ._registry import KernelConfig, register_kernel
from ._scratch import kept_output, scratch
from ._tl import next_pow2 as _p2
from .grad_sink import GradSink

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton missing
    triton = None
    tl = None

REDUCTIONS = ("mean", "sum", "none")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_empty = torch.empty   # every output the loop writes in full (tests swap in a NaN-filled one)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------

def linear_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                   ignore_index: int = -100, reduction: str = "mean"
                                   ) -> torch.Tensor:
    """Plain math: ``F.cross_entropy(x @ W^T, target)`` with the full logits (the test oracle)."""
    return F.cross_entropy(x @ weight.t(), target, ignore_index=ignore_index, reduction=reduction)


def _ce_rows_torch(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                   ignore_index: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The row step in plain torch. logits: [n, V], target: [n], scale: [n] fp32 -> (loss [n]
    fp32, dz [n, V] fp32 or None)."""
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    logp = torch.log_softmax(logits.float(), -1)                               # [n, V]
    loss = torch.where(valid, -logp.gather(1, t[:, None]).squeeze(1), 0.0)
    if not need_grad:
        return loss, None
    dz = logp.exp_()                                                           # softmax
    dz[torch.arange(len(t), device=t.device), t] -= 1.0
    dz.mul_(torch.where(valid, scale, 0.0)[:, None])                           # ignored rows: 0
    return loss, dz


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _ce_rows_kernel(Z, TARGET, SCALE, LOSS, stride_z, stride_s, V, ignore_index,
                        HAS_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        """One row of logits z [V]: loss = logsumexp(z) - z[t] (0 if t == ignore_index) by an
        online max / sum over BLOCK_V columns; with HAS_GRAD z is overwritten in place by
        s * (softmax(z) - onehot(t)) (0 for an ignored row), s = SCALE[row * stride_s]."""
        row = tl.program_id(0).to(tl.int64)
        z_row = Z + row * stride_z
        t = tl.load(TARGET + row)
        valid = t != ignore_index
        offs = tl.arange(0, BLOCK_V)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            z = tl.load(z_row + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        t_safe = tl.where(valid, t, 0)
        z_t = tl.load(z_row + t_safe).to(tl.float32)
        tl.store(LOSS + row, tl.where(valid, lse - z_t, 0.0))
        if HAS_GRAD:
            scale = tl.where(valid, tl.load(SCALE + row * stride_s), 0.0)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                c_ok = cols < V
                z = tl.load(z_row + cols, mask=c_ok, other=0.0).to(tl.float32)
                g = tl.exp(z - lse) - tl.where(cols == t_safe, 1.0, 0.0)
                g = tl.where(valid, g * scale, 0.0)
                tl.store(z_row + cols, g.to(Z.dtype.element_ty), mask=c_ok)


_MAX_BLOCK_V = 4096   # columns per step of the row kernel (tests lower it to cover several steps)


def _row_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def _ce_rows_triton(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                    ignore_index: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The row step as one Triton launch; logits [n, V] (row-contiguous) become dz in place."""
    n, V = logits.shape
    loss = _empty(n, device=logits.device, dtype=torch.float32)
    block_v = min(_MAX_BLOCK_V, _p2(V))
    _ce_rows_kernel[(n,)](logits, target, scale, loss, logits.stride(0), scale.stride(0), V,
                          ignore_index, HAS_GRAD=need_grad, BLOCK_V=block_v,
                          num_warps=_row_warps(block_v))
    return loss, (logits if need_grad else None)


# ----------------------------------------------------------------------------------------------
# The chunk loop (both implementations), autograd
# ----------------------------------------------------------------------------------------------

def default_chunk_size(N: int, D: int, V: int) -> int:
    """Rows per chunk: the chunk's logits about as large as x itself (Liger's rule), at least 16M
    elements (64 MB in fp32: on the CPU 512-row chunks at V=32k ran ~10% faster than 128-row
    ones, as fast as the full logits), a power of two, at most N."""
    target = max(N * D, 1 << 24) // max(V, 1)
    return max(1, min(N, 1 << max(0, target.bit_length() - 1)))


def _chunk_loop(x, weight, target, ignore_index, chunk, scale, need_dx, need_dw, impl):
    """Run the chunks: (loss [N] fp32, dx [N, D] in x's dtype or None, dW [V, D] fp32 or None).

    ``scale`` [N] fp32 (a stride-0 view for one value) multiplies the logits' gradient. The
    reference computes in fp32 throughout; the Triton path keeps the GEMMs in the input dtype
    (fp32 accumulation inside the library GEMM) and sums dW's chunks in fp32."""
    N, D = x.shape
    need_grad = need_dx or need_dw
    if impl == "triton":
        rows, w = _ce_rows_triton, weight
    else:
        rows, w = _ce_rows_torch, weight.float()
    loss = _empty(N, device=x.device, dtype=torch.float32)
    dx = _empty(N, D, device=x.device, dtype=x.dtype) if need_dx else None
    # dW: the first chunk's product written, later ones added (no zero fill of the [V, D] sum
    # unless there is no row)
    dw = None
    if need_dw and N:
        # kept from one step to the next once the caller drops it (its pages stay mapped)
        dw = kept_output("linear_ce_dw", tuple(weight.shape), torch.float32, x.device)
    if need_dw and dw is None:
        new = _empty if N else torch.zeros
        dw = new(weight.shape, device=x.device, dtype=torch.float32)
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        xc = x[r0:r1] if impl == "triton" else x[r0:r1].float()
        # [n, V]; on the CPU a kept scratch buffer (dies in this loop; its pages stay mapped)
        logits = torch.mm(xc, w.t(), out=scratch("linear_ce_logits", (r1 - r0, w.shape[0]),
                                                  xc.dtype, x.device))
        loss[r0:r1], dz = rows(logits, target[r0:r1], scale[r0:r1], ignore_index, need_grad)
        if need_dx:
            dx[r0:r1] = dz @ w
        if need_dw:
            if r0 == 0:
                torch.mm(dz.t(), xc, out=dw) if dz.dtype == torch.float32 else dw.copy_(dz.t() @ xc)
            elif dz.dtype == torch.float32:
                dw.addmm_(dz.t(), xc)
            else:
                dw += dz.t() @ xc
    return loss, dx, dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, ignore_index, reduction, chunk, impl, sink):
        N = x.shape[0]
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_valid = (target != ignore_index).sum()
        early = reduction != "none" and (need_dx or need_dw)
        if reduction == "mean":
            scale = (1.0 / n_valid.float()).expand(N)      # inf when all ignored: masked to 0
        else:
            scale = torch.ones((), device=x.device, dtype=torch.float32).expand(N)
        loss, dx, dw = _chunk_loop(x, weight, target, ignore_index, chunk, scale,
                                   need_dx and early, need_dw and early, impl)
        ctx.meta = (ignore_index, reduction, chunk, impl)
        ctx.sink, ctx.handed = sink, False
        if early:
            ctx.save_for_backward(dx, None if dw is None else dw.to(weight.dtype))
        elif reduction == "none":
            ctx.save_for_backward(x, weight, target)
        if reduction == "none":
            return loss.to(x.dtype)
        total = loss.sum()
        return (total / n_valid if reduction == "mean" else total).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        ignore_index, reduction, chunk, impl = ctx.meta
        if ctx.sink is not None and ctx.handed:
            raise RuntimeError("linear_cross_entropy with a grad_sink hands its weight gradient "
                               "over in its first backward; a second backward through the same "
                               "graph (retain_graph=True) needs grad_sink=None")
        if reduction != "none":
            dx, dw = ctx.saved_tensors
            if not (grad.is_cpu and float(grad) == 1.0):   # the usual loss.backward(): as saved
                dx = None if dx is None else dx * grad.to(dx.dtype)
                if dw is not None:      # handed to a sink: scaled in place (the sink's from here)
                    g = grad.to(dw.dtype)
                    dw = dw.mul_(g) if ctx.sink is not None else dw * g
        else:
            x, weight, target = ctx.saved_tensors
            need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            _, dx, dw = _chunk_loop(x, weight, target, ignore_index, chunk, grad.float(),
                                    need_dx, need_dw, impl)
            dw = None if dw is None else dw.to(weight.dtype)
        if ctx.sink is not None and dw is not None:
            ctx.sink.add(dw)
            ctx.handed, dw = True, None
        return dx, dw, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------

def _check(x, weight, target, ignore_index, reduction, chunk_size) -> None:
    for name, t in (("x", x), ("weight", weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or weight.dim() != 2 or target.dim() != 1:
        raise ValueError(f"need x [N, D], weight [V, D], target [N]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}, target {tuple(target.shape)}")
    if weight.shape[1] != x.shape[1] or target.shape[0] != x.shape[0]:
        raise ValueError(f"shapes disagree: x {tuple(x.shape)} needs weight [V, {x.shape[1]}] and "
                         f"target [{x.shape[0]}]; got weight {tuple(weight.shape)}, target "
                         f"{tuple(target.shape)}")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"x and weight must share one dtype of {[str(d) for d in _DTYPES]}; got x "
                        f"{x.dtype}, weight {weight.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 class indices, got {target.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if len({x.device, weight.device, target.device}) > 1:
        raise ValueError(f"x, weight, target on different devices: {x.device}, {weight.device}, "
                         f"{target.device}")
    if x.shape[1] == 0 or weight.shape[0] == 0:
        raise ValueError(f"need D >= 1 and V >= 1, got D={x.shape[1]}, V={weight.shape[0]}")
    V = weight.shape[0]
    bad = ((target < 0) | (target >= V)) & (target != ignore_index)
    if target.numel() and bool(bad.any()):
        raise ValueError(f"target holds class indices outside [0, {V}) that are not "
                         f"ignore_index={ignore_index}: e.g. {target[bad][:4].tolist()}")


def _unsupported(x: torch.Tensor) -> str | None:
    if triton is None:
        return "triton is not importable"
    if x.shape[0] >= 2 ** 31:
        return f"N={x.shape[0]} rows exceed the kernel's grid"
    return None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int | None = None, grad_sink: GradSink | None = None
                         ) -> torch.Tensor:
    """Cross-entropy of the logits ``x @ weight^T`` without holding them whole.

    Args:
        x:            [N, D] hidden states (fp32, bf16 or fp16).
        weight:       [V, D] head weight, x's dtype.
        target:       [N] int64 classes in [0, V), or ``ignore_index``.
        ignore_index: rows with this target add no loss and no gradient.
        reduction:    ``"mean"`` over non-ignored rows (NaN when every row is ignored, as
                      ``F.cross_entropy``), ``"sum"``, or ``"none"`` ([N], 0 on ignored rows).
        chunk_size:   rows per chunk; None picks :func:`default_chunk_size`.
        grad_sink:    a :class:`~mythos_kernels.grad_sink.GradSink` (``weight`` then normally
                      its ``attach`` alias): the weight's gradient is deposited there instead
                      of returned to autograd (a tied embedding adds its rows to the same
                      buffer); one backward per graph.

    Returns:
        The loss in x's dtype, differentiable wrt x and weight.
    """
    _check(x, weight, target, ignore_index, reduction, chunk_size)
    if grad_sink is not None and not isinstance(grad_sink, GradSink):
        raise TypeError(f"grad_sink must be a GradSink or None, got {type(grad_sink).__name__}")
    impl = choose("linear_cross_entropy", x, weight, target, supported=_unsupported(x))
    N, D = x.shape
    chunk = chunk_size or default_chunk_size(N, D, weight.shape[0])
    x = x.contiguous()
    weight = weight.contiguous()
    target = target.contiguous()
    return _LinearCrossEntropy.apply(x, weight, target, ignore_index, reduction, chunk, impl,
                                     grad_sink)


def linear_cross_entropy_chunked(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 chunk_size: int | None = None) -> torch.Tensor:
    """The chunked plain-torch implementation (what the CPU runs), no dispatch."""
    _check(x, weight, target, ignore_index, reduction, chunk_size)
    chunk = chunk_size or default_chunk_size(x.shape[0], x.shape[1], weight.shape[0])
    return _LinearCrossEntropy.apply(x.contiguous(), weight.contiguous(), target.contiguous(),
                                     ignore_index, reduction, chunk, "reference", None)


# ----------------------------------------------------------------------------------------------
# Bytes / FLOPs for the benchmark harness
# ----------------------------------------------------------------------------------------------

def linear_cross_entropy_flops(N: int, D: int, V: int) -> float:
    """Forward FLOPs: the logits GEMM (the row step's ~5 flops per logit is negligible)."""
    return 2.0 * N * D * V


def linear_cross_entropy_bytes(N: int, D: int, V: int, dtype: torch.dtype = torch.bfloat16
                               ) -> float:
    """Fused forward + gradients: x and W read, dx and dW written; the chunk logits are written
    and read twice (GEMM out, row step in place, two gradient GEMMs in)."""
    e = torch.empty(0, dtype=dtype).element_size()
    return e * (2 * N * D + 2 * V * D + 4 * N * V)


# ----------------------------------------------------------------------------------------------
# Compile-report registration
# ----------------------------------------------------------------------------------------------

def _register() -> None:
    if triton is None:  # pragma: no cover
        return
    cfgs = []
    for dt, ty in (("bf16", "*bf16"), ("fp16", "*fp16"), ("fp32", "*fp32")):
        for has_grad in (True, False):
            block_v = _MAX_BLOCK_V
            cfgs.append(KernelConfig(
                name=f"{dt}-{'grad' if has_grad else 'nograd'}-BV{block_v}",
                signature={"Z": ty, "TARGET": "*i64", "SCALE": "*fp32", "LOSS": "*fp32",
                           "stride_z": "i32", "stride_s": "i32", "V": "i32",
                           "ignore_index": "i32"},
                constexprs={"HAS_GRAD": has_grad, "BLOCK_V": block_v},
                num_warps=_row_warps(block_v), divisible=("stride_z", "V")))
    register_kernel("linear_ce_rows", _ce_rows_kernel, cfgs)


_register()

__all__ = [
    "default_chunk_size",
    "linear_cross_entropy",
    "linear_cross_entropy_bytes",
    "linear_cross_entropy_chunked",
    "linear_cross_entropy_flops",
    "linear_cross_entropy_reference",
]
