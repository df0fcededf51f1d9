"""Compile the Triton kernels ahead of time for a GPU target, without a GPU (tests and the docs' ptxas table).

The launchers are run on ``meta`` tensors (so they pick their CUDA tile sizes and no interpreter upcast) with
each ``@triton.jit`` kernel swapped for a recorder; every recorded launch is then compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` down to a cubin. This catches what the
interpreter cannot: type errors in the compiled dialect, ``tl.dot`` minimum sizes, loop-carried type changes,
shared-memory overflows at the chosen tile sizes. Register and spill counts come from the bundled ``ptxas
-v``.
"""

import importlib
import os
import re
import subprocess
import tempfile

import torch

_DTYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.uint8: "u8",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "u8",
}


class _Recorder:
    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.fn, grid, args, kwargs))

        return launch


def record_launches(module_name: str, call):
    """Run ``call()`` with every JIT kernel of ``vlm_accel.kernels._triton.<module_name>`` recorded, not
    run."""
    import triton

    mod = importlib.import_module(f"vlm_accel.kernels._triton.{module_name}")
    log = []
    saved = {}
    for name, obj in vars(mod).items():
        if isinstance(obj, triton.runtime.jit.JITFunction):
            saved[name] = obj
            setattr(mod, name, _Recorder(obj, log))
    try:
        call()
    finally:
        for name, obj in saved.items():
            setattr(mod, name, obj)
    return log


def _sig_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type {type(value)}")


def compile_launch(fn, args, kwargs, arch: int = 90):
    """Compile one recorded launch for ``sm_<arch>``; returns triton's CompiledKernel (has .asm['ptx'])."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = values[name]
        if name in constexpr_names:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        signature[name] = _sig_of(value)
        # the JIT's specialisation: 16-aligned pointers and ints divisible by 16 get a divisibility hint
        aligned = (
            value.data_ptr() % 16 == 0
            if isinstance(value, torch.Tensor)
            else (isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0)
        )
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in kwargs.items() if k not in names}
    src = ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_usage(kernel, arch: int = 90) -> dict:
    """Registers, spill stores/loads and shared memory per ptxas -v for a compiled kernel."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run(
            [
                ptxas,
                "-v",
                f"--gpu-name=sm_{arch}a" if arch == 90 else f"--gpu-name=sm_{arch}",
                path,
                "-o",
                os.path.join(tmp, "k.cubin"),
            ],
            capture_output=True,
            text=True,
        )
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill.group(1)) if spill else None,
        "spill_loads": int(spill.group(2)) if spill else None,
        "shared": kernel.metadata.shared,
    }


def meta(shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def kernel_matrix():
    """(label, module, call) for the configurations the docs' register/spill table and the AOT test
    compile."""
    from vlm_accel.kernels._triton import biased_attention as ba
    from vlm_accel.kernels._triton import compact as ck
    from vlm_accel.kernels._triton import head_sparse as hs
    from vlm_accel.kernels._triton import row_probs as rp

    cases = []
    for dt in (torch.bfloat16, torch.float32):
        name = _DTYPE[dt]
        for d in (64, 128):
            for reduce in ("none", "head_mean", "sum"):
                cases.append(
                    (
                        f"row_probs {name} D{d} {reduce}",
                        "row_probs",
                        lambda dt=dt, d=d, r=reduce: rp.attention_row_probs_triton(
                            meta((2, 28, 64, d), dt),
                            meta((2, 4, 1000, d), dt),
                            meta((2, 64, 1000), torch.bool),
                            0.1,
                            r,
                        ),
                    )
                )
        cases.append(
            (
                f"compact_kv {name} D128",
                "compact",
                lambda dt=dt: ck.compact_kv_triton(
                    [meta((2, 4, 1000, 128), dt)] * 3, meta((2, 250), torch.int64)
                ),
            )
        )
        for d in (64, 128):
            cases.append(
                (
                    f"head_sparse {name} D{d} G7",
                    "head_sparse",
                    lambda dt=dt, d=d: hs.head_sparse_decode_triton(
                        meta((2, 28, 1, d), dt),
                        meta((2, 4, 5000, d), dt),
                        meta((2, 4, 5000, d), dt),
                        meta((2, 28), torch.bool),
                        meta((2, 5000), torch.bool),
                        0.1,
                    ),
                )
            )
            for m, causal in ((1, False), (300, True)):
                cases.append(
                    (
                        f"biased_attn {name} D{d} M{m} causal={causal}",
                        "biased_attention",
                        lambda dt=dt, d=d, m=m, c=causal: ba.biased_attention_triton(
                            meta((2, 28, m, d), dt),
                            meta((2, 4, 1000, d), dt),
                            meta((2, 4, 1000, d), dt),
                            meta((2, 28, 1000), torch.float32),
                            meta((2, m, 1000), torch.bool),
                            c,
                            0.1,
                        ),
                    )
                )
    return cases


def main() -> None:
    """Print the register/spill table for every kernel configuration (markdown)."""
    print("| configuration | kernel | grid | warps | registers | spill st/ld (B) | shared (B) |")
    print("|---|---|---|---|---|---|---|")
    for label, module, call in kernel_matrix():
        for fn, grid, args, kwargs in record_launches(module, call):
            k = compile_launch(fn, args, kwargs)
            u = ptxas_usage(k)
            print(
                f"| {label} | {fn.__name__} | {grid} | {kwargs.get('num_warps', 4)} | {u['registers']} | "
                f"{u['spill_stores']}/{u['spill_loads']} | {u['shared']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
