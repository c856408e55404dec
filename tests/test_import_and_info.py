"""Import never fails nor touches CUDA; the extension loader falls back with a reason;
`fastpeft info` tells the truth when backends are taken away."""
import json
import os
import subprocess
import sys
import warnings

import pytest

from fastpeft import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("FASTPEFT_BACKEND", "FASTPEFT_NO_EXT", "TRITON_INTERPRET")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=ROOT, timeout=300)


def info_json(**env) -> dict:
    p = run_py("import json, fastpeft.info as i; print(json.dumps(i.collect('cpu'), default=str))", **env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_import_does_not_initialise_cuda():
    p = run_py("import torch, fastpeft, fastpeft.ops; print(torch.cuda.is_initialized())")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def test_import_without_triton_and_without_extension():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import fastpeft, fastpeft.info as i\n"
            "r = i.collect('cpu')\n"
            "print(r['ops']['scaled_add']['backends']['triton']); print(r['ops']['scaled_add']['selected'])")
    p = run_py(code, FASTPEFT_NO_EXT="1")
    assert p.returncode == 0, p.stderr
    triton_reason, selected = p.stdout.strip().splitlines()[-2:]
    assert "triton is not installed" in triton_reason and "fastpeft[triton]" in triton_reason and selected == "torch"


def test_info_reports_each_backend_taken_away():
    full = info_json()
    if full["extension"]["loaded"]:
        assert full["ops"]["scaled_add"]["selected"] == "cpu"
        assert full["ops"]["scaled_add"]["backends"]["cpu"] is None
    no_ext = info_json(FASTPEFT_NO_EXT="1")
    assert no_ext["extension"]["loaded"] is False
    assert "FASTPEFT_NO_EXT" in no_ext["ops"]["scaled_add"]["backends"]["cpu"]
    assert no_ext["ops"]["scaled_add"]["selected"] == "torch"
    forced = info_json(FASTPEFT_BACKEND="torch")
    assert all(op["selected"] == "torch" for op in forced["ops"].values())
    interp = info_json(TRITON_INTERPRET="1")
    assert interp["ops"]["scaled_add"]["backends"]["triton"] is None
    assert interp["ops"]["scaled_add"]["selected"] != "triton"  # interpreter only when forced
    forced_triton = info_json(FASTPEFT_BACKEND="triton")
    assert "TRITON_INTERPRET" in forced_triton["ops"]["scaled_add"]["error"]


def test_cli_info_runs_and_help_lists_commands():
    p = subprocess.run([sys.executable, "-m", "fastpeft", "info"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "scaled_add: uses" in p.stdout
    h = subprocess.run([sys.executable, "-m", "fastpeft", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert h.returncode == 0 and "info" in h.stdout


def test_extension_built_for_other_torch_is_not_loaded(monkeypatch):
    monkeypatch.setattr(_ext, "metadata", lambda: {"torch_version": "0.0.1-other"})
    monkeypatch.setattr(_ext.importlib.util, "find_spec", lambda name: object())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mod, reason = _ext._load()
    assert mod is None
    assert "built for torch 0.0.1-other" in reason
    assert any("0.0.1-other" in str(x.message) for x in w)


def test_extension_without_metadata_is_not_loaded(monkeypatch):
    monkeypatch.setattr(_ext, "metadata", lambda: None)
    monkeypatch.setattr(_ext.importlib.util, "find_spec", lambda name: object())
    mod, reason = _ext._load()
    assert mod is None and "_C_meta.json" in reason


def test_bad_backend_env_warns_but_import_works():
    p = run_py("import fastpeft; print('ok')", FASTPEFT_BACKEND="gpu")
    assert p.returncode == 0 and p.stdout.strip().endswith("ok")
    assert "unknown backend 'gpu'" in p.stderr


@pytest.mark.parametrize("no_ext", ["1", pytest.param("0", marks=pytest.mark.slow)])  # CI's install builds the extension anyway
def test_wheel_builds_with_and_without_extension(tmp_path, no_ext):
    """`pip wheel` with FASTPEFT_NO_EXT=1 gives a pure wheel; without it, a wheel with _C and its metadata."""
    import zipfile

    if no_ext == "0" and not _ext.load():
        pytest.skip("extension not buildable here")
    env = dict(os.environ, FASTPEFT_NO_EXT=no_ext, MAX_JOBS="2")
    src = tmp_path / "src"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{ROOT}", str(src)], check=True)
    # the working tree may be ahead of the last commit: copy the files the build needs
    for rel in ("setup.py", "pyproject.toml", "fastpeft/_version.py"):
        (src / rel).write_text(open(os.path.join(ROOT, rel)).read())
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "wheels"), str(src)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    (wheel,) = (tmp_path / "wheels").glob("fastpeft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    has_so = any(n.startswith("fastpeft/_C") and n.endswith(".so") for n in names)
    assert has_so == (no_ext == "0")
    assert ("fastpeft/_C_meta.json" in names) == (no_ext == "0")
