"""image_classification: LeNet-5 and the torchvision bases, preprocessing, the folder / .npz readers and their
errors, every PEFT method through the workflow, transfer from a saved base, adapters HF PEFT loads, the CLI,
and (slow) the digits transfer on real data."""
import json
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fastpeft.workflow import build_config, finetune, get_task, run_on_file
from fastpeft.workflow.data import DataError
from fastpeft.workflow.tasks.image_models import (ImageClassifier, ImagePreprocessor, LeNet5Backbone,
                                                  load_image_model, save_image_model)


def _toy_images(n, seed, classes=(0, 1, 2)):
    """8x8 images whose class is the bright quadrant (learnable in a few steps)."""
    g = np.random.default_rng(seed)
    y = g.choice(classes, size=n)
    x = g.uniform(0, 0.3, size=(n, 8, 8)).astype(np.float32)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, 4 * r:4 * r + 4, 4 * col:4 * col + 4] += 0.7
    return x, y


@pytest.fixture(scope="module")
def toy_npz(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    x, y = _toy_images(96, 0)
    np.savez(d / "train.npz", images=x, labels=y)
    x, y = _toy_images(48, 1)
    np.savez(d / "dev.npz", images=x, labels=y)
    return str(d / "train.npz"), str(d / "dev.npz")


def _cfg(tmp_path, files, method, epochs=3, model="lenet5", name="run"):
    return build_config({"model": model, "task": "image_classification", "output_dir": str(tmp_path / name),
                         "data": {"train": files[0], "validation": files[1]}, "method": method,
                         "trainer": {"lr": 1e-2, "epochs": epochs, "batch_size": 16, "progress": False,
                                     "plot": False}})


# --------------------------------------------------------------------------- models and preprocessing

def test_lenet5_shapes_and_forward_equals_plain_pytorch():
    torch.manual_seed(0)
    m = ImageClassifier("lenet5", 4)
    x = torch.randn(3, 1, 32, 32)
    out = m(x, labels=torch.tensor([0, 3, 1]))
    b = m.backbone
    h = F.max_pool2d(torch.relu(b.conv1(x)), 2)
    h = F.max_pool2d(torch.relu(b.conv2(h)), 2)
    h = torch.relu(b.fc2(torch.relu(b.fc1(h.flatten(1)))))
    logits = m.classifier(h)
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, torch.tensor([0, 3, 1])))
    assert m(x).loss is None and out.logits.shape == (3, 4)
    assert sum(p.numel() for p in b.parameters()) == 156 + 2416 + 48120 + 10164  # LeNet-5 up to F6
    assert LeNet5Backbone(activation="tanh", pool="avg")(torch.zeros(1, 1, 32, 32)).shape == (1, 84)
    with pytest.raises(ValueError, match="32x32"):
        ImageClassifier("lenet5", 2, image_size=28)
    with pytest.raises(ValueError, match="unknown image architecture"):
        ImageClassifier("lenet7", 2)


def test_preprocessor_layouts_dtypes_channels_and_errors():
    p = ImagePreprocessor(in_channels=1, image_size=8)
    img = np.arange(64, dtype=np.uint8).reshape(8, 8)
    torch.testing.assert_close(p(img), torch.from_numpy(img).float().div(255).unsqueeze(0))
    rgb = np.random.default_rng(0).uniform(size=(8, 8, 3)).astype(np.float32)
    torch.testing.assert_close(p(rgb), torch.from_numpy(rgb).permute(2, 0, 1).mean(0, keepdim=True))
    torch.testing.assert_close(p(rgb.transpose(2, 0, 1)), p(rgb))  # CHW and HWC agree
    p3 = ImagePreprocessor(in_channels=3, image_size=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = p3(np.ones((8, 8), np.float32))
    assert out.shape == (3, 4, 4)
    torch.testing.assert_close(out, torch.full((3, 4, 4), 2.0))
    with pytest.raises(ValueError, match="x.npz\\[3\\].*shape"):
        p(np.zeros((2, 3, 5, 5)), "x.npz[3]")
    with pytest.raises(ValueError, match="NaN"):
        p(np.full((8, 8), np.nan, np.float32))


def test_torchvision_bases_or_a_clear_line():
    try:
        import torchvision  # noqa: F401
        has_tv = True
    except Exception:
        has_tv = False
    if not has_tv:
        with pytest.raises(ImportError, match="pip install torchvision"):
            ImageClassifier("resnet18", 3)
        pytest.skip("torchvision is not importable beside this torch build: the resnet / vgg / alexnet bases are "
                    "tested only where it is (the clear error above was checked)")
    for arch, size in (("resnet18", 64), ("vgg11", 32), ("alexnet", 64)):
        m = ImageClassifier(arch, 3, in_channels=1, image_size=size)
        assert m(torch.randn(2, 1, size, size)).logits.shape == (2, 3)


# --------------------------------------------------------------------------- readers

def test_npz_reader_and_its_errors(tmp_path, toy_npz):
    task = get_task("image_classification")
    recs = task.read(toy_npz[0], {})
    assert len(recs) == 96 and recs[5]["_line"] == 5 and recs[0]["label"] in {"0", "1", "2"}
    assert task.fit_labels(recs) == ["0", "1", "2"]
    np.savez(tmp_path / "k.npz", x=np.zeros((2, 8, 8)), y=np.zeros(2))
    with pytest.raises(DataError, match=r"k.npz: no array 'images'.*\['x', 'y'\]"):
        task.read(str(tmp_path / "k.npz"), {})
    assert len(task.read(str(tmp_path / "k.npz"), {"image_column": "x", "label_column": "y"})) == 2
    np.savez(tmp_path / "n.npz", images=np.zeros((3, 8, 8)), labels=np.zeros(2))
    with pytest.raises(DataError, match="n.npz: 'labels' has shape"):
        task.read(str(tmp_path / "n.npz"), {})
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(DataError, match="bad.npz: cannot read"):
        task.read(str(tmp_path / "bad.npz"), {})
    with pytest.raises(DataError, match="x.csv: not found"):
        task.read(str(tmp_path / "x.csv"), {})
    task.labels = ["0", "1"]
    recs = task.read(toy_npz[1], {})
    with pytest.raises(DataError, match=r"dev.npz\[\d+\]: unknown label '2'"):
        task.encode(recs, ImagePreprocessor(), 0)


def test_folder_reader_and_its_errors(tmp_path):
    from PIL import Image
    root = tmp_path / "imgs"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((10, 12, 3), 40 * i + (100 if label == "dog" else 0), np.uint8)).save(
                root / label / f"{i}.png")
    (root / ".DS_Store").write_text("")
    task = get_task("image_classification")
    recs = task.read(str(root), {})
    assert [r["label"] for r in recs] == ["cat", "cat", "dog", "dog"]
    task.fit_labels(recs)
    ds = task.encode(recs, ImagePreprocessor(1, 32), 0)
    assert ds.features[0]["pixel_values"].shape == (1, 32, 32) and ds.features[3]["labels"] == 1
    flat = task.read(str(root / "dog"), {}, with_labels=False)  # predict: a flat folder
    assert len(flat) == 2 and "label" not in flat[0]
    (root / "dog" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt: not an image file"):
        task.read(str(root), {})
    os.remove(root / "dog" / "notes.txt")
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    recs = task.read(str(root), {})
    with pytest.raises(DataError, match="broken.png: cannot read the image"):
        task.encode(recs, ImagePreprocessor(1, 32), 0)
    with pytest.raises(DataError, match="no class sub-directories"):
        task.read(str(root / "cat"), {})


# --------------------------------------------------------------------------- methods through the workflow

def _trainable(run_dir):
    return json.load(open(os.path.join(run_dir, "result.json"))) if os.path.exists(os.path.join(run_dir, "result.json")) \
        else None


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "bitfit"},
                                    {"name": "adapter", "bottleneck_size": 4}, {"name": "linear_probe"},
                                    {"name": "full"}])
def test_every_method_trains_saves_and_reloads(tmp_path, toy_npz, method):
    torch.manual_seed(0)
    res = finetune(_cfg(tmp_path, toy_npz, method, epochs=6))
    model = res["trainer"].module
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    name = method["name"]
    if name == "full":
        assert len(trainable) == len(list(model.parameters()))
    elif name == "linear_probe":
        assert trainable == {"classifier.weight", "classifier.bias"}
    else:
        assert any("classifier" in n for n in trainable)
        marker = {"lora": "lora_", "bitfit": ".bias", "adapter": "bottleneck_adapter_out"}[name]
        assert all(marker in n or "classifier" in n for n in trainable)
        assert any(marker in n and "classifier" not in n for n in trainable)
    first = [h for h in res["history"] if h["type"] == "eval"][0]["accuracy"]
    assert res["final_metrics"]["accuracy"] >= first and res["final_metrics"]["accuracy"] > 0.5, res["history"]
    again = run_on_file(str(tmp_path / "run" / "adapter"), toy_npz[1], mode="evaluate")
    assert again["accuracy"] == pytest.approx(res["final_metrics"]["accuracy"])
    assert again["loss"] == pytest.approx(res["final_metrics"]["loss"], rel=1e-5)


def test_reference_methods_refuse_options_and_a_missing_head():
    from fastpeft.workflow.pipeline import apply_method
    task = get_task("image_classification", labels=["a", "b"])
    with pytest.raises(ValueError, match="full takes no options"):
        apply_method(task.build_model("lenet5"), {"name": "full", "r": 4}, task)
    task.head_modules = ["score"]
    with pytest.raises(ValueError, match="linear_probe trains the task head \\['score'\\]"):
        apply_method(task.build_model("lenet5"), {"name": "linear_probe"}, task)


def test_transfer_from_a_saved_base_keeps_backbone_replaces_head(tmp_path):
    torch.manual_seed(0)
    m = ImageClassifier("lenet5", 5)
    save_image_model(m, str(tmp_path / "base"), labels=list("01234"))
    new = load_image_model(str(tmp_path / "base"), list("56789"))
    for k, v in m.backbone.state_dict().items():
        torch.testing.assert_close(new.backbone.state_dict()[k], v, rtol=0, atol=0)
    assert not torch.equal(new.classifier.weight, m.classifier.weight)
    same = load_image_model(str(tmp_path / "base"), list("01234"))
    torch.testing.assert_close(same.classifier.weight, m.classifier.weight, rtol=0, atol=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        load_image_model(str(tmp_path / "empty"), ["a"])


def test_lora_adapter_loads_in_hf_peft_and_hf_backend_trains_the_same(tmp_path, toy_npz):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    fp = finetune(_cfg(tmp_path, toy_npz, {"name": "lora", "r": 4}, epochs=2, name="fp"))
    torch.manual_seed(0)
    hf = finetune(_cfg(tmp_path, toy_npz, {"name": "lora", "r": 4, "backend": "peft"}, epochs=2, name="hf"))
    assert hf["backend"] == "peft"
    assert fp["final_metrics"]["loss"] == pytest.approx(hf["final_metrics"]["loss"], rel=1e-4)
    adapter = str(tmp_path / "fp" / "adapter")
    acfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert any("conv" in t for t in acfg["target_modules"]) and any("fc" in t for t in acfg["target_modules"])
    task = get_task("image_classification", labels=["0", "1", "2"])
    x = torch.randn(4, 1, 32, 32)
    ours = fp["trainer"].module.eval()
    theirs = peft.PeftModel.from_pretrained(task.build_model("lenet5"), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=x).logits, ours(pixel_values=x).logits, rtol=1e-5, atol=1e-6)


def test_cli_finetune_evaluate_predict(tmp_path, toy_npz, capsys):
    from fastpeft.cli import main
    rc = main(["finetune", "--task", "image_classification", "--model", "lenet5", "--train", toy_npz[0],
               "--validation", toy_npz[1], "--output-dir", str(tmp_path / "run"), "--method", "bitfit",
               "--epochs", "1", "--batch-size", "16", "--no-progress", "--set", "trainer.plot=false"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert "accuracy" in summary["final_metrics"]
    adapter = str(tmp_path / "run" / "adapter")
    assert main(["evaluate", "--adapter", adapter, "--data", toy_npz[1]]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["final_metrics"]["accuracy"])
    assert main(["predict", "--adapter", adapter, "--data", toy_npz[1], "--limit", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 3 and lines[0]["image"].endswith("dev.npz[0]") and lines[0]["prediction"] in "012"
    assert main(["finetune", "--task", "image_classification", "--model", "lenet9", "--train", toy_npz[0],
                 "--no-progress"]) == 2
    assert "lenet9" in capsys.readouterr().err


@pytest.mark.slow
def test_real_digits_transfer(tmp_path):
    """sklearn's 8x8 digits (real data, offline): LeNet-5 pretrained on 0-4; LoRA and the linear probe adapt it
    to 5-9 (benchmarks/real_digits.py, a shorter schedule); accuracy on the held-out test split."""
    pytest.importorskip("sklearn")
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    from real_digits import run
    res = run(str(tmp_path), methods=["lora", "linear_probe"], epochs=6, lrs=(1e-2,), pretrain_epochs=10,
              log=lambda *a: None)
    assert res["pretrain"]["accuracy"] > 0.9, res
    lora, probe = res["methods"]["lora"], res["methods"]["linear_probe"]
    assert lora["accuracy"] > 0.85 and probe["accuracy"] > 0.5, res
    assert probe["trainable_params"] == 84 * 5 + 5 and lora["trainable_params"] < 0.1 * res["pretrain"]["params"]
