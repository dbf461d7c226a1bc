"""Small pieces shared by the Triton kernel files."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing
    triton = None
    tl = None


def next_pow2(x: int, lo: int = 16) -> int:
    """The smallest power of two >= x, and at least ``lo`` (block sizes for ``tl.arange``)."""
    return max(lo, 1 << (int(x) - 1).bit_length())


if triton is not None:

    @triton.jit
    def dot_f32(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b in fp32. IEEE: exact fp32 products (fp32 inputs, no TF32). UPCAST: feed the
        dot fp32 operands -- only under TRITON_INTERPRET, whose Triton 3.6 dot multiplies bf16
        operands as their raw uint16 bits."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)
