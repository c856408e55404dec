"""lora_linear_multi (and lora_embedding_multi) against a float64 oracle that loops over the rows.

The oracle is written out here, row by row (``y[m] = x[m] Wᵀ + b + s_a · B_a A_a x[m]`` with only the
first ranks[a] columns), independent of the implementations; every backend, dtype and Triton layout
is compared with it on random adapter assignments (with -1 rows), adapters with no rows, a batch on
one adapter, a batch on the base alone, ranks that differ, 3-D x with per-row and per-sequence
indices, non-contiguous x and a Conv1D-layout weight.  Triton runs through the interpreter on CPU
(fp32 / fp16: no bf16 tl.dot there) and on a GPU in the ``gpu`` tests at the end; the kernels are
compiled for sm_90 by tests/ops/test_triton_aot.py (through ``triton_kernel.aot_launches``).
"""
import pytest
import torch
from torch.library import opcheck

import fastpeft
from fastpeft.backends import BackendError
from fastpeft.ops import lora_embedding_multi, lora_linear_multi
from fastpeft.ops.lora_linear_multi import lora_linear_multi_loop

from ..helpers import check_scaled as check
from ..helpers import run_cpp_unit_test, runnable_backends

OP_NAME = "lora_linear_multi"
BACKENDS = runnable_backends(OP_NAME)


def _ok(backend):
    return backend in [p.values[0] for p in BACKENDS if not p.marks]


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def dtypes_of(backend):
    if backend == "triton":
        return [torch.float32, torch.float16, torch.bfloat16] if torch.cuda.is_available() else \
            [torch.float32, torch.float16]  # the interpreter has no bf16 tl.dot
    if backend == "cpu":
        return [torch.float64, torch.float32, torch.bfloat16]
    return [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def layouts_of(backend):
    return ["sgmv", "bgmv"] if backend == "triton" else [None]


def make(lead, K, N, n, r, dtype, device="cpu", bias=True, ranks=None, seed=0):
    """Fresh inputs scaled so that y is O(1); adapters with ranks[a] < r are zero-padded."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    A, B = rnd(n, r, K, std=K ** -0.5), rnd(n, N, r, std=r ** -0.5)
    if ranks is not None:
        for a, ra in enumerate(ranks):
            A[a, ra:] = 0
            B[a, :, ra:] = 0
    t = dict(device=device, dtype=dtype)
    return dict(x=rnd(*lead, K).to(**t), weight=rnd(N, K, std=K ** -0.5).to(**t),
                bias=rnd(N).to(**t) if bias else None, lora_A=A.to(**t), lora_B=B.to(**t),
                scales=(torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.25).to(device))


def oracle(x, weight, bias, lora_A, lora_B, scales, rows_index, ranks=None):
    """float64, one row at a time: y[m] = x[m] Wᵀ + b + s_a · B_a[:, :r_a] (A_a[:r_a] x[m])."""
    f = [t.detach().cpu().double() if t is not None else None for t in (x, weight, bias, lora_A, lora_B, scales)]
    x, weight, bias, lora_A, lora_B, scales = f
    x2 = x.reshape(-1, x.shape[-1])
    idx = rows_index.reshape(-1).cpu().tolist()
    y = x2 @ weight.t() + (bias if bias is not None else 0)
    for m, a in enumerate(idx):
        if a >= 0:
            ra = lora_A.shape[1] if ranks is None else ranks[a]
            y[m] += scales[a] * (lora_B[a, :, :ra] @ (lora_A[a, :ra] @ x2[m]))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def run(backend, inp, adapter_index, **kw):
    with torch.no_grad(), fastpeft.use_backend(backend, op=OP_NAME):
        return lora_linear_multi(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["scales"],
                                 adapter_index, **kw)


def assignment(kind, M, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randint(-1, n, (M,), generator=g)
    if kind == "empty-segments":  # adapters 0 and 2 get no rows
        return torch.tensor([-1, 1, 3])[torch.randint(0, 3, (M,), generator=g)]
    if kind == "one-adapter":
        return torch.full((M,), n - 1)
    if kind == "all-base":
        return torch.full((M,), -1)
    raise ValueError(kind)


# (lead dims of x, K, N, n_adapters, r_max, ranks or None, bias, assignment)
CASES = {
    "random-prime": ((37,), 29, 23, 4, 6, None, True, "random"),
    "empty-segments": ((41,), 17, 19, 4, 5, None, False, "empty-segments"),
    "one-adapter": ((23,), 13, 11, 3, 4, None, True, "one-adapter"),
    "all-base": ((19,), 13, 11, 3, 4, None, True, "all-base"),
    "ranks-differ": ((53,), 31, 29, 5, 8, [8, 1, 3, 0, 5], True, "random"),
    "3d-rows": ((3, 7), 31, 23, 3, 5, [5, 2, 4], False, "random"),
    "M0": ((0,), 7, 5, 2, 3, None, True, "random"),
    "one-row": ((1,), 1, 1, 1, 1, None, True, "one-adapter"),
    "tall": ((300,), 24, 40, 3, 16, [16, 9, 12], True, "random"),  # several SGMV row blocks per adapter
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_matches_float64_oracle(backend, case, dtype):
    if dtype not in dtypes_of(backend):
        pytest.skip(f"{dtype} is not a {backend} dtype here")
    lead, K, N, n, r, ranks, bias, kind = CASES[case]
    inp = make(lead, K, N, n, r, dtype, device_of(backend), bias=bias, ranks=ranks, seed=len(case))
    M = int(torch.tensor(lead).prod())
    idx = assignment(kind, M, n, seed=len(case)).to(device_of(backend))
    want = oracle(**inp, rows_index=idx, ranks=ranks)
    for layout in layouts_of(backend):
        for given_ranks in ([None, ranks] if ranks is not None else [None]):  # zero padding read, or skipped
            y = run(backend, inp, idx.reshape(lead), ranks=given_ranks, layout=layout)
            assert y.dtype == dtype and y.shape == (*lead, N)
            check(y, want, dtype, f"y ({layout}, ranks given: {given_ranks is not None})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sequence_index_broadcasts_over_tokens(backend):
    """x [B, T, K] with adapter_index [B]: every token of sequence b uses adapter index[b]; a 4-D x too."""
    dev = device_of(backend)
    inp = make((4, 5), 19, 13, 3, 4, torch.float32, dev)
    per_seq = torch.tensor([2, -1, 0, 2], device=dev)
    per_row = per_seq.repeat_interleave(5)
    want = oracle(**inp, rows_index=per_row)
    for layout in layouts_of(backend):
        check(run(backend, inp, per_seq, layout=layout), want, torch.float32, "per-sequence")
        check(run(backend, inp, per_seq.int().reshape(4, 1).expand(4, 5), layout=layout), want, torch.float32,
              "x.shape[:-1] index, int32")
    inp4 = dict(inp, x=inp["x"].reshape(4, 5, 1, 19))
    check(run(backend, inp4, per_seq), want.reshape(4, 5, 1, 13), torch.float32, "4-D x, per sequence")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_and_conv1d_weight(backend):
    """x as a transposed view and a strided 3-D slice, weight as GPT-2 Conv1D's [K, N] weight viewed as
    [N, K], the stacked A and B as permuted views, bias strided."""
    dev, dtype = device_of(backend), torch.float32
    M, K, N, n, r = 17, 23, 13, 3, 4
    base = make((M,), K, N, n, r, dtype, dev)
    x = base["x"].t().contiguous().t()                         # [M, K], strides (1, M)
    w = base["weight"].t().contiguous().t()                    # Conv1D: [K, N] storage
    a = base["lora_A"].permute(0, 2, 1).contiguous().permute(0, 2, 1)
    b = base["lora_B"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    bias = torch.stack([base["bias"], base["bias"]], 1)[:, 0]
    assert not any(t.is_contiguous() for t in (x, w, a, b, bias))
    inp = dict(base, x=x, weight=w, lora_A=a, lora_B=b, bias=bias)
    idx = assignment("random", M, n, seed=3).to(dev)
    want = oracle(**base, rows_index=idx)
    for layout in layouts_of(backend):
        check(run(backend, inp, idx, layout=layout), want, dtype, f"strided ({layout})")
    x3 = torch.randn(3, 2 * 7, K, device=dev)[:, ::2, :]
    inp3 = dict(inp, x=x3)
    idx3 = assignment("random", 21, n, seed=4).to(dev)
    for layout in layouts_of(backend):
        check(run(backend, inp3, idx3.reshape(3, 7), layout=layout), oracle(**inp3, rows_index=idx3), dtype,
              f"strided 3-D ({layout})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_skip_what_lies_beyond(backend):
    """With ranks given, columns j >= ranks[a] of A and B are never used, even when they are not zero."""
    dev = device_of(backend)
    ranks = [2, 5, 0]
    inp = make((29,), 21, 18, 3, 5, torch.float32, dev, ranks=ranks)
    want = oracle(**inp, rows_index=assignment("random", 29, 3).to(dev), ranks=ranks)
    beyond = (torch.arange(5) >= torch.tensor(ranks).reshape(3, 1)).to(dev)     # [n, r_max]: j >= ranks[a]
    noisy = dict(inp, lora_A=inp["lora_A"] + 100.0 * beyond[:, :, None],
                 lora_B=inp["lora_B"] - 50.0 * beyond[:, None, :])
    for layout in layouts_of(backend):
        check(run(backend, noisy, assignment("random", 29, 3).to(dev), ranks=ranks, layout=layout), want,
              torch.float32, f"ranks ({layout})")


def test_backends_agree_and_the_loop_matches():
    """Every runnable backend (and each Triton layout) gives the oracle's answer on one input; so does the
    plain per-adapter loop the benchmark uses as its baseline."""
    inp = make((64,), 32, 24, 5, 8, torch.float32, ranks=[8, 8, 4, 2, 1])
    idx = assignment("random", 64, 5, seed=9)
    want = oracle(**inp, rows_index=idx, ranks=[8, 8, 4, 2, 1])
    check(lora_linear_multi_loop(*inp.values(), idx, ranks=[8, 8, 4, 2, 1]), want, torch.float32, "loop")
    for p in BACKENDS:
        if p.marks or device_of(p.values[0]) != "cpu":
            continue
        for layout in layouts_of(p.values[0]):
            check(run(p.values[0], inp, idx, ranks=[8, 8, 4, 2, 1], layout=layout), want, torch.float32,
                  f"{p.values[0]} {layout}")


def test_layout_heuristic():
    from fastpeft.ops.lora_linear_multi.triton_kernel import choose_layout

    assert choose_layout(8, 8) == "bgmv"          # decode: a token per row
    assert choose_layout(256, 32) == "bgmv"       # 8 rows per adapter slot
    assert choose_layout(256, 8) == "sgmv"        # 32 rows per adapter
    assert choose_layout(4096, 32) == "sgmv"


# -- inference only, bad input ---------------------------------------------------------------
def test_inputs_that_require_grad_raise_unless_grad_is_off():
    inp = make((6,), 8, 5, 2, 3, torch.float32)
    idx = torch.tensor([0, 1, -1, 0, 1, 1])
    for name in ("x", "weight", "bias", "lora_A", "lora_B", "scales"):
        args = dict(inp, **{name: inp[name].clone().requires_grad_()})
        with pytest.raises(RuntimeError, match=f"inference-only.*{name} requires grad"):
            lora_linear_multi(*args.values(), idx)
        with torch.no_grad():
            y = lora_linear_multi(*args.values(), idx)
        assert not y.requires_grad
        with torch.inference_mode():
            lora_linear_multi(*args.values(), idx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_adapter_index_raises_clearly(backend):
    dev = device_of(backend)
    inp = make((2, 3), 8, 5, 2, 3, torch.float32, dev)
    with fastpeft.use_backend(backend, op=OP_NAME):
        for bad, row in (([0, 1, 2, -1, 0, 1], 2), ([0, -2, 0, 0, 0, 0], 1)):
            with pytest.raises(ValueError, match=rf"adapter_index: expected values in \[-1, 2\).*got {bad[row]} at "
                                                 rf"adapter_index\[{row}\]"):
                run(backend, inp, torch.tensor(bad, device=dev))
        with pytest.raises(ValueError, match=r"expected values in \[-1, 2\).*got 5 at adapter_index\[1\]"):
            run(backend, inp, torch.tensor([0, 5], device=dev))      # per sequence: checked before the broadcast
        with pytest.raises(ValueError, match=r"got -4 at adapter_index\[1, 2\]"):
            run(backend, inp, torch.tensor([[0, 1, 1], [0, 0, -4]], device=dev))  # shaped like x.shape[:-1]
        with pytest.raises(TypeError, match="adapter_index: expected dtype"):
            run(backend, inp, torch.zeros(6, device=dev))
        with pytest.raises(ValueError, match=r"adapter_index: expected shape \[6\].*\[2, 3\].*or \[2\]"):
            run(backend, inp, torch.zeros(5, dtype=torch.long, device=dev))
        with pytest.raises(ValueError, match="adapter_index: expected a tensor on"):
            run(backend, inp, torch.zeros(6, dtype=torch.long, device="meta"))
        with pytest.raises(TypeError, match="adapter_index: expected a torch.Tensor"):
            run(backend, inp, [0, 1, 0, 1, 0, 1])
        with pytest.raises(TypeError, match="check_index: expected True or False"):
            run(backend, inp, torch.zeros(6, dtype=torch.long, device=dev), check_index=1)


def test_unchecked_index_is_memory_safe():
    """check_index=False: the cpu kernel still raises (it checks while sorting); triton and torch give
    the base output for out-of-range rows instead of reading outside the stacked adapters."""
    inp = make((4,), 8, 5, 2, 3, torch.float32)
    idx = torch.tensor([0, 7, -3, 1])
    base_like = oracle(**inp, rows_index=torch.tensor([0, -1, -1, 1]))
    for p in BACKENDS:
        backend = p.values[0]
        if p.marks or device_of(backend) != "cpu":
            continue
        if backend == "cpu":
            with pytest.raises(ValueError, match=r"expected values in \[-1, 2\).*got 7 at adapter_index\[1\]"):
                run(backend, inp, idx, check_index=False)
            continue
        for layout in layouts_of(backend):
            check(run(backend, inp, idx, check_index=False, layout=layout), base_like, torch.float32, backend)


def test_bad_arguments_name_themselves():
    inp = make((4,), 8, 6, 3, 2, torch.float32)
    x, w, b, A, B, s = inp.values()
    idx = torch.tensor([0, 1, 2, -1])
    cases = [
        ((x, w[:, :5], b, A, B, s), ValueError, "weight: expected shape"),
        ((x, w, b[:3], A, B, s), ValueError, "bias: expected shape"),
        ((x, w, b, A[:, :, :7], B, s), ValueError, r"lora_A: expected shape \[n_adapters, r_max, 8\]"),
        ((x, w, b, A[:0], B[:0], s[:0]), ValueError, "lora_A: expected shape"),
        ((x, w, b, A, B[:, :, :1], s), ValueError, r"lora_B: expected shape \[3, 6, 2\]"),
        ((x, w, b, A[0], B, s), ValueError, "lora_A: expected a tensor with 3 dims"),
        ((x, w, b, A, B, s[:2]), ValueError, r"scales: expected a floating-point tensor of shape \[3\]"),
        ((x, w, b, A, B, s.long()), ValueError, "scales: expected a floating-point"),
        ((x, w, b, A, B, 1.0), TypeError, "scales: expected a torch.Tensor"),
        ((x, w.double(), b, A, B, s), TypeError, "weight: expected dtype"),
        ((x, w, b.double(), A, B, s), TypeError, "bias: expected dtype"),
        ((x, w, b, A.double(), B, s), TypeError, "lora_A: expected dtype torch.float32"),
        ((x, w, b, A, B.half(), s), TypeError, "lora_B: expected dtype"),
        ((x, w, b, A, B.to("meta"), s), ValueError, "lora_B: expected a tensor on cpu"),
        ((x.int(), w, b, A, B, s), TypeError, "x: expected dtype"),
        ((x[:, :0], w[:, :0], b, A[:, :, :0], B, s), ValueError, "x: expected a tensor"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            lora_linear_multi(*args, idx)
    for ranks, msg in (([1, 2], "ranks: expected a sequence of 3 ints"),
                       ([1, 2, 3], r"ranks: expected ints in \[0, 2\]"),
                       ([1, True, 0], "ranks: expected ints"), (torch.tensor([1, 1, 1]), "ranks: expected a sequence")):
        with pytest.raises(ValueError, match=msg):
            lora_linear_multi(x, w, b, A, B, s, idx, ranks=ranks)
    with pytest.raises(ValueError, match="layout: expected one of"):
        lora_linear_multi(x, w, b, A, B, s, idx, layout="fast")


def test_forced_unsupported_backend_raises():
    inp = make((4,), 8, 6, 3, 2, torch.float64)
    with fastpeft.use_backend("triton", op=OP_NAME), pytest.raises(BackendError, match="triton"):
        run("triton", inp, torch.tensor([0, 1, 2, -1]))


def test_cpu_op_checks_its_own_arguments():
    """The compiled op, called directly, also refuses bad shapes and indices (never reads out of bounds)."""
    if not _ok("cpu"):
        pytest.skip("cpu backend not available")
    x, w, b, A, B, s = make((4,), 8, 6, 3, 2, torch.float32).values()
    op = torch.ops.fastpeft.lora_linear_multi
    with pytest.raises(ValueError, match="adapter_index must be"):
        op(x, w, b, A, B, s, torch.zeros(3, dtype=torch.long), None)
    with pytest.raises(ValueError, match=r"expected values in \[-1, 3\).*got 3 at adapter_index\[2\]"):
        op(x, w, b, A, B, s, torch.tensor([0, 1, 3, -1]), None)
    with pytest.raises(ValueError, match=r"ranks: expected values in \[0, 2\]"):
        op(x, w, b, A, B, s, torch.tensor([0, 1, 2, -1]), [1, 3, 1])
    with pytest.raises(ValueError, match="lora_B must be"):
        op(x, w, b, A, B[:, :5], s, torch.tensor([0, 1, 2, -1]), None)
    with pytest.raises(TypeError, match="adapter_index must be int32 or int64"):
        op(x, w, b, A, B, s, torch.zeros(4, dtype=torch.int16), None)


# -- registration: opcheck, torch.compile -----------------------------------------------------------
def _op_args(name):
    inp = make((2, 5), 16, 12, 3, 4, torch.float32)
    idx = torch.tensor([0, -1, 2, 2, 1, 0, 0, -1, 1, 2])
    args = (inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], inp["scales"], idx, [4, 2, 3])
    if name == "lora_multi_check_index":
        return [(idx, 3), (idx.int(), 3), (idx[:0], 3)]
    if name == "lora_linear_multi_triton":
        return [args + (layout,) for layout in ("sgmv", "bgmv")] + [args[:7] + (None, "auto")]
    return [args, args[:2] + (None,) + args[3:7] + (None,)]


@pytest.mark.parametrize("name", ["lora_linear_multi", "lora_linear_multi_triton", "lora_multi_check_index"])
def test_opcheck(name):
    op = getattr(torch.ops.fastpeft, name, None)
    if op is None:
        pytest.skip(f"torch.ops.fastpeft.{name} is not registered here (extension not built)")
    if "triton" in name and not _ok("triton"):
        pytest.skip("triton cannot run here")
    for args in _op_args(name):
        opcheck(op.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    dev, dtype = device_of(backend), torch.float32
    inp = make((3, 4), 16, 8, 3, 4, dtype, dev)
    per_seq = torch.tensor([1, -1, 2], device=dev)
    torch._dynamo.reset()
    with fastpeft.use_backend(backend, op=OP_NAME), torch.no_grad():
        f = torch.compile(lambda x, idx: lora_linear_multi(x, inp["weight"], inp["bias"], inp["lora_A"],
                                                             inp["lora_B"], inp["scales"], idx,
                                                             ranks=[4, 3, 2]).relu(), fullgraph=True)
        y = f(inp["x"], per_seq)
        check(y, oracle(**inp, rows_index=per_seq.repeat_interleave(4), ranks=[4, 3, 2]).relu(), dtype, "compiled")
        with pytest.raises(Exception, match=r"adapter_index: expected values in \[-1, 3\)"):  # checked in the graph
            f(inp["x"], torch.tensor([0, 3, 1], device=dev))


# -- lora_embedding_multi ------------------------------------------------------------------------
def embedding_oracle(ids, weight, lora_A, lora_B, scales, rows_index, ranks=None):
    w, A, B, s = (t.double() for t in (weight, lora_A, lora_B, scales))
    flat, idx = ids.reshape(-1).tolist(), rows_index.reshape(-1).tolist()
    out = torch.stack([w[i] for i in flat]) if flat else w.new_zeros(0, w.shape[1])
    for m, (i, a) in enumerate(zip(flat, idx)):
        if a >= 0:
            ra = A.shape[1] if ranks is None else ranks[a]
            out[m] += s[a] * (B[a, :, :ra] @ A[a, :ra, i])
    return out.reshape(*ids.shape, w.shape[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_embedding_matches_float64_oracle(dtype):
    V, D, n, r = 37, 11, 3, 4
    g = torch.Generator().manual_seed(1)
    w = torch.randn(V, D, generator=g).to(dtype)
    A, B = torch.randn(n, r, V, generator=g).to(dtype), torch.randn(n, D, r, generator=g).to(dtype)
    A[2, 2:] = 0
    B[2, :, 2:] = 0
    s = torch.tensor([0.5, 2.0, 1.0])
    ids = torch.randint(0, V, (4, 6), generator=g)
    per_seq = torch.tensor([2, -1, 0, 1])
    with torch.no_grad():
        y = lora_embedding_multi(ids, w, A, B, s, per_seq, ranks=[4, 4, 2])
        y_rows = lora_embedding_multi(ids, w, A, B, s, per_seq.repeat_interleave(6))
    want = embedding_oracle(ids, w, A, B, s, per_seq.repeat_interleave(6), ranks=[4, 4, 2])
    assert y.shape == (4, 6, D) and y.dtype == dtype
    check(y, want, dtype, "embedding, per sequence")
    check(y_rows, want, dtype, "embedding, per token")
    empty = lora_embedding_multi(ids[:0], w, A, B, s, per_seq[:0])
    assert empty.shape == (0, 6, D)


def test_embedding_bad_input():
    w, A, B, s = torch.randn(10, 4), torch.randn(2, 3, 10), torch.randn(2, 4, 3), torch.ones(2)
    ids = torch.tensor([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=r"expected values in \[-1, 2\).*got 2 at adapter_index\[1\]"):
        lora_embedding_multi(ids, w, A, B, s, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"lora_A: expected shape \[n_adapters, r_max, 10\].*V = weight.shape\[0\]"):
        lora_embedding_multi(ids, w, A[:, :, :9], B, s, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"adapter_index: expected shape \[4\] \(one per row of input_ids\)"):
        lora_embedding_multi(ids, w, A, B, s, torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="input_ids: expected dtype"):
        lora_embedding_multi(ids.float(), w, A, B, s, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="inference-only.*lora_A requires grad"):
        lora_embedding_multi(ids, w, A.requires_grad_(), B, s, torch.tensor([0, 1]))


# -- the torch-free C++ kernels ---------------------------------------------------------------------
def test_cpp_kernel_unit_test(tmp_path):
    """csrc/lora_linear_multi/lora_linear_multi_test.cpp: the counting sort and the low-rank rows vs naive loops."""
    run_cpp_unit_test(OP_NAME, tmp_path)


# -- on a GPU (benchmarks/gpu_run.sh runs -m gpu) ----------------------------------------------------
GPU_CASES = {
    "prime-3d-ranks": ((3, 37), 67, 45, 5, 8, [8, 1, 5, 0, 3], True, "random"),
    "tiles-r64": ((1031,), 512, 384, 7, 64, None, False, "random"),
    "decode-32": ((32,), 256, 320, 32, 16, None, True, "random"),
    "one-adapter-r16": ((257,), 128, 256, 4, 16, None, True, "one-adapter"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_on_gpu_matches_float64(case, dtype):
    lead, K, N, n, r, ranks, bias, kind = GPU_CASES[case]
    inp = make(lead, K, N, n, r, dtype, "cuda", bias=bias, ranks=ranks, seed=7)
    M = int(torch.tensor(lead).prod())
    idx = assignment(kind, M, n, seed=7).cuda()
    want = oracle(**inp, rows_index=idx, ranks=ranks)
    for layout in ("sgmv", "bgmv", None):
        y = run("triton", inp, idx.reshape(lead), ranks=ranks, layout=layout)
        check(y, want, dtype, f"{case} {layout}")


@pytest.mark.gpu
def test_triton_on_gpu_conv1d_weight_and_per_sequence_index():
    inp = make((6, 9), 96, 80, 4, 8, torch.bfloat16, "cuda")
    inp["weight"] = inp["weight"].t().contiguous().t()
    per_seq = torch.tensor([3, -1, 0, 3, 1, 2], device="cuda", dtype=torch.int32)
    want = oracle(**inp, rows_index=per_seq.repeat_interleave(9))
    for layout in ("sgmv", "bgmv"):
        check(run("triton", inp, per_seq, layout=layout), want, torch.bfloat16, layout)
