"""GuiDG trainer: both steps train, save/load reproduces predictions, resume equals an uninterrupted run."""
import pytest
import torch

import guidg_fast as gf
from guidg_fast.train import GuiDG, epoch_batch_indices

C = 4
DOMAINS = ["a", "b", "c"]


class ShiftedImages(torch.utils.data.Dataset):
    """Random images whose mean encodes the class: learnable, tiny and deterministic."""

    def __init__(self, n, seed, classnames=None):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, C, (n,), generator=g)
        self.x = 0.3 * torch.randn(n, 3, 32, 32, generator=g) + self.y.view(-1, 1, 1, 1).float()
        self.classnames = classnames or [f"class {i}" for i in range(C)]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _data(offset=0):
    return {d: ShiftedImages(12, offset + i) for i, d in enumerate(DOMAINS)}


def _model(**kw):
    return GuiDG(gf.TINY_ARCH, None, [f"class {i}" for i in range(C)], DOMAINS, n_ctx=2, **kw)


def test_both_steps_train_and_save_load_round_trip(tmp_path):
    model = _model()
    s1 = model.fit_experts(_data(), iterations=10, batch_size=12, lr=0.5)  # batch = whole domain
    assert len(s1) == 10 and sum(s1[-3:]) < sum(s1[:3]) - 0.1
    s2 = model.finetune(_data(10), iterations=4, batch_per_domain=3, lr=1e-3)
    assert len(s2) == 4 and all(torch.isfinite(torch.tensor(s2)))
    results = model.evaluate({"t": ShiftedImages(10, 99)})
    assert set(results["t"]) == {"ensemble", "experts", "weights", "images"}
    assert abs(sum(results["t"]["weights"].values()) - 1) < 1e-5
    model.save(str(tmp_path / "m"))
    loaded = GuiDG.load(str(tmp_path / "m"))
    x = torch.randn(5, 3, 32, 32)
    a, wa = model.predict(x)
    b, wb = loaded.predict(x)
    assert torch.equal(a, b) and torch.equal(wa, wb)


def test_step1_resume_equals_uninterrupted(tmp_path):
    full = _model()
    full.fit_experts(_data(), iterations=6, batch_size=5, lr=5e-2)
    part = _model()
    part.fit_experts(_data(), iterations=6, batch_size=5, lr=5e-2, checkpoint_dir=str(tmp_path), checkpoint_every=3)
    resumed = _model()
    resumed.fit_experts(_data(), iterations=6, batch_size=5, lr=5e-2, resume=str(tmp_path / "step1_state.safetensors"))
    assert torch.equal(full.learner.ctx, resumed.learner.ctx)
    assert full.history["step1"] == resumed.history["step1"]


@pytest.mark.parametrize("baseline", ["clipood", "ueo"])
def test_step2_resume_equals_uninterrupted(tmp_path, baseline):
    def run(**kw):
        m = _model(baseline=baseline)
        m.fit_experts(_data(), iterations=2, batch_size=4, lr=5e-2)
        m.finetune(_data(10), iterations=4, batch_per_domain=2, lr=1e-3, **kw)
        return m

    full = run()
    run(checkpoint_dir=str(tmp_path), checkpoint_every=2)
    resumed = run(resume=str(tmp_path / "step2_state.safetensors"))
    assert full.history["step2"] == resumed.history["step2"]
    for (k, a), b in zip(full.eval_visual.state_dict().items(), resumed.eval_visual.state_dict().values()):
        assert torch.equal(a, b), k


def test_batches_are_a_pure_function_of_the_step():
    a = epoch_batch_indices(10, 4, 7, seed=3, stream=1)
    b = epoch_batch_indices(10, 4, 7, seed=3, stream=1)
    assert torch.equal(a, b) and a.numel() == 4
    epoch = torch.cat([epoch_batch_indices(12, 4, s, seed=3, stream=1) for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(12))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="baseline must be one of"):
        _model(baseline="coop")
    with pytest.raises(ValueError, match="weight_mode"):
        _model(weight_mode="token")
    model = _model()
    with pytest.raises(ValueError, match=r"exactly the source domains"):
        model.fit_experts({"a": ShiftedImages(4, 0)}, iterations=1)
    other = {d: ShiftedImages(4, i, classnames=["x", "y", "z", "w"]) for i, d in enumerate(DOMAINS)}
    with pytest.raises(ValueError, match="built for"):
        model.fit_experts(other, iterations=1)
    model.save(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="trained for 4 classes"):
        GuiDG.load(str(tmp_path / "m"), classnames=["x", "y"])
    with pytest.raises(FileNotFoundError):
        GuiDG.load(str(tmp_path / "nothing"))


def test_official_prompt_learner_loads(tmp_path):
    model = _model()
    W = model.learner.ctx.shape[-1]
    ctx = torch.randn(2, W)
    torch.save({"ctx": ctx, "token_prefix": torch.zeros(C, 1, W), "token_suffix": torch.zeros(C, 74, W)},
               tmp_path / "best16.pth")
    model.load_official_expert("b", str(tmp_path / "best16.pth"))
    assert torch.equal(model.learner.ctx[1], ctx)
    torch.save({"ctx": ctx, "token_prefix": torch.zeros(C + 3, 1, W)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="another class set"):
        model.load_official_expert("a", str(tmp_path / "other.pth"))


def test_step1_feature_cache_on_disk_equals_in_memory(tmp_path):
    plain = _model()
    plain.fit_experts(_data(), iterations=5, batch_size=5, lr=5e-2)
    cached = _model()
    cached.fit_experts(_data(), iterations=5, batch_size=5, lr=5e-2, cache_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step1_features_{k}.safetensors" for k in range(3)]
    torch.testing.assert_close(cached.learner.ctx, plain.learner.ctx, rtol=1e-5, atol=1e-6)
    again = _model()
    again.fit_experts(_data(), iterations=5, batch_size=5, lr=5e-2, cache_dir=str(tmp_path))  # read back
    assert torch.equal(again.learner.ctx, cached.learner.ctx)


def test_step1_augmented_views():
    def jitter(x):  # a random transform: each cached view of an image differs
        return x + 0.1 * torch.randn_like(x)

    a = _model()
    hist = a.fit_experts(_data(), iterations=8, batch_size=6, lr=5e-2, views=2, transform=jitter)
    b = _model()
    assert b.fit_experts(_data(), iterations=8, batch_size=6, lr=5e-2, views=2, transform=jitter) == hist  # seeded
    one = _model()
    assert one.fit_experts(_data(), iterations=8, batch_size=6, lr=5e-2, views=1, transform=jitter) != hist
    with pytest.raises(ValueError, match="views"):
        _model().fit_experts(_data(), iterations=2, views=2)
    with pytest.raises(ValueError, match="views"):
        _model().fit_experts(_data(), iterations=2, views=0)


def test_progress_bar_redraws_rarely_when_not_a_terminal(capsys):
    # a log file or CI (capsys: stderr is not a tty) gets the first and last state and one line per
    # 10 s, not a redraw per step
    from guidg_fast.train import guidg

    bar = guidg._progress(range(500), True, "step x")
    log = guidg._LossLog(bar)
    for _ in bar:
        log.last -= 0.5  # as if each step took 0.5 s
        log.show(bar, 1.25, 10)
    err = capsys.readouterr().err
    assert err.count("\r") < 10, f"{err.count(chr(13))} redraws for 500 steps"
    assert "500/500" in err and "loss=1.2500" in err and "img_per_s=20" in err


def test_losses_are_read_to_the_host_in_batches_not_every_step(monkeypatch):
    # a per-step float(loss) makes the host wait for the device every step: the loops read the
    # pending losses together (checkpoints, NaN checks, progress updates, the last step)
    import guidg_fast as gf
    from guidg_fast.train import checkpoint

    reads = []
    original = checkpoint.LossGuard.drain

    def counting(self):
        values = original(self)
        reads.append(len(values))
        return values

    monkeypatch.setattr(checkpoint.LossGuard, "drain", counting)
    trainer = _model()
    data = _data()
    trainer.fit_experts(data, iterations=7, batch_size=4, progress=False)
    assert sum(reads) == 7 and len(trainer.history["step1"]) == 7 and reads[-1] == 7, reads
    seen = []
    trainer.fit_experts(data, iterations=3, batch_size=4, progress=False,
                        callback=lambda stage, step, loss: seen.append((step, loss)))
    assert [s for s, _ in seen] == [0, 1, 2]
    assert [v for _, v in seen] == trainer.history["step1"][-3:]
