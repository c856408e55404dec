import torch
import fastpeft.adversarial as A
from .test_trainer import _run, _cfg

def test_real_methods(tiny_model_dir, tiny_cls_files):
    for m in [A.FreeLB(steps=2), A.PGD(steps=2), A.SMART(), A.FGM(), A.FGSMRandomInit()]:
        _, r = _run(tiny_model_dir, tiny_cls_files, _cfg(max_steps=2), adversarial=m)
        print(type(m).__name__, r["losses"])
        assert all(l == l for l in r["losses"])
