"""The tuner registry: fixed signatures checked at registration, in-tree methods always present,
a broken method fails the import instead of vanishing."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch.nn as nn

from fastpeft.tuners import registry
from fastpeft.tuners.base import PeftConfig
from fastpeft.tuners.lora import LoraConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_in_tree_methods_are_registered():
    assert registry.registered_tuners() == ["BITFIT", "BOTTLENECK_ADAPTER", "IA3", "LORA", "PREFIX_TUNING",
                                             "PROMPT_TUNING"]
    for name in registry.registered_tuners():
        t = registry.get_tuner(name)
        for fn in registry.CONTRACT:
            impl = getattr(t, fn)
            if impl is not None:  # registration already checked it; this checks the check ran
                registry._check_signature(fn, impl)
    with pytest.raises(ValueError, match="unknown PEFT method 'NOPE'.*LORA"):
        registry.get_tuner("NOPE")


class _Cfg(PeftConfig):
    pass


def _ok_inject(model: nn.Module, config, adapter_name):
    return []


def _ok_sd(model, adapter_name, *, config=None):
    return {}


def _ok_load(model, state, adapter_name, *, config=None):
    pass


def test_register_tuner_rejects_functions_that_do_not_fit_the_contract():
    def remove_without_keyword(model, adapter_name):
        pass

    with pytest.raises(TypeError, match=r"remove: .*remove_without_keyword.*remove\(model, adapter_name, \*, "
                                        r"unwrap_empty\)"):
        registry.register_tuner("TEST_BAD", _Cfg, _ok_inject, _ok_sd, _ok_load, remove=remove_without_keyword)

    def sd_without_config(model, adapter_name):
        return {}

    with pytest.raises(TypeError, match="adapter_state_dict: .*config"):
        registry.register_tuner("TEST_BAD", _Cfg, _ok_inject, sd_without_config, _ok_load)
    with pytest.raises(TypeError, match="inject: expected a callable"):
        registry.register_tuner("TEST_BAD", _Cfg, None, _ok_sd, _ok_load)
    with pytest.raises(TypeError, match="config_cls"):
        registry.register_tuner("TEST_BAD", dict, _ok_inject, _ok_sd, _ok_load)
    assert "TEST_BAD" not in registry.registered_tuners()
    # **kwargs fits every keyword
    t = registry.register_tuner("TEST_OK", _Cfg, _ok_inject, _ok_sd, _ok_load,
                                merge=lambda model, adapter_names, **kw: None)
    try:
        assert registry.get_tuner("test_ok") is t
    finally:
        registry._TUNERS.pop("TEST_OK")


def test_lora_from_dict_is_a_classmethod_of_the_class():
    assert isinstance(LoraConfig.__dict__["from_dict"], classmethod)
    cfg = LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "init_lora_weights": "olora"})
    assert cfg.init_lora_weights is True and cfg.r == 4
    with pytest.raises(TypeError, match="config: expected a dict"):
        LoraConfig.from_dict(["not", "a", "dict"])


def test_a_broken_method_module_fails_the_import(tmp_path):
    """A syntax error in a method module is an error at ``import fastpeft``, not a silently missing class."""
    broken = tmp_path / "fastpeft_broken"
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys
        sys.path.insert(0, {ROOT!r})

        class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                if name == "fastpeft.tuners.ia3":
                    return importlib.util.spec_from_loader(name, self)
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                exec(compile("def broken(:\\n", "ia3.py", "exec"), module.__dict__)

        sys.meta_path.insert(0, Broken())
        try:
            import fastpeft
        except SyntaxError as e:
            print("SyntaxError", e.filename)
        else:
            print("imported", hasattr(fastpeft, "IA3Config"))
    """)
    broken.write_text(script)
    out = subprocess.run([sys.executable, str(broken)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.stdout.strip() == "SyntaxError ia3.py", out.stdout + out.stderr
