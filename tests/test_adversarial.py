"""fastpeft.adversarial: methods against eager loops, eps-ball constraints, the trainer
interface, a real robustness effect on a synthetic task, HF Trainer and PEFT models."""
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastpeft.adversarial as A
from fastpeft.adversarial import methods as M
from fastpeft.ops.adv_perturb_update.reference import adv_perturb_update_value

V, L, H = 64, 16, 16


class TinyClassifier(nn.Module):
    """Embedding -> masked mean pooling -> MLP; ``get_input_embeddings`` like a HF model."""

    def __init__(self, freeze_embedding=False, classes=2):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.emb.weight.requires_grad_(not freeze_embedding)
        self.mlp = nn.Sequential(nn.Linear(H, 64), nn.GELU(), nn.Linear(64, classes))

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        e = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        m = attention_mask[..., None].float()
        return self.mlp((e * m).sum(1) / m.sum(1).clamp_min(1))


def forward_fn(model, batch):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"})
    return F.cross_entropy(logits, batch["labels"]), logits


def synthetic(n, seed):
    """Class y has two marker tokens from {4y, ..., 4y + 3} among neutral tokens; random lengths."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    lengths = torch.randint(L // 2, L + 1, (n,), generator=g)
    ids = torch.randint(8, V, (n, L), generator=g)
    for i in range(n):
        pos = torch.randperm(int(lengths[i]), generator=g)[:2]
        ids[i, pos] = torch.randint(0, 4, (2,), generator=g) + 4 * y[i]
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    return dict(input_ids=ids * mask, attention_mask=mask, labels=y)


def small_batch(seed=0, B=6):
    b = synthetic(B, seed)
    b["attention_mask"][1, 5:] = 0
    b["input_ids"] = b["input_ids"] * b["attention_mask"]
    return b


@pytest.fixture
def one_thread():
    """Training runs with one intra-op thread (deterministic and fair on a shared CPU); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def param_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


ALL = [lambda: A.FGM(epsilon=0.5), lambda: A.PGD(epsilon=0.5, steps=3, random_init=True),
       lambda: A.FreeLB(step_size=0.3, epsilon=0.5, steps=3, init_mag=0.2),
       lambda: A.FGSMRandomInit(epsilon=0.1, norm="linf"),
       lambda: A.SMART(alpha=1.0, step_size=0.3, epsilon=0.5, steps=2, noise_var=1e-3)]
IDS = ["fgm", "pgd", "freelb", "fgsm_rs", "smart"]


# -- exactness against eager loops --------------------------------------------
def test_freelb_matches_eager_freelb_loop():
    torch.manual_seed(0)
    model, batch = TinyClassifier(), small_batch()
    K, lr, eps, mag = 3, 0.3, 0.5, 0.2
    torch.manual_seed(5)
    loss = A.FreeLB(step_size=lr, epsilon=eps, steps=K, init_mag=mag).step(model, batch, forward_fn)
    ours = param_grads(model)
    model.zero_grad()
    # eager FreeLB (huggingface FreeLB code) through inputs_embeds, same random start
    torch.manual_seed(5)
    mask = batch["attention_mask"]
    embeds_init = model.emb(batch["input_ids"])
    delta = A.methods.adv_perturb_init(embeds_init.detach(), kind="uniform", scale=mag, norm="l2_example",
                                       mask=mask).requires_grad_()
    total = 0.0
    for t in range(K):
        logits = model(inputs_embeds=embeds_init + delta, attention_mask=mask)
        lk = F.cross_entropy(logits, batch["labels"]) / K
        total += lk.detach()
        lk.backward(retain_graph=True)
        if t == K - 1:
            break
        g = delta.grad.clone()
        new = adv_perturb_update_value(delta.detach().double(), g.double(), mask, "l2_example", lr, eps)
        delta = new.float().requires_grad_()
        embeds_init = model.emb(batch["input_ids"])
    torch.testing.assert_close(loss, total)
    for n, g in param_grads(model).items():
        torch.testing.assert_close(ours[n], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_fgm_matches_eager_and_hook_equals_inputs_embeds():
    torch.manual_seed(0)
    model, batch = TinyClassifier(), small_batch()
    loss = A.FGM(epsilon=0.5).step(model, batch, forward_fn)
    hook = param_grads(model)
    model.zero_grad()
    A.FGM(epsilon=0.5, via="inputs_embeds").step(model, batch, forward_fn)
    for n, g in param_grads(model).items():
        torch.testing.assert_close(hook[n], g)
    model.zero_grad()
    e = model.emb(batch["input_ids"])
    e.retain_grad()
    clean = F.cross_entropy(model(inputs_embeds=e, attention_mask=batch["attention_mask"]), batch["labels"])
    clean.backward()
    r = 0.5 * e.grad / e.grad.flatten(1).norm(dim=1).view(-1, 1, 1)
    adv = F.cross_entropy(model(inputs_embeds=model.emb(batch["input_ids"]) + r,
                                attention_mask=batch["attention_mask"]), batch["labels"])
    adv.backward()
    torch.testing.assert_close(loss, clean.detach())
    for n, g in param_grads(model).items():
        torch.testing.assert_close(hook[n], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("make", ALL, ids=IDS)
def test_eps_ball_and_padding_after_every_update(make, monkeypatch):
    """Wrap the fused update: after every call delta is inside the ball and zero at padding."""
    calls = []
    real = M.adv_perturb_update

    def checked(delta, grad, *, norm, step_size, epsilon, mask):
        out = real(delta, grad, norm=norm, step_size=step_size, epsilon=epsilon, mask=mask)
        d = out.detach().double()
        if epsilon:
            n = {"linf": lambda: d.abs().amax(), "l2_token": lambda: d.norm(dim=-1).max(),
                 "l2_example": lambda: d.flatten(1).norm(dim=1).max()}[norm]()
            assert n <= epsilon * (1 + 1e-5)
        assert (d[mask == 0] == 0).all()
        calls.append(norm)
        return out

    monkeypatch.setattr(M, "adv_perturb_update", checked)
    torch.manual_seed(0)
    model, batch = TinyClassifier(), small_batch()
    method = make()
    loss = method.step(model, batch, forward_fn)
    assert torch.isfinite(loss) and not loss.requires_grad
    assert calls, "the method never called the fused update"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("make", ALL, ids=IDS)
def test_frozen_embedding_like_peft(make):
    """Perturbing the embedding output works when the embedding matrix is frozen."""
    torch.manual_seed(0)
    model, batch = TinyClassifier(freeze_embedding=True), small_batch()
    make().step(model, batch, forward_fn)
    assert model.emb.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mlp.parameters())


def test_backward_callable_and_cost_counts():
    torch.manual_seed(0)
    model, batch = TinyClassifier(), small_batch()
    for method in [A.FGM(), A.PGD(steps=3), A.FreeLB(steps=3), A.FGSMRandomInit(), A.SMART(steps=2)]:
        n_fwd, n_bwd = [0], [0]

        def fwd(m, b):
            n_fwd[0] += 1
            return forward_fn(m, b)

        def bwd(loss):
            n_bwd[0] += 1
            loss.backward()

        method.step(model, batch, fwd, bwd)
        assert n_fwd[0] == method.cost[0], method
        assert n_bwd[0] == {"fgm": 2, "pgd": 2, "freelb": 3, "fgsm_rs": 1, "smart": 1}[method.name], method


def test_build_and_errors():
    assert isinstance(A.build("FreeLB", steps=2), A.FreeLB)
    assert isinstance(A.build("fgsm-rs"), A.FGSMRandomInit)
    with pytest.raises(ValueError, match="expected one of"):
        A.build("madry")
    with pytest.raises(ValueError, match="steps"):
        A.PGD(steps=0)
    with pytest.raises(ValueError, match="norm"):
        A.FGM(norm="l1")
    with pytest.raises(TypeError, match="get_input_embeddings"):
        A.FGM().step(nn.Linear(2, 2), {}, forward_fn)
    model, batch = TinyClassifier(), small_batch()
    bad = dict(batch, attention_mask=batch["attention_mask"][:, :3])
    with pytest.raises(ValueError, match="attention_mask"):
        A.FreeLB().step(model, bad, lambda m, b: forward_fn(m, batch))


# -- a real effect on a synthetic task --------------------------------------------
def train_and_attack(method, seed=0, epochs=10, n=1024, attack_eps=(1.5,)):
    """(clean test loss before, after training, clean test accuracy, [accuracy under PGD attack of each eps])."""
    torch.manual_seed(seed)
    train, test = synthetic(n, 0), synthetic(512, 1)
    model = TinyClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        first = float(forward_fn(model, test)[0])
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, 32):
            b = {k: v[perm[i:i + 32]] for k, v in train.items()}
            if method is None:
                loss, _ = forward_fn(model, b)
                loss.backward()
            else:
                loss = method.step(model, b, forward_fn)
                assert torch.isfinite(loss) and not loss.requires_grad
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        last, logits = forward_fn(model, test)
        last, clean = float(last), (logits.argmax(-1) == test["labels"]).float().mean().item()
    robust = [(A.pgd_attack(model, test, forward_fn, epsilon=e, steps=10).argmax(-1) == test["labels"])
              .float().mean().item() for e in attack_eps]
    return first, last, clean, robust


def test_freelb_and_pgd_improve_accuracy_under_pgd_attack(one_thread):
    """Measured effect: plain training reaches ~100% clean but ~60% under an L2 PGD attack of
    radius 1.5 on the embedding output; FreeLB / PGD training keep clean accuracy and reach ~95%."""
    _, _, clean0, (robust0,) = train_and_attack(None)
    for method in (A.FreeLB(step_size=0.5, epsilon=1.0, steps=3, init_mag=0.5), A.PGD(epsilon=1.0, steps=2)):
        first, last, clean, (robust,) = train_and_attack(method)
        assert last < 0.5 * first, (method, first, last)
        assert abs(clean - clean0) <= 0.02, (method, clean, clean0)
        assert robust >= robust0 + 0.15, (method, robust, robust0)


@pytest.mark.parametrize("make", [lambda: A.FGM(epsilon=1.0), lambda: A.FGSMRandomInit(epsilon=0.25, norm="l2_token"),
                                  lambda: A.SMART(alpha=1.0, step_size=1.0, epsilon=1.0, noise_var=1e-3)],
                         ids=["fgm", "fgsm_rs", "smart"])
def test_other_methods_train_and_keep_clean_accuracy(make, one_thread):
    """Test loss drops well below ln 2 and clean accuracy stays within noise of plain training
    (SMART's smoothness term keeps logits smaller, so its loss drops less)."""
    _, _, clean0, _ = _plain_short()
    first, last, clean, _ = train_and_attack(make(), epochs=4, attack_eps=())
    assert last < 0.8 * first and clean >= clean0 - 0.03, (first, last, clean, clean0)


@functools.lru_cache(maxsize=1)
def _plain_short():
    return train_and_attack(None, epochs=4, attack_eps=())


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_robustness_effect_over_seeds_all_methods(seed, one_thread):
    _, _, clean0, rob0 = train_and_attack(None, seed=seed, attack_eps=(1.0, 1.5))
    for make in ALL[:4] + [lambda: A.SMART(alpha=1.0, step_size=1.0, epsilon=1.0, noise_var=1e-3)]:
        m = make()
        m.__dict__.update({k: v * 2 for k, v in vars(m).items() if k in ("epsilon",) and v})
        _, _, clean, rob = train_and_attack(m, seed=seed, attack_eps=(1.0, 1.5))
        assert clean >= clean0 - 0.02 and rob[1] > rob0[1], (m, clean, clean0, rob, rob0)


# -- transformers / PEFT -------------------------------------------------------------
def tiny_bert(num_labels=2):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=L, num_labels=num_labels)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def hf_forward(model, batch):
    out = model(**batch)
    return out.loss, out.logits


@pytest.mark.parametrize("wrap", ["hf_peft", "fastpeft"])
def test_lora_bert_freelb_and_smart(wrap):
    model = tiny_bert()
    if wrap == "hf_peft":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                           task_type="SEQ_CLS"))
    else:
        import fastpeft
        model = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, target_modules=["query", "value"],
                                                                   task_type="SEQ_CLS"))
    emb = A.input_embedding(model)
    assert not emb.weight.requires_grad
    batch = small_batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for method in (A.FreeLB(step_size=0.1, epsilon=0.5, steps=2, init_mag=0.1), A.SMART(steps=1),
                   A.PGD(epsilon=0.5, steps=2, via="inputs_embeds")):
        model.zero_grad()
        loss = method.step(model, batch, hf_forward)
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
        assert emb.weight.grad is None


def test_hf_trainer_integration(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_bert()
    data = synthetic(16, 3)
    ds = [{k: v[i] for k, v in data.items()} for i in range(16)]
    calls = []

    class CountingFreeLB(A.FreeLB):
        def step(self, model, batch, forward_fn, backward=None):
            calls.append(batch["input_ids"].shape)
            return super().step(model, batch, forward_fn, backward)

    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                          use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                                          learning_rate=1e-3, gradient_accumulation_steps=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer = A.make_adversarial_trainer(transformers.Trainer, CountingFreeLB(steps=2, epsilon=0.5))
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    result = trainer.train()
    assert len(calls) == 6 and calls[0] == (4, L)
    assert result.training_loss == result.training_loss and 0 < result.training_loss < 5
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    # the mixin with no method trains normally
    plain = type("T", (A.AdversarialTrainerMixin, transformers.Trainer), {})(model=model, args=args,
                                                                            train_dataset=ds)
    assert plain.adversarial_method is None
    plain.train()


def test_smart_inner_gradients_scaled_under_fp16(monkeypatch):
    """fp16 activations: near-uniform predictions make the inner KL's ascent gradients fall below fp16's
    range (the perturbation itself is representable: noise 0.3 on O(1) embeddings).
    Unscaled they underflow to zero (no ascent direction at all); with the trainer's
    loss scale they survive and point where the fp32 computation's do."""
    torch.manual_seed(0)
    model, batch = TinyClassifier(), small_batch()
    with torch.no_grad():  # near-uniform predictions: tiny logits, so the KL's gradients are tiny too
        model.mlp[2].weight.mul_(1e-2)
        model.mlp[2].bias.zero_()
    seen = []
    orig = M.SMART._update

    def record(self, delta, grad, *a, **k):
        seen.append(grad.detach().double().clone())
        return orig(self, delta, grad, *a, **k)

    monkeypatch.setattr(M.SMART, "_update", record)

    def fp16_forward(m, b):  # what the trainer does under precision: fp16
        with torch.autocast("cpu", dtype=torch.float16):
            loss, logits = forward_fn(m, b)
        return loss.float(), logits

    def run(fwd, scale):
        seen.clear()
        torch.manual_seed(1)
        A.SMART(alpha=1.0, steps=1, noise_var=0.3).step(model, batch, fwd, backward=lambda l: None,
                                                        loss_scale=scale)
        return seen[0]

    ref = run(forward_fn, 1.0)  # fp32 reference direction
    unscaled = run(fp16_forward, 1.0)
    scaled = run(fp16_forward, 2.0 ** 16)
    assert ref.abs().max() > 0
    cos_unscaled = float(F.cosine_similarity(unscaled.flatten(), ref.flatten(), dim=0))
    cos_scaled = float(F.cosine_similarity(scaled.flatten(), ref.flatten(), dim=0))
    assert (unscaled == 0).float().mean() > 0.9, "test premise: unscaled fp16 gradients underflow"
    assert cos_unscaled < 0.95 and cos_scaled > 0.99, (cos_unscaled, cos_scaled)
    with pytest.raises(ValueError, match="loss_scale"):
        A.SMART().step(model, batch, forward_fn, loss_scale=0.0)
