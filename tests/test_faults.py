"""Bad inputs and faults (issue #16): no code from state files, no hangs, no silent wrong answers,
atomic model folders, a stop on a non-finite loss, and errors that name the file or argument."""
import contextlib
import copy
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import guidg_fast as gf
from guidg_fast import ops, reference
from guidg_fast.data import folders
from guidg_fast.ops import _backend
from guidg_fast.train import GuiDG, checkpoint
NonFiniteLossError = gf.NonFiniteLossError

from backends import cpu_backends

C = 3
DOMAINS = ["a", "b"]
CLASSES = [f"class {i}" for i in range(C)]


class Images(torch.utils.data.Dataset):
    def __init__(self, n, seed, labels=None, fill=None):
        g = torch.Generator().manual_seed(seed)
        self.y = labels if labels is not None else torch.randint(0, C, (n,), generator=g)
        self.x = 0.3 * torch.randn(n, 3, 32, 32, generator=g) + self.y.view(-1, 1, 1, 1).float()
        if fill is not None:
            self.x.fill_(fill)
        self.classnames = list(CLASSES)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _data(seed=0, **kw):
    return {d: Images(6, seed + i, **kw) for i, d in enumerate(DOMAINS)}


def _model(seed=0):
    return GuiDG(gf.TINY_ARCH, None, CLASSES, DOMAINS, n_ctx=2, seed=seed)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model after a short step 1, saved once (read-only for the tests)."""
    model = _model()
    model.fit_experts(_data(), iterations=2, batch_size=6, lr=0.1)
    folder = str(tmp_path_factory.mktemp("trained") / "model")
    model.save(folder)
    return model, folder


@contextlib.contextmanager
def _deadline(seconds=20):
    """Fails (instead of hanging the suite) when the body blocks, e.g. on open() of a FIFO."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ 1. no code from a state file
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating the file proves code ran


def test_crafted_pickle_state_never_runs_code(trained, tmp_path):
    marker = str(tmp_path / "pwned")
    crafted = str(tmp_path / "step1_state.pt")
    torch.save({"stage": "step1", "step": 1, "x": _Payload(marker)}, crafted)
    with pytest.raises(ValueError, match=r"step1_state\.pt.*pickle"):
        checkpoint.load_state(crafted)
    raw = str(tmp_path / "raw.pt")
    with open(raw, "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    with pytest.raises(ValueError, match=r"raw\.pt"):
        checkpoint.load_state(raw)
    with pytest.raises(ValueError, match=r"step1_state\.pt"):
        copy.deepcopy(trained[0]).fit_experts(_data(), iterations=2, batch_size=6, resume=crafted)
    assert not os.path.exists(marker)


def test_state_round_trip_and_foreign_files(tmp_path):
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(3)
    opt.step()
    state = {"stage": "step2", "step": 3, "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
             "betas": (0.9, 0.999), "history": [1.0, 0.5], "none": None}
    path = str(tmp_path / "s.safetensors")
    checkpoint.save_state(path, state)
    back = checkpoint.load_state(path)
    assert back["betas"] == (0.9, 0.999) and back["history"] == [1.0, 0.5] and back["none"] is None
    assert torch.equal(back["rng"], state["rng"])
    assert set(back["optimizer"]["state"]) == {0}  # int keys survive
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    # a plain weights file, an empty and a truncated state: errors naming the file
    weights = str(tmp_path / "weights.safetensors")
    checkpoint.save_tensors(weights, {"a": torch.ones(2)})
    with pytest.raises(ValueError, match=r"weights\.safetensors.*not a guidg-fast training state"):
        checkpoint.load_state(weights)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.safetensors.*empty file"):
        checkpoint.load_state(str(empty))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(path, "rb").read()[:-10])
    with pytest.raises(ValueError, match=r"cut\.safetensors"):
        checkpoint.load_state(str(cut))


# ------------------------------------------------------------------ 2. no hangs in load_domainbed
def _png(path, size=(8, 8), color=(200, 10, 10)):
    Image.new("RGB", size, color).save(path)


def test_symlink_loops_neither_hang_nor_multiply_samples(tmp_path):
    cls = tmp_path / "dom" / "cat"
    cls.mkdir(parents=True)
    _png(cls / "one.png")
    os.symlink(cls, cls / "loop1")
    os.symlink(cls, cls / "loop2")
    os.symlink(tmp_path / "dom", cls / "up")  # a link back to an ancestor
    with _deadline():
        data = gf.data.load_domainbed(tmp_path)
    assert len(data["dom"]) == 1


@pytest.mark.parametrize("skip_corrupt", [False, True])
def test_fifo_with_an_image_name_is_skipped_not_opened(tmp_path, skip_corrupt):
    cls = tmp_path / "dom" / "cat"
    cls.mkdir(parents=True)
    _png(cls / "ok.png")
    os.mkfifo(cls / "x.jpg")
    with _deadline(), pytest.warns(UserWarning, match=r"x\.jpg.*not a regular file"):
        ds = gf.data.DomainFolder(tmp_path / "dom", skip_corrupt=skip_corrupt)
        assert len(ds) == 1
        ds[0]


# ------------------------------------------------------------------ 3. silent wrong answers
def test_encode_expert_prompts_checks_ctx_shape(trained):
    model, _ = trained
    learner = gf.ExpertPromptLearner(model.model, model.tokenizer, CLASSES, num_experts=3, n_ctx=4)
    good = learner.ctx
    learner.ctx = torch.nn.Parameter(torch.randn(3, 6, good.shape[-1]))
    with pytest.raises(ValueError, match=r"^learner\.ctx must have shape \(3, 4, 64\)"):
        gf.encode_expert_prompts(model.model, learner)


def test_evaluate_rejects_labels_outside_the_classes(trained):
    model, _ = trained
    bad = Images(5, 3, labels=torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match=r"datasets\['t'\] has label 3 at item 3, outside \[0, 3\)"):
        model.evaluate({"t": bad})


@pytest.mark.parametrize("backend", ["eager", *cpu_backends("cmattn")])
def test_cmattn_zero_heads_raises_on_every_backend(backend):
    f, T = F.normalize(torch.randn(4, 6), dim=-1), F.normalize(torch.randn(3, 5, 6), dim=-1)
    with _backend.use_backend(backend), pytest.raises(ValueError, match=r"^wv must hold at least one attention head"):
        ops.cross_modal_attention(f, T, torch.randn(0, 6, 6), torch.randn(0, 6), torch.randn(0, 5), torch.randn(0))
    with pytest.raises(ValueError, match=r"^wv must hold at least one"):
        reference.cross_modal_attention(f, T, torch.randn(0, 6, 6), torch.randn(0, 6), torch.randn(0, 5), torch.randn(0))


def test_trainer_argument_checks(trained, tmp_path):
    model = copy.deepcopy(trained[0])
    for bs in (-2, 0, 2.5):
        with pytest.raises(ValueError, match=r"^batch_size must be an int >= 1"):
            model.fit_experts(_data(), iterations=2, batch_size=bs)
    with pytest.raises(ValueError, match=r"^batch_per_domain must be an int >= 1"):
        model.finetune(_data(), iterations=2, batch_per_domain=0)
    with pytest.raises(ValueError, match=r"^lr must be a finite number"):
        model.fit_experts(_data(), iterations=2, batch_size=6, lr=float("nan"))
    with pytest.raises(ValueError, match=r"^domains must be a list of domain names, got the string 'ab'"):
        gf.data.load_domainbed(tmp_path, domains="ab")
    # step-1 labels out of range name the domain
    bad = _data()
    bad["b"] = Images(4, 9, labels=torch.tensor([0, 1, 7, 0]))
    with pytest.raises(ValueError, match=r"datasets\['b'\] has label 7 at item 2"):
        model.fit_experts(bad, iterations=2, batch_size=4)


def _rewrite_weights(folder, edit):
    """Edits a saved model's tensors and re-records the digest (a consistent but wrong folder)."""
    path = os.path.join(folder, "weights.safetensors")
    tensors = checkpoint.load_tensors(path)
    edit(tensors)
    checkpoint.save_tensors(path, tensors)
    config = json.load(open(os.path.join(folder, "config.json")))
    if "weights_sha256" in config:
        config["weights_sha256"] = checkpoint.weights_digest(open(path, "rb").read())
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))


def test_load_checks_expert_features_shape(trained, tmp_path):
    import shutil

    _, folder = trained
    copy = str(tmp_path / "m")
    shutil.copytree(folder, copy)
    _rewrite_weights(copy, lambda t: t.update(expert_features=t["expert_features"][:, :2]))
    with pytest.raises(ValueError, match=r"weights\.safetensors.*expert_features of shape \(2, 2, \d+\), expected \(2, 3, \d+\)"):
        GuiDG.load(copy)


# ------------------------------------------------------------------ 4. atomic model folders
def test_mixed_save_pair_is_refused(trained, tmp_path):
    import shutil

    model, folder = trained
    other = _model(seed=1)
    other.save(str(tmp_path / "n"))
    mixed = str(tmp_path / "mixed")
    shutil.copytree(folder, mixed)
    shutil.copy(tmp_path / "n" / "weights.safetensors", os.path.join(mixed, "weights.safetensors"))
    with pytest.raises(ValueError, match=r"does not match .*config\.json"):
        GuiDG.load(mixed)


def test_interrupted_save_keeps_the_old_folder_and_leftovers_are_removed(trained, tmp_path, monkeypatch):
    model, _ = trained
    folder = str(tmp_path / "model")
    model.save(folder)
    before = open(os.path.join(folder, "weights.safetensors"), "rb").read()
    # a killed writer's leftovers (its pid is gone): removed by the next save
    dead = _dead_pid()
    (tmp_path / f".tmp-{dead}-x-model").mkdir()
    (tmp_path / f".tmp-{dead}-x-model" / "weights.safetensors").write_bytes(b"0" * 100)
    (tmp_path / "model" / f".tmp-{dead}-yweights.safetensors").write_bytes(b"0" * 100)
    other = _model(seed=1)
    real_fsync = os.fsync
    calls = []

    def dying_fsync(fd):  # dies after the weights are on disk, before the config
        calls.append(fd)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", dying_fsync)
    with pytest.raises(KeyboardInterrupt):
        other.save(folder)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert open(os.path.join(folder, "weights.safetensors"), "rb").read() == before
    GuiDG.load(folder)  # still the whole old save
    other.save(folder)
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    leftovers += [n for n in os.listdir(folder) if n.startswith(".tmp-")]
    assert leftovers == []
    assert sorted(os.listdir(folder)) == ["config.json", "weights.safetensors"]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(GuiDG.load(folder).predict(x)[0], other.predict(x)[0])


# ------------------------------------------------------------------ 5. NaN / Inf
def test_step1_nan_images_stop_with_the_step_and_causes(trained):
    model = copy.deepcopy(trained[0])
    with pytest.raises(NonFiniteLossError, match=r"step 1: the loss became NaN or Inf at step 1 .*input images.*lr="):
        model.fit_experts(_data(fill=float("nan")), iterations=3, batch_size=6)


def test_step2_non_finite_loss_keeps_the_last_good_checkpoint(trained, tmp_path):
    model, folder = trained
    model = GuiDG.load(folder)

    def blow_up(stage, step, loss):
        if step == 2:  # from the 4th step on the logits overflow
            model.temperature = 1e300

    with pytest.raises(NonFiniteLossError, match=r"at step 4 .*step2_state\.safetensors"):
        model.finetune(_data(), iterations=8, batch_per_domain=2, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                       callback=blow_up)
    state = checkpoint.load_state(str(tmp_path / "step2_state.safetensors"))
    assert state["step"] == 2 and checkpoint.non_finite_entries(state) == []


def test_save_state_refuses_a_non_finite_state(tmp_path):
    path = str(tmp_path / "s.safetensors")
    checkpoint.save_state(path, {"stage": "step1", "ctx": torch.ones(2)})
    with pytest.raises(NonFiniteLossError, match=r"ctx"):
        checkpoint.save_state(path, {"stage": "step1", "ctx": torch.tensor([1.0, float("nan")])})
    assert torch.equal(checkpoint.load_state(path)["ctx"], torch.ones(2))


def test_guidance_nan_error_names_the_callers_argument():
    f, T = F.normalize(torch.randn(4, 6), dim=-1), F.normalize(torch.randn(3, 5, 6), dim=-1)
    y = torch.randint(0, 5, (4,))
    params = (torch.randn(2, 6, 6), torch.randn(2, 6), torch.randn(2, 5), torch.randn(2))
    f[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^f contains NaN or Inf"):
        ops.guidance_loss(f, T, y, *params, 10.0)
    f[1, 2] = 0.0
    T[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^T contains NaN or Inf"):
        ops.guidance_loss(f, T, y, *params, 10.0)


# ------------------------------------------------------------------ 6. one dtype contract
@pytest.mark.parametrize("backend", ["eager", *cpu_backends("multi_expert_loss")])
def test_int32_labels_on_every_backend(backend):
    f, T = F.normalize(torch.randn(4, 6), dim=-1), F.normalize(torch.randn(3, 5, 6), dim=-1)
    y, w = torch.randint(0, 5, (4,)), torch.rand(3)
    want = reference.multi_expert_loss(f, T, y, w, 10.0, margin=0.1)
    with _backend.use_backend(backend):
        got = ops.multi_expert_loss(f, T, y.int(), w, 10.0, margin=0.1)
    # one formula, fp32, different summation orders across backends
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))


# ------------------------------------------------------------------ 7. messages naming the file / argument
def test_damaged_model_folder_files_are_named(trained, tmp_path):
    import shutil

    _, folder = trained
    m = tmp_path / "m"
    shutil.copytree(folder, m)
    (m / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights\.safetensors"):
        GuiDG.load(str(m))
    shutil.rmtree(m)
    shutil.copytree(folder, m)
    config = (m / "config.json").read_text()
    (m / "config.json").write_text(config[: len(config) // 2])
    with pytest.raises(ValueError, match=r"config\.json.*not valid JSON"):
        GuiDG.load(str(m))
    data = json.loads(config)
    del data["domains"]
    (m / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config\.json.*lacks the entries \['domains'\]"):
        GuiDG.load(str(m))
    (m / "weights.safetensors").write_bytes(open(os.path.join(folder, "weights.safetensors"), "rb").read()[:1000])
    with pytest.raises(ValueError, match=r"weights\.safetensors"):
        checkpoint.load_tensors(str(m / "weights.safetensors"))


def test_load_clip_names_bad_weight_files(tmp_path):
    junk = tmp_path / "random.pt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match=r"random\.pt.*could not be read as a weights file") as info:
        gf.load_clip(gf.TINY_ARCH, str(junk))
    assert "TorchScript" not in str(info.value)
    with pytest.raises(ValueError, match=r"is a folder"):
        gf.load_clip(gf.TINY_ARCH, str(tmp_path))
    cut = tmp_path / "w.safetensors"
    checkpoint.save_tensors(str(cut), {"a": torch.ones(100)})
    cut.write_bytes(cut.read_bytes()[:-50])
    with pytest.raises(ValueError, match=r"w\.safetensors"):
        gf.load_clip(gf.TINY_ARCH, str(cut))


def test_resume_from_a_shorter_run_is_named(trained, tmp_path):
    model = copy.deepcopy(trained[0])
    model.fit_experts(_data(), iterations=2, batch_size=6, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    state = str(tmp_path / "step1_state.safetensors")
    with pytest.raises(ValueError, match=r"step1_state\.safetensors.*run of 2 steps, this run has 4"):
        model.fit_experts(_data(), iterations=4, batch_size=6, resume=state)
    with pytest.raises(ValueError, match=r"step1_state\.safetensors.*not a step-2 state"):
        model.finetune(_data(), iterations=2, batch_per_domain=2, resume=state)


def test_cli_image_size_follows_the_architecture():
    from guidg_fast import cli

    args = cli.build_parser().parse_args(["train-experts", "--arch", gf.TINY_ARCH])
    cli._resolve_image_size(args)
    assert args.image_size == 32
    args = cli.build_parser().parse_args(["train-experts", "--arch", gf.TINY_ARCH, "--image-size", "224"])
    with pytest.raises(SystemExit, match=r"--image-size 224 does not fit --arch guidg-tiny.*32"):
        cli._resolve_image_size(args)


def test_cli_ctrl_c_prints_the_resume_command(tmp_path, monkeypatch, capsys):
    from guidg_fast import cli

    original = GuiDG.fit_experts

    def interrupted(self, *a, callback=None, **kw):
        def stop(stage, step, loss):
            if step == 2:
                raise KeyboardInterrupt

        return original(self, *a, callback=stop, **kw)

    monkeypatch.setattr(GuiDG, "fit_experts", interrupted)
    out = str(tmp_path / "run")
    argv = ["train-experts", "--arch", gf.TINY_ARCH, "--n-ctx", "2", "--synthetic-classes", "2",
            "--synthetic-images", "2", "--iterations", "6", "--batch-size", "2", "--checkpoint-every", "2",
            "--out", out]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    state = os.path.join(out, "step1_state.safetensors")
    assert f"last checkpoint: {state}" in err and "Traceback" not in err
    assert f"guidg-fast train-experts --arch {gf.TINY_ARCH}" in err and f"--resume {state} --out {out}" in err


# ------------------------------------------------------------------ 8. decompression bombs
def _bomb_png(path, side=11000):
    """A valid grayscale PNG of side x side zeros: a few KB on disk, side^2 bytes decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp, row, parts = zlib.compressobj(9), b"\0" * (side + 1), []
    block = row * 500
    for _ in range(side // 500):
        parts.append(comp.compress(block))
    parts.append(comp.compress(row * (side % 500)))
    parts.append(comp.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_or_skipped(tmp_path):
    cls = tmp_path / "dom" / "cat"
    cls.mkdir(parents=True)
    _png(cls / "ok.png")
    _bomb_png(cls / "bomb.png")
    assert os.path.getsize(cls / "bomb.png") < 1_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        ds = gf.data.DomainFolder(tmp_path / "dom")
        with pytest.raises(folders.CorruptImageError, match=r"bomb\.png.*11000 x 11000.*above the limit"):
            ds.load(0)  # bomb.png sorts first
        with pytest.warns(UserWarning, match=r"bomb\.png.*above the limit"):
            skipping = gf.data.DomainFolder(tmp_path / "dom", skip_corrupt=True)
    assert len(skipping) == 1 and skipping.samples[0][0].endswith("ok.png")


def test_save_never_replaces_a_folder_with_other_files(trained, tmp_path):
    model, _ = trained
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds other files \(notes\.txt\)"):
        model.save(str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "keep me"
