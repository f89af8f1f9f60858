"""4-bit linears on a CPU without a fresh full-precision weight per matmul (QLoRA's peak memory).

bitsandbytes computes a 4-bit ``Linear4bit`` on a CPU by dequantizing the whole weight to the compute
dtype and multiplying: forward (``MatMul4Bit`` -> ``gemm_4bit`` -> ``dequantize_4bit`` -> ``linear``) and
backward (``dequantize_4bit`` again, for the input's gradient) each allocate a new [out, in] tensor (up
to 11.5 MB in fp32 on a 1024 x 2816 MLP), use it once and free it. Those short-lived blocks come
between the activations that training keeps for backward; glibc's malloc, whose mmap threshold rises
after the first large free, serves them from its heap and keeps the holes they leave: QLoRA's heap
grew to ~1.9x its live activations against LoRA's ~1.6x (README, Performance, Memory).

Here each 4-bit linear on a CPU dequantizes into one buffer per thread and dtype, reused by every layer
(a view of its first out x in elements): the dequantized weight is dead as soon as its matmul returns,
so one buffer the size of the largest weight serves all. Same kernel (bitsandbytes' own CPU
dequantization, into our buffer), same ``linear``/``matmul``, same double-quant absmax handling as
``bitsandbytes.functional.dequantize_4bit``: outputs and gradients are bit-for-bit bitsandbytes' own
(tests/integration/test_cpu_nf4.py). Backward keeps only the packed 4-bit weight, as bitsandbytes does.
Anything this path does not cover (a GPU, an empty input, weights repacked for CPU inference, no native
bitsandbytes library) goes to bitsandbytes' own ``forward``.
"""

from __future__ import annotations

import threading
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_local = threading.local()  # per thread: {dtype: flat buffer}; autograd's CPU backward runs on the caller's thread


def _buffer(numel: int, dtype: "torch.dtype", slot: str = "weight") -> "torch.Tensor":
    """A flat ``dtype`` buffer of at least ``numel`` elements, this thread's, reused across calls."""
    import torch

    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    buf = pool.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        pool.pop((slot, dtype), None)  # free the smaller one first
        # a normal tensor even when first asked for under inference_mode: it is reused outside it too
        with torch.inference_mode(False), torch.no_grad():
            buf = pool[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buf


def pooled_bytes(dtype: "torch.dtype | None" = None) -> int:
    """Bytes the calling thread's dequantization buffers (of ``dtype``, or all) hold (for tests and benches)."""
    pool = getattr(_local, "pool", None) or {}
    return sum(b.numel() * b.element_size() for (_, dt), b in pool.items() if dtype in (None, dt))


def release() -> None:
    """Free the calling thread's buffers (the next 4-bit matmul allocates them again)."""
    _local.pool = {}


def _absmax(qs) -> "torch.Tensor":
    """The per-block fp32 scales, as ``bitsandbytes.functional.dequantize_4bit`` gets them; with double
    quant, dequantized into a shared buffer too (a small block per matmul otherwise, just as fragmenting)."""
    import ctypes as ct

    import torch
    from bitsandbytes.backends.cpu import ops as cpu_ops
    from bitsandbytes.functional import dequantize_blockwise, get_ptr

    if not qs.nested:
        return qs.absmax if qs.absmax.dtype == torch.float32 else qs.absmax.float()
    s2 = qs.state2
    if qs.absmax.dtype != torch.uint8 or s2.dtype != torch.float32 or not qs.absmax.is_contiguous():
        absmax = dequantize_blockwise(qs.absmax, s2)  # bitsandbytes' own path
        absmax += qs.offset
        return absmax if absmax.dtype == torch.float32 else absmax.float()
    n = qs.absmax.numel()
    absmax = _buffer(n, torch.float32, "absmax")[:n].view(qs.absmax.shape)
    # what bitsandbytes' CPU dequantize_blockwise kernel calls, into our buffer
    cpu_ops.lib.cdequantize_blockwise_cpu_fp32(get_ptr(s2.code), get_ptr(qs.absmax), get_ptr(s2.absmax),
                                              get_ptr(absmax), ct.c_longlong(s2.blocksize), ct.c_longlong(n))
    absmax += qs.offset
    return absmax


def dequantize(packed: "torch.Tensor", qs, dtype: "torch.dtype") -> "torch.Tensor":
    """The [out, in] weight of a 4-bit linear in ``dtype``, in the shared buffer: valid until the next call.

    The C kernel and its arguments are the ones bitsandbytes' CPU ``dequantize_4bit`` uses; its own
    fallbacks (odd widths, blocksize >= 2048 on AVX512) go through bitsandbytes and are copied in.
    """
    import ctypes as ct
    from math import prod

    import torch
    from bitsandbytes.backends.cpu import ops as cpu_ops
    from bitsandbytes.functional import get_ptr

    shape = tuple(qs.shape)
    n = prod(shape)
    out = _buffer(n, dtype)[:n].view(shape)
    absmax = _absmax(qs)
    kernel = _KERNELS.get((qs.quant_type, dtype))
    fallback = (kernel is None or len(shape) != 2 or shape[-1] % 2 != 0
                or (cpu_ops._has_avx512 and qs.blocksize >= 2048))
    if fallback:
        out.copy_(torch.ops.bitsandbytes.dequantize_4bit.default(
            packed, absmax, qs.blocksize, qs.quant_type, list(shape), dtype))
        return out
    A = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
    A = A.reshape(shape[0], shape[1] // 2)
    getattr(cpu_ops.lib, kernel)(get_ptr(A), get_ptr(absmax), get_ptr(out), ct.c_longlong(qs.blocksize),
                                 ct.c_longlong(shape[0]), ct.c_longlong(shape[1]))
    return out


def _kernels() -> dict:
    import torch

    return {(q, dt): f"cdequantize_blockwise_cpu_{q}_{name}" for q in ("nf4", "fp4")
            for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"))}


_KERNELS: dict = {}


class _PooledMatMul4bit:
    """Built lazily (torch is imported only when a 4-bit model is)."""

    fn = None

    @classmethod
    def get(cls):
        if cls.fn is None:
            import torch

            class PooledMatMul4bit(torch.autograd.Function):
                """x @ W.T + b with W dequantized into the shared buffer, forward and backward."""

                @staticmethod
                def forward(ctx, x, packed, bias, qs):
                    out = torch.nn.functional.linear(x, dequantize(packed, qs, x.dtype), bias)
                    ctx.qs, ctx.packed = qs, packed  # the 4-bit weight only, as bitsandbytes keeps it
                    return out

                @staticmethod
                def backward(ctx, grad_out):
                    grad_x = grad_bias = None
                    if ctx.needs_input_grad[0]:
                        grad_x = torch.matmul(grad_out, dequantize(ctx.packed, ctx.qs, grad_out.dtype))
                    if ctx.needs_input_grad[2]:
                        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
                    return grad_x, None, grad_bias, None

            cls.fn = PooledMatMul4bit
        return cls.fn


def pooled_forward(self, x: "torch.Tensor") -> "torch.Tensor":
    """``Linear4bit.forward`` with the dequantized weight in the shared buffer (bound to one layer)."""
    import torch
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(self)
    qs = self.weight.quant_state
    if (x.device.type != "cpu" or x.numel() == 0 or getattr(qs, "packing_format_for_cpu", False)
            or not _KERNELS):
        return type(self).forward(self, x)  # bitsandbytes' own path
    # the compute dtype and bias casts of Linear4bit.forward, unchanged
    if not self.compute_type_is_set:
        self.set_compute_type(x)
        self.compute_type_is_set = True
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    bias = self.bias
    if bias is not None:
        if bias.dtype != x.dtype:
            bias.data = bias.data.to(x.dtype)
        bias = bias.to(self.compute_dtype)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        out = _PooledMatMul4bit.get().apply(x, self.weight, bias, qs)
    else:
        out = torch.nn.functional.linear(x, dequantize(self.weight, qs, x.dtype), bias)
    return out.to(inp_dtype)


def install(model: "torch.nn.Module") -> int:
    """Give every CPU ``Linear4bit`` of ``model`` the pooled forward; returns how many got it.

    Only where bitsandbytes' native CPU library is loaded (else its pure-torch fallback runs as before).
    """
    import bitsandbytes as bnb
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        return 0
    if not _KERNELS:
        _KERNELS.update(_kernels())
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.device.type == "cpu":
            module.forward = types.MethodType(pooled_forward, module)
            n += 1
    return n


def is_installed(module: "torch.nn.Module") -> bool:
    """Whether ``module`` runs the pooled forward."""
    fwd = module.__dict__.get("forward")
    return getattr(fwd, "__func__", None) is pooled_forward
