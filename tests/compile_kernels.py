"""Compile the triton backend's kernels for a GPU architecture without a GPU and report what came out.

Run by tests/test_ops_triton.py in a subprocess without TRITON_INTERPRET (the interpreter would
replace the compiler): ``python compile_kernels.py KERNELS_PY < JOBS_JSON``. Each job names a kernel
of ``KERNELS_PY`` (or of its sibling ``module``, e.g. ``_hopper``) and its constexprs, unit strides,
its fp32 and int32 (``i32_ptrs``, optional) pointers (``ptr_dtypes``: any other pointer's dtype, e.g.
``i64`` for a seed in memory; a pointer given in the constexprs is passed as that constant, e.g.
None), whether the layer's sizes and strides are multiples of 16 (``odd``: they are not, so no
integer argument gets the JIT's divisibility hint), pointer dtype, warps, stages, target
(``arch``, e.g. 90 for H100/H200, 86 for RTX 30xx) and its tuple arguments' elements (``tuples``: a
type, with ``:16`` for the divisibility hint, or a constant); the script prints one JSON object per
job, in order: the shared memory the compiled kernel asks for, ptxas's register and spill counts and whether
it serialized wgmma (its C7515 warning), facts about its PTX (wgmma or mma.sync tensor-core
instructions, pipelined copies, TMA copies, global reductions, plain stores) and ``error``, the
failure (a compile error, a broken pipelining rule, or machine code that reads a uniform register
no path has written) or None. Run it with an empty TRITON_CACHE_DIR: a cached kernel skips ptxas,
whose log gives the register counts. It compiles with the triton of the Python that runs it: the
test's own, or (FASTLORA_COMPILE_PYTHON) another environment's, e.g. the release a GPU machine runs,
to check that release's compiler (the kernel files import triton alone). Jobs run
in a process pool: compiling is single-threaded and CPU-bound.
"""

import contextlib
import importlib.machinery
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Scalars the launcher leaves unspecialized (no divisibility hint), as do_not_specialize says,
# plus the float scalars. Every other integer is compiled as a multiple of 16, as the JIT would
# see it for aligned tensors with 16-divisible sizes, unless the job is ``odd``.
UNSPECIALIZED = {"M", "R", "seed_lo", "seed_hi", "threshold", "scale", "inv_keep", "stride_bn", "stride_ar",
                 "rows_per_split", "N", "GROUP_ROWS", "m_blocks", "n_da", "n_db", "N_B", "first", "n_zero",
                 "selected", "sel_first"}
FLOATS = {"scale", "inv_keep"}
REDUCTION = re.compile(r"\b(red|atom)\.global\.")  # not the "shared.global" of cp.async; Triton 3.6 writes atom
REGISTERS = re.compile(r"Used (\d+) registers")
SPILLS = re.compile(r"(\d+) bytes spill stores")
SERIALIZED = "wgmma.mma_async instructions are serialized"  # ptxas's C7515 performance warning
# SASS as cuobjdump prints it: "/*0bd0*/  @!P0 UIADD3 UR22, UP0, UR22, 0x20, URZ ;"
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
PREDICATE = re.compile(r"^@!?U?P[T\d]+\s+")
JUMP = re.compile(r"^(BRA|BRX|JMP|JMX|CALL|EXIT|RET)\b")
UNIFORM_REG = re.compile(r"\bUR(\d+)\b")
WRITES_UNIFORM = ("S2UR", "R2UR", "CS2UR", "LDCU", "VOTEU", "REDUX")  # besides the U... instructions


def _kernels(path: str, module: str = "_kernels"):
    """The module ``module`` of the folder of ``path`` (``_kernels`` itself, or a sibling such as ``_hopper``, which
    imports from it relatively), loaded as part of a stand-in package: the real package's ``__init__`` needs a GPU."""
    package = "compiled_kernels"
    if package not in sys.modules:
        stand_in = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(package, None, is_package=True))
        stand_in.__path__ = [os.path.dirname(os.path.abspath(path))]
        sys.modules[package] = stand_in
    return importlib.import_module(f"{package}.{module}")


def pipelining_error(ttgir: str, arch: int) -> str | None:
    """No pipelined loop branches; on sm_90 each reads its shared-memory slots (local_load)
    before it refills them (async copies), else a branch may read a later tile (docs/triton-notes.md).
    (On sm_80-class targets Triton's prefetch loads the next iteration's operands from
    another slot after issuing the copies, by design, so the order says nothing there.)"""
    for body in ttgir.split("scf.for ")[1:]:  # a loop's own ops (up to a nested loop's head: the head's own)
        end = body.find("scf.yield")
        body = body[:end] if end >= 0 else body[:_closing_brace(body)]  # a loop without results has no yield
        if "scf.if" in body:
            return "a branch inside a pipelined loop"
        read, refill = body.rfind("ttg.local_load"), body.find("ttg.async_copy_global_to_local")
        if arch >= 90 and read >= 0 and refill >= 0 and read > refill:
            return "a shared-memory slot read after its refill"
    return None


def _closing_brace(text: str) -> int:
    """Where the block opened by the first ``{`` of ``text`` closes (the text's end if it does not)."""
    depth = 0
    for i, char in enumerate(text):
        depth += (char == "{") - (char == "}")
        if depth == 0 and char == "}":
            return i
    return len(text)


def _registers(first: int, count: int) -> int:
    """Uniform registers URfirst.. URfirst+count-1 as a bit mask."""
    return ((1 << count) - 1) << first


def _uniform_access(instruction: str) -> tuple[int, int]:
    """Bit masks of the uniform registers one SASS instruction (predicate stripped) reads and writes. A U...
    instruction's .64/.128 widens its register operands to pairs/quads (.WIDE: its result);
    ``desc[URn]`` is a 64-bit global-memory descriptor; ``gdesc[URn]`` holds wgmma's shared-memory
    descriptors of A (unless A comes from registers) and B."""
    if "UR" not in instruction:
        return 0, 0
    opcode, _, rest = instruction.partition(" ")
    operands = [op.strip() for op in rest.split(",")] if rest else []
    name, *mods = opcode.split(".")
    uniform = name.startswith("U") or name in WRITES_UNIFORM
    width = (4 if "128" in mods else 2 if "64" in mods else 1) if uniform else 1
    reads = writes = 0
    for i, operand in enumerate(operands):
        for found in re.finditer(r"\bgdesc\[UR(\d+)\]", operand):
            a_in_registers = i >= 2 and re.fullmatch(r"R\d+", operands[i - 1]) is not None
            reads |= _registers(int(found.group(1)) + 2, 2) if a_in_registers else _registers(int(found.group(1)), 4)
        for found in re.finditer(r"(?<!g)desc\[UR(\d+)\]", operand):
            reads |= _registers(int(found.group(1)), 2)
        operand = re.sub(r"g?desc\[UR\d+\]", "", operand)
        for found in UNIFORM_REG.finditer(operand):
            if i == 0 and uniform and UNIFORM_REG.fullmatch(operand):
                writes |= _registers(int(found.group(1)), 2 if "WIDE" in mods else width)
            else:
                reads |= _registers(int(found.group(1)), width)
    return reads, writes


def _control_flow(code: list) -> list[set]:
    """Each instruction's successors (indices) where it ends a basic block: a jump's target (any block, for an
    indirect one) and, unless it is an unconditional BRA, EXIT or RET, the next instruction."""
    position = {address: i for i, (address, _, _) in enumerate(code)}
    successors = []
    for i, (_, instruction, text) in enumerate(code):
        jump = JUMP.match(instruction)
        kind = jump.group(1) if jump else None
        target = re.search(r"(0x[0-9a-f]+)\s*$", instruction) if kind in ("BRA", "JMP", "CALL") else None
        following = set()
        if kind in ("BRX", "JMX"):
            following = set(range(len(code)))
        elif target and int(target.group(1), 16) in position:
            following.add(position[int(target.group(1), 16)])
        # BRA.U !UP0, 0x..., BRA.DIV UR4, 0x...: conditional like a predicated one
        conditional = text.startswith("@") or (kind == "BRA" and "," in instruction)
        if (kind is None or conditional or kind == "CALL") and i + 1 < len(code):
            following.add(i + 1)
        successors.append(following)
    return successors


def undefined_uniform_reads(sass: str) -> list[str]:
    """SASS instructions that read a uniform register which some path from the entry has not written.

    A forward must-be-written analysis over the basic blocks of the reachable code. Such a read is a
    compiler bug that made dx wrong on a GPU (ptxas 12.8: docs/triton-notes.md)."""
    code = [(int(address, 16), PREDICATE.sub("", text), text) for address, text in SASS_LINE.findall(sass)]
    if not code:
        return []
    successors = _control_flow(code)
    starts = sorted({0}.union(*successors, (i + 1 for i, (_, instruction, _) in enumerate(code)
                                            if JUMP.match(instruction) and i + 1 < len(code))))
    blocks = list(zip(starts, starts[1:] + [len(code)], strict=True))
    block_at = {start: b for b, (start, _) in enumerate(blocks)}
    block_successors = [{block_at[i] for i in successors[end - 1]} for _, end in blocks]
    predecessors = [[] for _ in blocks]
    for b, following in enumerate(block_successors):
        for successor in following:
            predecessors[successor].append(b)
    reachable, frontier = {0}, [0]
    while frontier:
        for b in block_successors[frontier.pop()] - reachable:
            reachable.add(b)
            frontier.append(b)
    reachable = sorted(reachable)
    access = [_uniform_access(instruction) for _, instruction, _ in code]
    block_writes = [0] * len(blocks)
    for b, (start, end) in enumerate(blocks):
        for i in range(start, end):
            block_writes[b] |= access[i][1]
    everything = _registers(0, 256)
    written_at_exit = [everything] * len(blocks)  # unreachable blocks keep "everything"

    def written_on_entry(b: int) -> int:
        if b == 0:
            return 0
        written = everything
        for p in predecessors[b]:
            written &= written_at_exit[p]
        return written

    changed = True
    while changed:  # the masks only shrink, to the fixed point
        changed = False
        for b in reachable:
            written = written_on_entry(b) | block_writes[b]
            changed |= written != written_at_exit[b]
            written_at_exit[b] = written
    found = []
    for b in reachable:
        start, end = blocks[b]
        written = written_on_entry(b)
        for i in range(start, end):
            if access[i][0] & ~written:
                found.append(f"/*{code[i][0]:04x}*/ {code[i][2]}")
            written |= access[i][1]
    return found


def _sass(cubin: bytes) -> str:
    """The machine code of a cubin, disassembled by the cuobjdump that ships with triton."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True,
                              check=True).stdout


def compile_job(path: str, job: dict) -> dict:
    fn = getattr(_kernels(path, job.get("module", "_kernels")), job["kernel"])
    constexprs = {**job["constexprs"], **{name: 1 for name in job["unit_strides"]}}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = ("*" + job["ptr_dtypes"][name] if name in job.get("ptr_dtypes", {})
                               else "*fp32" if name in job["fp32_ptrs"] else "*i32" if name in job.get("i32_ptrs", ())
                               else "*" + job["dtype"])
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
        odd = job.get("odd") and signature[name] == "i32"  # pointers stay 16-byte aligned, as torch allocates
        unspecialized = name in UNSPECIALIZED and (name != "N" or job["kernel"] == "_lora_down_kernel")
        if signature[name] != "constexpr" and not unspecialized and not odd:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name, elements in job.get("tuples", {}).items():  # tuple arguments, element by element
        i = fn.arg_names.index(name)
        types = []
        for j, element in enumerate(elements):
            if not isinstance(element, str):  # a constant, e.g. a unit stride the JIT makes a constexpr
                types.append("constexpr")
                constexprs[(i, j)] = element
                continue
            kind, _, divisor = element.partition(":")
            types.append(kind)
            if kind.startswith("*") or divisor:
                attrs[(i, j)] = [["tt.divisibility", 16]]
        signature[name] = tuple(types)
        attrs.pop((i,), None)
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
    undefined = undefined_uniform_reads(_sass(compiled.asm["cubin"]))
    error = pipelining_error(compiled.asm["ttgir"], job["arch"]) or (
        f"SASS reads uniform registers no path has written (a ptxas miscompile): {undefined[:3]}" if undefined
        else None)
    return {"error": error, "shared": compiled.metadata.shared,
            "registers": int(registers.group(1)) if registers else None,
            "spill_stores": int(spills.group(1)) if spills else None,
            "wgmma": "wgmma.mma_async" in ptx, "mma": "mma.sync" in ptx, "cp_async": "cp.async" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx, "wgmma_serialized": SERIALIZED in log.getvalue(),
            "reduction": bool(REDUCTION.search(ptx)), "store": "st.global" in ptx}


def main() -> None:
    path, jobs = sys.argv[1], json.load(sys.stdin)
    with ProcessPoolExecutor() as pool:
        for result in pool.map(compile_job, [path] * len(jobs), jobs):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
