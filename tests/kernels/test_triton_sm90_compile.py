"""The Triton kernels compiled (not run) for an H100/H200 (sm_90), without a GPU.

The interpreter runs the kernels' logic on CPU but not Triton's GPU compiler, which rejects things the
interpreter accepts (a loop-carried value changing type, shared memory over the limit). Compiling
ahead of time for sm_90 catches those here. Runs in a subprocess: kernels defined under
TRITON_INTERPRET=1 (this test session) are interpreter objects, not compilable ones.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import importlib
    import itertools
    import re
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tophash = importlib.import_module("memoir_kernels.tophash")
    down_proj = importlib.import_module("memoir_kernels.down_proj")
    fused = importlib.import_module("memoir_kernels.tophash_residual")
    target = GPUTarget("cuda", 90, 32)
    SMEM_LIMIT = 227 * 1024

    PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    SPILL_LIMIT = 256  # bytes per thread; a [BLOCK_T, BLOCK_K] int64 tile of mask words spilled 2 KB

    def spilled_bytes(kernel):
        """Spill stores ptxas reports for the kernel's PTX (its own -v output)."""
        with tempfile.TemporaryDirectory() as folder:
            ptx = Path(folder) / "kernel.ptx"
            ptx.write_text(kernel.asm["ptx"])
            log = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", str(ptx), "-o", str(ptx) + ".o"],
                                 capture_output=True, text=True, check=True).stderr
        return max(int(n) for n in re.findall(r"(\\d+) bytes spill stores", log))

    # This process compiles every SHARDS-th build, starting at SHARD (the test runs one process per core).
    SHARD, SHARDS = int(sys.argv[1]), int(sys.argv[2])
    numbering = itertools.count()

    def build(fn, signature, constants, num_warps=4, num_stages=3):
        if next(numbering) % SHARDS != SHARD:
            return
        constants = dict(constants)
        signature = dict(signature, **{name: "constexpr" for name in constants})
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants), target=target,
                                options={"num_warps": num_warps, "num_stages": num_stages})
        assert kernel.metadata.shared <= SMEM_LIMIT, (fn.__name__, constants, kernel.metadata.shared)
        spills = spilled_bytes(kernel)  # the same bundled ptxas triton.compile just used
        assert spills <= SPILL_LIMIT, (fn.__name__, constants, num_warps, spills)

    # Size and stride arguments: i32 (what Triton passes for values below 2^31) and i64 (what it
    # passes above: a stride or length past 2^31). The kernels form their row offsets in int64
    # either way; the i64 build checks they still compile, fit in shared memory and do not spill.
    for size in ("i32", "i64"):
        for has_window in (True, False):
            acts = {"acts_ptr": "*bf16", "acts_batch_stride": size, "acts_token_stride": size, "window_ptr": "*i1"}
            # A long prompt: partial sums over chunks of tokens and blocks of columns, then the select.
            build(tophash._tophash_partial_kernel,
                  dict(acts, partial_ptr="*fp32", count_ptr="*fp32", tokens=size, dim=size, chunk=size),
                  {"HAS_WINDOW": has_window, "BLOCK_D": tophash.PARTIAL_BLOCK_D}, num_warps=4)
            for split in (False, True):
                build(tophash._tophash_kernel,
                      dict(acts, mu_ptr="*fp32", inv_perm_ptr="*i64", scratch_ptr="*i32", out_ptr="*i64",
                           partial_ptr="*fp32", count_ptr="*fp32", tokens=size, dim=size, words=size, k="i32",
                           chunks=size),
                      {"HAS_WINDOW": has_window, "HAS_MU": True, "SPLIT": split, "BLOCK_D": 16384, "BLOCK_WORDS": 16},
                      num_warps=8)
        build(fused._tophash_residual_kernel,
              {"key_ptr": "*fp32", "inv_perm_ptr": "*i64", "a_ptr": "*bf16", "mem_ptr": "*fp32", "out_ptr": "*bf16",
               "tokens": size, "dim": size, "hidden": size, "k": "i32", "stride_a": size},
              {"DOT_FP32": True, "BLOCK_D": 16384, "BLOCK_T": 32, "BLOCK_N": 64, "BLOCK_K": 64})

    common = {"a_ptr": "*bf16", "w_ptr": "*bf16", "mem_ptr": "*fp32", "rows_ptr": "*i64", "bits_ptr": "*i64",
              "slot_ptr": "*i64", "gate_ptr": "*i1", "bias_ptr": "*bf16", "base_ptr": "*bf16", "out_ptr": "*bf16",
              "per_row": "i32", "min_overlap": "i32"}
    flags = {"ROWS_BY_DIVISION": True, "ROUTED": False, "HAS_BASE": False, "IN_PLACE": False, "HAS_BIAS": True,
             "ROUND_RESIDUAL": True}
    # The routed variant (the edited layer's): bank row index[r], int32 overlaps as the gate, base given;
    # out of place and in place (out is base: ungated tiles read and write nothing).
    routed_common = dict(common, gate_ptr="*i32")
    routed = dict(flags, ROUTED=True, HAS_BASE=True, HAS_BIAS=False)

    def sizes(size, *names):
        return {name: size for name in names + ("dim", "hidden", "words", "stride_a", "stride_base", "stride_out")}

    variants = ((common, flags), (routed_common, routed), (routed_common, dict(routed, IN_PLACE=True)))
    for size in ("i32", "i64"):
        for sig, consts in variants:
            # Every autotuning candidate with i32 sizes; with i64 sizes, every candidate of the routed
            # variant (the product path) and the first of the others (compile time).
            every = size == "i32" or consts is routed
            for config in down_proj.GATHER_CONFIGS if every else down_proj.GATHER_CONFIGS[:1]:
                build(down_proj._down_proj_gather_kernel, dict(sig, **sizes(size)),
                      dict(consts, **config.kwargs), config.num_warps, config.num_stages)
            for config in down_proj.DENSE_CONFIGS if every else down_proj.DENSE_CONFIGS[:1]:
                build(down_proj._down_proj_dense_kernel, dict(sig, **sizes(size, "tokens")),
                      dict(consts, DOT_FP32=False, **config.kwargs), config.num_warps, config.num_stages)
    print("compiled", next(numbering))
''')


def test_triton_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: really compile
    shards = max(1, min(4, len(os.sched_getaffinity(0))))
    workers = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(shard), str(shards)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for shard in range(shards)]
    outputs = [worker.communicate(timeout=900) for worker in workers]
    results = [(worker.returncode, *output) for worker, output in zip(workers, outputs, strict=True)]
    for returncode, _stdout, stderr in results:
        if returncode != 0 and "ptxas" in stderr and "not found" in stderr.lower():
            pytest.skip("Triton's bundled ptxas is missing")
        assert returncode == 0, stderr[-3000:]
    # Every shard walked the same list of builds, so none was left out.
    assert len({stdout.split()[-1] for _code, stdout, _err in results}) == 1
