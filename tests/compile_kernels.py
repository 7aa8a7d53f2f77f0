"""Compile the triton backend's kernels for a GPU architecture without a GPU and report what came out.

Run by tests/test_ops_triton.py in a subprocess without TRITON_INTERPRET (the interpreter
would replace the compiler): ``python compile_kernels.py KERNELS_PY < JOBS_JSON``. Each job
names a kernel of ``KERNELS_PY`` and its constexprs, unit strides, pointer dtype, warps,
stages and target (``arch``, e.g. 90 for H100/H200, 86 for RTX 30xx); the script prints one
JSON object per job, in order: the shared memory the compiled kernel asks for, ptxas's
register and spill counts, facts about its PTX (wgmma or mma.sync tensor-core instructions,
pipelined copies, global reductions, plain stores) and ``error``, the failure (a compile error or a
broken pipelining rule) or None. Run it with an empty TRITON_CACHE_DIR: a cached kernel
skips ptxas, whose log gives the register counts.
Jobs run in a process pool: compiling is single-threaded and CPU-bound.
"""

import contextlib
import importlib.util
import io
import json
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Scalars the launcher leaves unspecialized (no divisibility hint), as do_not_specialize says,
# plus the float scalars. Every other integer is compiled as a multiple of 16, as the JIT would
# see it for aligned tensors with 16-divisible sizes.
UNSPECIALIZED = {"M", "R", "seed_lo", "seed_hi", "threshold", "scale", "inv_keep", "stride_bn", "stride_ar",
                 "rows_per_split"}
FLOATS = {"scale", "inv_keep"}
REDUCTION = re.compile(r"\bred\.global\.")  # not the "shared.global" of cp.async
REGISTERS = re.compile(r"Used (\d+) registers")
SPILLS = re.compile(r"(\d+) bytes spill stores")


def _kernels(path: str):
    spec = importlib.util.spec_from_file_location("kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pipelining_error(ttgir: str, arch: int) -> str | None:
    """No pipelined loop branches; on sm_90 each reads its shared-memory slots (local_load)
    before it refills them (async copies): the first dB kernel read a refilled slot inside an
    scf.if. (On sm_80-class targets Triton's prefetch loads the next iteration's operands from
    another slot after issuing the copies, by design, so the order says nothing there.)"""
    for body in ttgir.split("scf.for ")[1:]:
        body = body[:body.index("scf.yield")]
        if "scf.if" in body:
            return "a branch inside a pipelined loop"
        read, refill = body.rfind("ttg.local_load"), body.find("ttg.async_copy_global_to_local")
        if arch >= 90 and read >= 0 and refill >= 0 and read > refill:
            return "a shared-memory slot read after its refill"
    return None


def compile_job(path: str, job: dict) -> dict:
    fn = getattr(_kernels(path), job["kernel"])
    constexprs = {**job["constexprs"], **{name: 1 for name in job["unit_strides"]}}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in job["fp32_ptrs"] else "*" + job["dtype"]
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
        if signature[name] != "constexpr" and name not in UNSPECIALIZED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's log goes to stdout: captured below
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", job["arch"], 32),
                                      options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    except Exception as error:  # reported per job, so that one failure does not hide the others
        return {"error": f"{type(error).__name__}: {str(error)[-1500:]}"}
    ptx, registers, spills = compiled.asm["ptx"], REGISTERS.search(log.getvalue()), SPILLS.search(log.getvalue())
    return {"error": pipelining_error(compiled.asm["ttgir"], job["arch"]), "shared": compiled.metadata.shared,
            "registers": int(registers.group(1)) if registers else None,
            "spill_stores": int(spills.group(1)) if spills else None,
            "wgmma": "wgmma.mma_async" in ptx, "mma": "mma.sync" in ptx, "cp_async": "cp.async" in ptx,
            "reduction": bool(REDUCTION.search(ptx)), "store": "st.global" in ptx}


def main() -> None:
    path, jobs = sys.argv[1], json.load(sys.stdin)
    with ProcessPoolExecutor() as pool:
        for result in pool.map(compile_job, [path] * len(jobs), jobs):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
