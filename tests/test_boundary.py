"""The one-way boundary between the core and the applications (CONTRIBUTING.md, "Package map").

* statically: no core module imports an application module (every import statement, relative or absolute,
  at any depth, and ``importlib.import_module`` / ``__import__`` of a literal name); the one exception is
  ``fastpeft.__getattr__``, which imports the workflow when ``fastpeft.Trainer`` etc. are first used; the
  workflow reaches the applications built on it only through the section table of
  ``fastpeft/workflow/config.py``;
* at run time: a lean install (no transformers, peft, PyYAML, matplotlib, tqdm) imports fastpeft, patches a
  model, trains a step, saves and loads the adapter and runs an op, with no application module imported;
* ``fastpeft.Trainer`` and the other workflow names resolve on first use;
* an application missing an optional package says in one line which extra installs it.
"""
import ast
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "fastpeft")

# Everything else under fastpeft/ is core (a new module is core unless it is added here and to the map).
APPLICATIONS = ("fastpeft.workflow", "fastpeft.fewshot", "fastpeft.continual", "fastpeft.augment",
                "fastpeft.bench", "fastpeft.serve", "fastpeft.cli", "fastpeft.__main__")
# applications built on the workflow (they import it; it reaches them only through its config-section table)
ON_WORKFLOW = ("fastpeft.fewshot", "fastpeft.continual", "fastpeft.augment", "fastpeft.bench", "fastpeft.serve")
SECTION_TABLE = "fastpeft.workflow.config"
OPTIONAL = ("transformers", "peft", "bitsandbytes", "yaml", "matplotlib", "tqdm")


def _within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def package_files():
    for d, dirs, files in os.walk(PKG):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(d, f)


def imports(source: str, module: str, is_package: bool):
    """``(imported module name, line, enclosing top-level function or None)`` for every import in
    ``source``; ``from a import b`` yields ``a`` and ``a.b`` (b may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    out = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            f = func
            if func is None and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                f = child.name
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, f) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                out.append((target, child.lineno, f))
                out.extend((f"{target}.{a.name}", child.lineno, f) for a in child.names if a.name != "*")
            elif (isinstance(child, ast.Call) and child.args and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str)
                  and getattr(child.func, "attr", getattr(child.func, "id", None)) in ("import_module",
                                                                                       "__import__")):
                out.append((child.args[0].value, child.lineno, f))
            visit(child, f)

    visit(ast.parse(source), None)
    return out


def core_violations(path: str, source: str | None = None) -> list[str]:
    """The application imports of the core module at ``path`` (none allowed, except the workflow inside
    ``fastpeft.__getattr__``)."""
    module = module_name(path)
    if source is None:
        with open(path) as f:
            source = f.read()
    bad = []
    for name, line, func in imports(source, module, path.endswith("__init__.py")):
        if not _within(name, APPLICATIONS):
            continue
        if module == "fastpeft" and func == "__getattr__" and _within(name, ("fastpeft.workflow",)):
            continue
        bad.append(f"{os.path.relpath(path, ROOT)}:{line}: imports {name}")
    return bad


def test_the_core_imports_no_application_module():
    core = [p for p in package_files() if not _within(module_name(p), APPLICATIONS)]
    assert len(core) > 30 and os.path.join(PKG, "backends.py") in core
    bad = [v for p in core for v in core_violations(p)]
    assert not bad, "core modules import applications (CONTRIBUTING.md, 'Package map'):\n" + "\n".join(bad)


@pytest.mark.parametrize("line", [
    "from .workflow import Trainer",
    "from . import workflow",
    "from ..fewshot.config import FewshotConfig",
    "import fastpeft.bench.cli",
    "from fastpeft import cli",
    "def f():\n    from ..continual import run_stream",
    "class A:\n    def f(self):\n        import fastpeft.augment as a",
    "import importlib\nimportlib.import_module('fastpeft.workflow.config')",
])
def test_the_check_catches_every_form_of_import(line):
    where = os.path.join(PKG, "tuners", "lora.py") if "from .." in line else os.path.join(PKG, "heads.py")
    assert core_violations(where, line), line
    assert not core_violations(where, line.replace("workflow", "backends").replace("fewshot", "ops")
                               .replace("bench", "ops").replace("cli", "ops").replace("continual", "ops")
                               .replace("augment", "ops"))


def test_only_fastpeft_getattr_may_import_the_workflow():
    init = os.path.join(PKG, "__init__.py")
    with open(init) as f:
        source = f.read()
    assert not core_violations(init, source)
    assert core_violations(init, source + "\nfrom .workflow import Trainer\n")
    assert core_violations(init, source + "\ndef __getattr__(name):\n    from .fewshot import x\n")


def test_the_workflow_reaches_the_applications_on_it_only_through_the_section_table():
    bad = []
    for p in package_files():
        module = module_name(p)
        if not _within(module, ("fastpeft.workflow",)):
            continue
        with open(p) as f:
            found = imports(f.read(), module, p.endswith("__init__.py"))
        for name, line, func in found:
            if _within(name, ON_WORKFLOW) and not (module == SECTION_TABLE and func is not None):
                bad.append(f"{os.path.relpath(p, ROOT)}:{line}: imports {name}")
    assert not bad, "the workflow imports an application built on it outside the section table:\n" + "\n".join(bad)


def run_py(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTPEFT_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


# one line, for the scripts below: the application modules imported so far
LOADED_APPS = f"apps = sorted(m for m in __import__('sys').modules if m.startswith({APPLICATIONS!r}))"


def test_a_lean_install_patches_trains_saves_and_runs_ops_without_any_application():
    p = run_py(f"""
        import sys, tempfile
        for name in {OPTIONAL!r}:
            sys.modules[name] = None          # not installed: importing it raises ImportError
        import torch, fastpeft
        from fastpeft.ops import lora_linear, scaled_add

        def tiny():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

        model = fastpeft.get_peft_model(tiny(), fastpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
        x = torch.randn(5, 8)
        model(x).square().mean().backward()
        opt.step()
        d = tempfile.mkdtemp()
        model.save_pretrained(d)
        loaded = fastpeft.PeftModel.from_pretrained(tiny(), d)
        torch.testing.assert_close(loaded(x), model(x))
        w, a, b = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
        torch.testing.assert_close(lora_linear(x, w, None, a, b, 2.0), x @ w.T + 2.0 * (x @ a.T) @ b.T,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(scaled_add(x, x, 2.0), 3 * x)
        {LOADED_APPS}
        print("APPS", apps)
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "APPS []"


def test_import_fastpeft_imports_no_application():
    p = run_py(f"""
        import sys, fastpeft
        {LOADED_APPS}
        print("APPS", apps, "matplotlib" in sys.modules)
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "APPS [] False"


def test_import_fastpeft_does_not_import_transformers():
    p = run_py("import sys, fastpeft; print('transformers' in sys.modules)")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "False"


def test_workflow_names_resolve_on_first_use():
    p = run_py("""
        import sys, fastpeft
        names = ["Trainer", "TrainerConfig", "train", "finetune", "workflow"]
        assert "fastpeft.workflow" not in sys.modules
        assert set(names) <= set(fastpeft.__all__) and set(names) <= set(dir(fastpeft))
        assert "fastpeft.workflow" not in sys.modules          # listing them imports nothing
        from fastpeft import Trainer, finetune
        import fastpeft.workflow as wf
        assert Trainer is wf.Trainer and finetune is wf.finetune and fastpeft.workflow is wf
        assert fastpeft.TrainerConfig is wf.TrainerConfig and fastpeft.train is wf.train
        assert not hasattr(fastpeft, "no_such_name")
        try:
            fastpeft.no_such_name
        except AttributeError as e:
            assert "no_such_name" in str(e)
        print("ok")
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "ok"


def test_the_workflow_imports_no_study_package_until_a_config_uses_it():
    p = run_py(f"""
        import fastpeft.workflow
        {LOADED_APPS}
        print(sorted({{a.split(".")[1] for a in apps}}))
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "['workflow']"


# ---- a missing optional package: one line naming the extra ----------------------------------------------
def test_yaml_config_without_pyyaml_names_the_extra(monkeypatch, tmp_path, capsys):
    from fastpeft._optional import MissingExtra
    from fastpeft.cli import main
    from fastpeft.workflow.config import load_yaml, to_yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: minilm\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(MissingExtra, match=r"needs PyYAML: pip install 'fastpeft\[train\]'"):
        load_yaml(str(cfg))
    with pytest.raises(MissingExtra, match="PyYAML"):
        to_yaml({"model": "minilm"})
    assert main(["finetune", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fastpeft finetune: fastpeft's YAML config needs PyYAML: pip install 'fastpeft[train]'"


def test_a_broken_optional_package_is_not_reported_as_missing(monkeypatch):
    from fastpeft._optional import import_extra

    monkeypatch.setitem(sys.modules, "yaml.nested_missing", None)
    with pytest.raises(ModuleNotFoundError) as e:
        import_extra("yaml.nested_missing", "x")
    assert type(e.value) is ModuleNotFoundError
