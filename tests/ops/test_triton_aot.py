"""Every Triton kernel compiles for real GPUs (sm_90, and sm_80 in the slow sweep) with the dtypes, variants
and autotune configs it is launched with: tests/triton_aot.py records the launches of each op's real
launcher on CPU tensors and compiles them with ``triton.compile`` to cubins, no GPU needed. The
interpreter used by the other op tests checks arithmetic, not what the GPU compiler accepts."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "triton_aot.py")


def _need_nvidia_backend():
    pytest.importorskip("triton")
    try:
        from triton.backends import backends as triton_backends
    except ImportError:
        pytest.skip("this Triton has no backend registry")
    if "nvidia" not in triton_backends:
        pytest.skip("Triton's NVIDIA backend is not installed")


def _run(args, timeout, **extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTPEFT_TRITON_AUTOTUNE")}
    env.update(extra_env)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=timeout)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("no ptxas for ahead-of-time compilation")
    return out


def _summary(out):
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1])


def test_every_triton_kernel_compiles_for_hopper():
    """One launch per kernel and dtype combination (fp32 / fp16 / bf16 activations, fp32 or
    activation-dtype parameters), first autotune config, compiled for sm_90."""
    _need_nvidia_backend()
    out = _run([SCRIPT, "--arch", "90", "--quick"], timeout=900)
    s = _summary(out)
    assert out.returncode == 0 and not s["failures"], "\n".join(s["failures"]) + out.stderr[-2000:]
    assert len(s["kernels"]) >= 13 and s["compiled"] >= len(s["kernels"])


@pytest.mark.slow
def test_all_launches_and_configs_compile_for_ampere_and_hopper():
    """Every distinct launch (dtypes x ranks x dropout x bias x activation ...) with its first autotune
    config, and every config of each autotuned kernel's first launch, compile for sm_80 and sm_90; each
    autotuned launch has a config within the shared-memory limit (~25 min on 2 cores; ``--all-configs``
    by hand compiles every config of every launch, hours)."""
    _need_nvidia_backend()
    out = _run([SCRIPT, "--arch", "90", "--arch", "80"], timeout=7200)
    s = _summary(out)
    assert out.returncode == 0 and not s["failures"], "\n".join(s["failures"])


def test_harness_reports_a_kernel_the_gpu_compiler_rejects(tmp_path):
    """The check can fail: a kernel the GPU compiler rejects (tl.dot of bf16 with fp32 operands, which the
    interpreter runs) is a compile error; the same kernel with matching dtypes compiles."""
    _need_nvidia_backend()
    mod = tmp_path / "bad_kernel.py"
    mod.write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def _bad_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
            r = tl.arange(0, BLOCK)
            a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
            b = tl.load(b_ptr + r[:, None] * BLOCK + r[None, :])
            tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))
    '''))
    probe = textwrap.dedent(f'''
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {os.path.join(ROOT, "tests")!r}]
        import torch
        import triton_aot
        from bad_kernel import _bad_kernel
        bound = dict(a_ptr=torch.zeros(16, 16, dtype=torch.bfloat16), b_ptr=torch.zeros(16, 16),
                     c_ptr=torch.zeros(16, 16), BLOCK=16)
        try:
            triton_aot.compile_launch(_bad_kernel, bound, {{}}, 90)
        except Exception as e:
            print("REJECTED", type(e).__name__)
        else:
            print("ACCEPTED")
        bound["a_ptr"] = torch.zeros(16, 16)
        shared, _ = triton_aot.compile_launch(_bad_kernel, bound, {{}}, 90)
        print("FP32 OK", shared >= 0)
    ''')
    out = _run(["-c", probe], timeout=300)
    assert "REJECTED" in out.stdout and "FP32 OK True" in out.stdout, out.stdout + out.stderr[-3000:]


@pytest.mark.parametrize("level,counts", [("full", "4 6 3 3"), ("quick", "2 2 2 2"), ("off", "1 1 1 1"),
                                          ("", "4 6 3 3")])
def test_autotune_level_and_rank_pick_the_gpu_configs(level, counts):
    """The prune keeps the common tiles up to R_PAD 64 and the small wide-rank tiles above, then
    FASTPEFT_TRITON_AUTOTUNE keeps all / the first two / the first (GPU lists; the interpreter always
    uses one small tile)."""
    pytest.importorskip("triton")
    probe = ("from fastpeft.ops.lora_linear import triton_kernel as tk\n"
             "g, s = tk._dx_lora_kernel.configs, tk._shrink_kernel.configs\n"
             "assert len(tk._da_kernel.configs) == len(s)\n"
             "p = [tk._prune_configs(c, {}, R_PAD=r) for r in (16, 256) for c in (g, s)]\n"
             "assert all(c.kwargs['BLOCK_M'] * 256 <= 128 * 128 for c in p[2] + p[3])\n"
             "print(*[len(x) for x in p])")
    out = _run(["-c", probe], timeout=120, FASTPEFT_TRITON_AUTOTUNE=level)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == counts.split()


def test_bad_autotune_level_is_a_clear_error():
    pytest.importorskip("triton")
    out = _run(["-c", "from fastpeft.ops.lora_linear import triton_kernel as tk\n"
                      "tk._prune_configs(tk._dx_lora_kernel.configs, {}, R_PAD=16)"], timeout=120,
               FASTPEFT_TRITON_AUTOTUNE="fast")
    assert out.returncode != 0
    assert "FASTPEFT_TRITON_AUTOTUNE: expected one of full, quick, off, got 'fast'" in out.stderr
