"""Triton kernels behind the ops of :mod:`vlm_accel.kernels`.

Imported lazily (only when an op takes its Triton path), so the package works without triton. Every kernel is
written so the Triton interpreter can run it on CPU tensors: pointer arithmetic (no block pointers), explicit
masks on every load, no ``libdevice``/inline asm, no autotune, and an ``UPCAST`` constexpr that casts 16-bit
tiles to fp32 before ``tl.dot`` under the interpreter (its bf16 dot is wrong, triton-lang/triton#11584).
"""
