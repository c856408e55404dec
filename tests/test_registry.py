"""The backend registry: order, forcing by env and context manager, errors."""
import pytest
import torch

from fastpeft import backends
from fastpeft.backends import BackendError, define_op, parse_backend_spec, use_backend


@pytest.fixture
def toy_op():
    name = "toy_op_for_tests"
    backends._REGISTRY.pop(name, None)
    op = define_op(name)
    calls = []
    op.register("cuda", available=lambda: "no GPU here")(lambda x, **k: calls.append("cuda"))
    op.register("cpu", supports=lambda x, forced: None if x.dtype == torch.float32 else "cpu: float32 only")(
        lambda x: calls.append("cpu") or "cpu")
    op.register("torch")(lambda x: calls.append("torch") or "torch")
    yield op
    backends._REGISTRY.pop(name, None)
    for key in [k for k in backends._AVAILABILITY if k[0] == name]:
        backends._AVAILABILITY.pop(key)


def test_first_supporting_backend_wins_and_falls_back_quietly(toy_op):
    assert toy_op(torch.zeros(1)) == "cpu"
    assert toy_op(torch.zeros(1, dtype=torch.float64)) == "torch"


def test_forced_backend_runs_or_raises_with_reason(toy_op):
    with use_backend("torch"):
        assert toy_op(torch.zeros(1)) == "torch"
    with use_backend("cpu", op=toy_op.name), pytest.raises(BackendError, match="float32 only"):
        toy_op(torch.zeros(1, dtype=torch.float64))
    with use_backend("cuda"), pytest.raises(BackendError, match="no GPU here"):
        toy_op(torch.zeros(1))
    with use_backend("triton"), pytest.raises(BackendError, match="has no 'triton' implementation"):
        toy_op(torch.zeros(1))


def test_innermost_context_wins_and_is_restored(toy_op):
    with use_backend("torch"):
        with use_backend("cpu", op=toy_op.name):
            assert toy_op(torch.zeros(1)) == "cpu"
        assert toy_op(torch.zeros(1)) == "torch"
    assert backends.forced_backend(toy_op.name) is None


def test_env_spec_parsing_and_forcing(toy_op, monkeypatch):
    assert parse_backend_spec("torch") == {None: "torch"}
    assert parse_backend_spec(" lora_linear=triton , cpu") == {"lora_linear": "triton", None: "cpu"}
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        parse_backend_spec("gpu")
    monkeypatch.setenv("FASTPEFT_BACKEND", f"{toy_op.name}=torch")
    backends.reload_env()
    try:
        assert toy_op(torch.zeros(1)) == "torch"
    finally:
        monkeypatch.delenv("FASTPEFT_BACKEND")
        backends.reload_env()


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("gpu"):
            pass
    with pytest.raises(ValueError, match="unknown op"):
        with use_backend("torch", op="no_such_op"):
            pass


def test_failing_probe_is_reported_not_raised(toy_op):
    toy_op.register("triton", available=lambda: 1 / 0)(lambda x: "triton")
    backends._AVAILABILITY.pop((toy_op.name, "triton"), None)
    assert "ZeroDivisionError" in toy_op.why_not("triton")
    assert toy_op(torch.zeros(1)) == "cpu"


def test_common_rules_name_the_reason():
    """fastpeft.ops._register's availability and supports rules, shared by the ops."""
    from fastpeft import _ext
    from fastpeft.ops._register import compiled_available, device_rule

    cpu = device_rule("cpu", (torch.float32,))
    assert cpu(torch.zeros(1), forced=False) is None
    assert cpu(torch.zeros(1, device="meta"), forced=False) == "cpu backend needs cpu tensors, got meta"
    f64 = torch.zeros(1, dtype=torch.float64)
    assert cpu(f64, forced=True) == "cpu backend supports ['float32'], got torch.float64"
    nope = device_rule("cuda", arg=1, also=lambda *args, forced: f"nope {len(args)} {forced}")
    assert nope([], torch.zeros(1, device="meta"), forced=True) == "cuda backend needs cuda tensors, got meta"
    assert device_rule("torch", also=lambda *args, forced: "nope")(1, forced=False) == "nope"
    assert device_rule("torch")(torch.zeros(1, device="meta"), forced=True) is None
    assert "CUDA tensors" in device_rule("triton")(torch.zeros(1, device="meta"), forced=True)
    if _ext.load() is None:
        assert compiled_available("cpu", "scaled_add")() == _ext.unavailable_reason()
    else:
        assert compiled_available("cpu", "scaled_add")() is None
        assert compiled_available("cpu", "scaled_add", "no_such_op")() == \
            "fastpeft._C was built without no_such_op (rebuild the extension)"


def test_registered_backend_records_dtypes_and_examples_are_built_on_demand():
    from fastpeft.ops._register import register_backend

    name = "toy_op_with_rules"
    backends._REGISTRY.pop(name, None)
    op = define_op(name, example=lambda device, dtype: (torch.ones(2, device=device, dtype=dtype),))
    try:
        register_backend(op, "torch")(lambda x: "torch")
        register_backend(op, "cpu", dtypes=(torch.bfloat16,), needs=["no_such_op"])(lambda x: "cpu")
        assert op.impls["cpu"].dtypes == (torch.bfloat16,) and op.impls["torch"].dtypes is None
        (x,) = op.example_inputs("cpu", torch.bfloat16)
        assert x.dtype == torch.bfloat16 and x.device.type == "cpu"
        assert op(torch.ones(2)) == "torch"  # the cpu backend is unavailable or rejects float32
        assert backends.get_op("scaled_add").example_inputs("meta")[0].device.type == "meta"
    finally:
        backends._REGISTRY.pop(name, None)
        for key in [k for k in backends._AVAILABILITY if k[0] == name]:
            backends._AVAILABILITY.pop(key)
