"""Bottleneck adapters after named Linear / Conv2d modules (``BottleneckAdapterConfig.target_modules``), the
placement CNNs use: float64 oracle of the forward and the gradients, identity at init, save / load, disable,
remove, bad configs."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastpeft
from fastpeft import BottleneckAdapterConfig

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 7, 3, stride=2)
        self.fc = nn.Linear(7, 11)
        self.classifier = nn.Linear(11, 3)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h)).mean((2, 3))
        return self.classifier(torch.relu(self.fc(h)))


def _adapter(s, ad, act):
    """Plain-PyTorch oracle: s + up(act(down(s))) over the last dimension."""
    return s + F.linear(act(F.linear(s, ad.adapter_down.weight, ad.adapter_down.bias)), ad.adapter_up.weight,
                        ad.adapter_up.bias)


def _oracle(base, model, x, act):
    conv1 = model.get_submodule("base_model.model.conv1.bottleneck_adapter_out")["default"]
    fc = model.get_submodule("base_model.model.fc.bottleneck_adapter_out")["default"]
    # the base layers' weights through F.* (calling base.conv1 would run its adapter hook too)
    h = F.conv2d(x, base.conv1.weight, base.conv1.bias, padding=1)
    h = _adapter(h.movedim(1, -1), conv1, act).movedim(-1, 1)  # over the channels at every pixel
    h = torch.relu(F.conv2d(torch.relu(h), base.conv2.weight, base.conv2.bias, stride=2)).mean((2, 3))
    h = _adapter(F.linear(h, base.fc.weight, base.fc.bias), fc, act)
    return F.linear(torch.relu(h), base.classifier.weight, base.classifier.bias)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_forward_and_gradients_match_the_oracle(dtype, activation):
    torch.manual_seed(0)
    base = SmallCNN().to(dtype)
    model = fastpeft.get_peft_model(base, BottleneckAdapterConfig(target_modules=["conv1", "fc"], bottleneck_size=3,
                                                                  activation=activation, init_weights=False))
    act = torch.relu if activation == "relu" else F.gelu
    x = torch.randn(4, 3, 9, 7, dtype=dtype)  # odd spatial sizes
    y = model(x)
    ref = _oracle(base, model, x, act)
    torch.testing.assert_close(y, ref, **TOL[dtype])
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 8  # down / up weight + bias, two sites
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_identity_at_init_only_adapters_train_and_disable():
    torch.manual_seed(1)
    base = SmallCNN()
    x = torch.randn(2, 3, 8, 8)
    ref = base(x)
    model = fastpeft.get_peft_model(base, BottleneckAdapterConfig(target_modules=r".*conv\d", reduction_factor=2,
                                                                  modules_to_save=["classifier"]))
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("bottleneck_adapter_out" in n or "modules_to_save" in n for n in names)
    assert any("conv1.bottleneck_adapter_out" in n for n in names) and any("conv2." in n for n in names)
    assert not any(".fc." in n for n in names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapter_up" in n:
                p.normal_()
    assert not torch.allclose(model(x), ref)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_save_load_round_trip_and_remove(tmp_path):
    torch.manual_seed(2)
    model = fastpeft.get_peft_model(SmallCNN(), BottleneckAdapterConfig(target_modules=["conv2", "fc"],
                                                                        bottleneck_size=2, init_weights=False))
    x = torch.randn(3, 3, 8, 8)
    y = model(x)
    model.save_pretrained(str(tmp_path / "a"))
    torch.manual_seed(2)
    fresh = SmallCNN()
    loaded = fastpeft.PeftModel.from_pretrained(fresh, str(tmp_path / "a"))
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    base = loaded.unload()
    assert not any("bottleneck" in n for n, _ in base.named_modules())
    torch.manual_seed(2)
    torch.testing.assert_close(base(x), SmallCNN()(x), rtol=0, atol=0)


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match="parallel"):
        BottleneckAdapterConfig(target_modules=["fc"], adapter_type="parallel")
    with pytest.raises(ValueError, match="layers_to_transform"):
        BottleneckAdapterConfig(target_modules=["fc"], layers_to_transform=[0])
    with pytest.raises(ValueError, match="matched no module.*candidates"):
        fastpeft.get_peft_model(SmallCNN(), BottleneckAdapterConfig(target_modules=["nope"]))
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="type this method does not support"):
        fastpeft.get_peft_model(seq, BottleneckAdapterConfig(target_modules=r"\d"))
    assert not any("bottleneck" in n for n, _ in seq.named_modules())  # nothing half-done
