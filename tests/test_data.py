"""Data layer: DomainBed folders, split protocols, ImageNet-DG builder, synthetic domains, batches."""
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from guidg_fast.data import (
    CLIP_MEAN,
    CLIP_STD,
    DOMAINBED_DATASETS,
    CorruptImageError,
    DGSplit,
    DomainFolder,
    SyntheticDomains,
    build_imagenet_dg,
    clip_transform,
    domain_balanced_batches,
    few_shot_split,
    load_domainbed,
    multi_source_split,
    split_indices,
)


# ---------------------------------------------------------------------------------------------
# helpers: tiny PNG trees
# ---------------------------------------------------------------------------------------------
def _colour(code: int) -> tuple[int, int, int]:
    """A colour that encodes a small integer exactly (read back with _decode)."""
    return (code * 10 % 256, 7, 200)


def _decode(image: Image.Image) -> int:
    return image.getpixel((0, 0))[0] // 10


def _write_png(path: Path, code: int = 0, size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, _colour(code)).save(path)


def _make_domain(root: Path, classes, per_class: int, code_of=None):
    for c_index, c in enumerate(classes):
        for i in range(per_class):
            _write_png(root / c / f"img{i:03d}.png", code_of(c) if code_of else c_index)
    return root


def _make_dataset(root: Path, domains, classes, per_class=3):
    for d in domains:
        _make_domain(root / d, classes, per_class)
    return root


PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]


@pytest.fixture()
def pacs_root(tmp_path):
    _make_dataset(tmp_path / "PACS", DOMAINBED_DATASETS["PACS"]["domains"], PACS_CLASSES, per_class=3)
    return tmp_path


def _load_quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny trees trip the "not the full dataset" count warning
        return load_domainbed(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# registry and folders
# ---------------------------------------------------------------------------------------------
def test_domainbed_registry():
    expected = {
        "PACS": ("PACS", ["art_painting", "cartoon", "photo", "sketch"], 7, 9_991),
        "VLCS": ("VLCS", ["Caltech101", "LabelMe", "SUN09", "VOC2007"], 5, 10_729),
        "OfficeHome": ("office_home", ["Art", "Clipart", "Product", "Real World"], 65, 15_588),
        "TerraIncognita": ("terra_incognita", ["location_100", "location_38", "location_43", "location_46"], 10, 24_788),
        "DomainNet": ("domain_net", ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"], 345, 586_575),
    }
    assert set(DOMAINBED_DATASETS) == set(expected)
    for name, (folder, domains, classes, images) in expected.items():
        info = DOMAINBED_DATASETS[name]
        assert (info["folder"], info["domains"], info["num_classes"], info["images"]) == (folder, domains, classes, images)


def test_domain_folder_reads_sorted_classes_and_ignores_other_files(tmp_path):
    root = _make_domain(tmp_path / "photo", ["zebra", "apple", "mango"], per_class=2)
    (root / "classnames.txt").write_text("not an image")
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / "apple" / ".DS_Store").write_bytes(b"\0")
    _write_png(root / ".hidden" / "x.png")
    _write_png(root / "mango" / "nested" / "deep.png", code=1)  # nested images belong to the class
    ds = DomainFolder(root)
    assert ds.domain == "photo"
    assert ds.classnames == ["apple", "mango", "zebra"]
    assert len(ds) == 7
    assert [label for _, label in ds.samples] == [0, 0, 1, 1, 1, 2, 2]
    assert ds.labels == [0, 0, 1, 1, 1, 2, 2]
    image, label = ds[2]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1
    ds.transform = T.ToTensor()
    x, label = ds[0]
    assert x.shape == (3, 5, 6) and label == 0


def test_load_domainbed_by_name_and_folder(pacs_root):
    for name in ("PACS", "pacs"):
        with pytest.warns(UserWarning, match="full dataset has 9,991"):
            domains = load_domainbed(pacs_root, dataset=name)
        assert list(domains) == DOMAINBED_DATASETS["PACS"]["domains"]
        for d, ds in domains.items():
            assert ds.domain == d and ds.classnames == PACS_CLASSES and len(ds) == 21
    # root may be the dataset folder itself; a subset of domains; no dataset: every sub-folder
    assert list(_load_quiet(pacs_root / "PACS", dataset="PACS", domains=["sketch", "photo"])) == ["sketch", "photo"]
    assert list(_load_quiet(pacs_root / "PACS")) == ["art_painting", "cartoon", "photo", "sketch"]


def test_load_domainbed_officehome_real_world_spellings(tmp_path):
    classes = ["Alarm_Clock", "Bike"]
    _make_dataset(tmp_path / "office_home", ["Art", "Clipart", "Product", "Real_World"], classes, per_class=1)
    domains = _load_quiet(tmp_path, dataset="OfficeHome")
    assert list(domains) == ["Art", "Clipart", "Product", "Real World"]
    assert domains["Real World"].root.name == "Real_World"
    assert list(_load_quiet(tmp_path, dataset="office_home", domains=["Real_World"])) == ["Real_World"]


def test_transform_applies_to_every_domain(pacs_root):
    domains = _load_quiet(pacs_root, "PACS", transform=clip_transform(image_size=16))
    x, y = domains["photo"][0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0


# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the problem
# ---------------------------------------------------------------------------------------------
def test_missing_root_and_unknown_dataset(tmp_path, pacs_root):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_domainbed(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"unknown dataset 'ImageNet-Z'.*PACS"):
        load_domainbed(pacs_root, dataset="ImageNet-Z")
    with pytest.raises(ValueError, match=r"unknown domain\(s\) 'photos' for PACS"):
        load_domainbed(pacs_root, dataset="PACS", domains=["photos"])
    with pytest.raises(FileNotFoundError, match="VLCS"):
        load_domainbed(pacs_root, dataset="VLCS")


def test_missing_domain_folder(tmp_path):
    _make_dataset(tmp_path, ["photo"], ["a", "b"], per_class=1)
    with pytest.raises(FileNotFoundError, match="cartoon"):
        load_domainbed(tmp_path, domains=["photo", "cartoon"])


def test_empty_domain_folder(tmp_path):
    _make_dataset(tmp_path, ["photo"], ["a", "b"], per_class=2)
    (tmp_path / "sketch" / "a").mkdir(parents=True)
    (tmp_path / "sketch" / "b").mkdir(parents=True)
    (tmp_path / "sketch" / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"domain 'sketch' has no images"):
        load_domainbed(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"domain 'empty'.*no class folders"):
        load_domainbed(tmp_path, domains=["photo", "empty"])


def test_class_lists_that_differ(tmp_path):
    _make_dataset(tmp_path, ["photo"], ["cat", "dog", "owl"], per_class=1)
    _make_dataset(tmp_path, ["sketch"], ["cat", "dog", "yak"], per_class=1)
    with pytest.raises(ValueError, match=r"domain 'sketch' lacks 'owl' and has extra 'yak' compared with domain 'photo'"):
        load_domainbed(tmp_path)


def test_class_folder_without_images_warns(tmp_path):
    _make_domain(tmp_path / "photo", ["cat", "dog"], per_class=1)
    (tmp_path / "photo" / "emu").mkdir()
    with pytest.warns(UserWarning, match="'emu'"):
        ds = DomainFolder(tmp_path / "photo")
    assert ds.classnames == ["cat", "dog", "emu"] and len(ds) == 2


def _corrupt_tree(tmp_path):
    root = _make_domain(tmp_path / "photo", ["cat", "dog"], per_class=3)
    garbage = root / "dog" / "img001.png"
    garbage.write_bytes(b"this is not a png file at all")
    # a truncated PNG (valid header) and a truncated JPEG (header + part of the scan)
    data = (root / "cat" / "img002.png").read_bytes()
    (root / "cat" / "img002.png").write_bytes(data[: len(data) // 2])
    jpeg = root / "cat" / "big.jpg"
    Image.effect_noise((64, 64), 60).convert("RGB").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:700])
    return root


def test_corrupt_image_raises_naming_the_file(tmp_path):
    root = _corrupt_tree(tmp_path)
    ds = DomainFolder(root)  # lazy: construction succeeds, the load names the file
    assert len(ds) == 7
    index = [p for p, _ in ds.samples].index(str(root / "dog" / "img001.png"))
    with pytest.raises(CorruptImageError, match=r"img001\.png.*skip_corrupt=True"):
        ds[index]
    for name in ("img002.png", "big.jpg"):
        index = [Path(p).name for p, _ in ds.samples].index(name)
        with pytest.raises(CorruptImageError, match=name.replace(".", r"\.")):
            ds[index]
    with pytest.raises(CorruptImageError, match=r"cat/big\.jpg"):  # the first bad file in iteration order
        [ds[i] for i in range(len(ds))]


def test_corrupt_image_skipped_with_warning_only_when_asked(tmp_path):
    root = _corrupt_tree(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable image file\(s\).*(img001|img002|big)"):
        ds = DomainFolder(root, skip_corrupt=True)
    assert len(ds) == 4
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["big.jpg", "img001.png", "img002.png"]
    assert all(isinstance(ds[i][0], Image.Image) for i in range(len(ds)))  # length is final
    with pytest.warns(UserWarning, match="skipped"):
        domains = load_domainbed(tmp_path, skip_corrupt=True)
    assert len(domains["photo"]) == 4


def test_file_broken_after_check_is_replaced_by_same_class(tmp_path):
    root = _make_domain(tmp_path / "photo", ["cat", "dog"], per_class=3)
    ds = DomainFolder(root, skip_corrupt=True)
    (root / "dog" / "img000.png").write_bytes(b"broken later")
    index = [p for p, _ in ds.samples].index(str(root / "dog" / "img000.png"))
    with pytest.warns(UserWarning, match=r"img000\.png.*became unreadable"):
        image, label = ds[index]
    assert label == 1 and _decode(image) == 1 and len(ds) == 6


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,fraction", [(10, 0.3), (7, 0.3), (1, 0.5), (0, 0.3), (101, 0.7), (5, 0.0), (5, 1.0)])
def test_split_indices_deterministic_disjoint_covering(n, fraction):
    first, rest = split_indices(n, fraction, seed=3)
    assert len(first) == round(fraction * n)
    assert set(first).isdisjoint(rest) and sorted(first + rest) == list(range(n))
    assert (first, rest) == split_indices(n, fraction, seed=3)
    torch.manual_seed(999)  # the global RNG plays no part
    assert (first, rest) == split_indices(n, fraction, seed=3)


def test_split_indices_seed_changes_split_and_checks_args():
    assert split_indices(100, 0.3, 0) != split_indices(100, 0.3, 1)
    for args, name in [((-1, 0.3, 0), "n must"), ((5, 1.5, 0), "fraction must"), ((5, 0.3, 0.5), "seed must")]:
        with pytest.raises(ValueError, match=name):
            split_indices(*args)


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticDomains(num_classes=5, images_per_class=10, image_size=16, seed=0)


def _indices(subset):
    return subset.indices


def test_multi_source_split(synthetic):
    domains = synthetic.datasets
    split = multi_source_split(domains, targets=["sketch"], seed=0)
    assert isinstance(split, DGSplit)
    assert split.source_domains == ["photo", "painting", "cartoon"] and split.target_domains == ["sketch"]
    assert split.classnames == synthetic.classnames and split.num_classes == 5
    assert split.test["sketch"] is domains["sketch"]
    for d in split.source_domains:
        a, b = _indices(split.step1[d]), _indices(split.step2[d])
        assert len(a) == round(0.3 * 50) and len(b) == 35
        assert set(a).isdisjoint(b) and sorted(a + b) == list(range(50))
        x, y = split.step1[d][0]
        assert y == domains[d].labels[a[0]] and torch.equal(x, domains[d][a[0]][0])
        assert split.step1[d].labels == [domains[d].labels[i] for i in a]
    again = multi_source_split(domains, targets=["sketch"], seed=0)
    assert all(_indices(again.step1[d]) == _indices(split.step1[d]) for d in split.source_domains)
    other_seed = multi_source_split(domains, targets=["sketch"], seed=1)
    assert any(_indices(other_seed.step1[d]) != _indices(split.step1[d]) for d in split.source_domains)
    # a source domain's split does not depend on which domain is held out
    other_target = multi_source_split(domains, targets=["cartoon"], seed=0)
    assert _indices(other_target.step1["photo"]) == _indices(split.step1["photo"])
    assert split.counts()["step2"]["photo"] == 35


def test_split_errors(synthetic):
    with pytest.raises(ValueError, match=r"target domain\(s\) \['clipart'\] not in domains"):
        multi_source_split(synthetic.datasets, targets=["clipart"])
    with pytest.raises(ValueError, match="no source domain left"):
        multi_source_split(synthetic.datasets, targets=list(synthetic.datasets))
    with pytest.raises(ValueError, match="expert_fraction"):
        multi_source_split(synthetic.datasets, targets=["sketch"], expert_fraction=1.0)
    with pytest.raises(ValueError, match="n_shot"):
        few_shot_split(synthetic.datasets, targets=["sketch"], n_shot=0)
    other = SyntheticDomains(num_classes=4, domains=("photo",), images_per_class=2, image_size=8)
    mixed = {"photo": other.datasets["photo"], "sketch": synthetic.datasets["sketch"]}
    with pytest.raises(ValueError, match=r"domain 'sketch' has extra 'ring' compared with domain 'photo'"):
        multi_source_split(mixed, targets=["sketch"])


def test_few_shot_split_counts(synthetic):
    split = few_shot_split(synthetic.datasets, targets=["cartoon"], n_shot=4, seed=0)
    assert split.source_domains == ["photo", "sketch", "painting"]
    for d in split.source_domains:
        a, b = _indices(split.step1[d]), _indices(split.step2[d])
        assert set(a).isdisjoint(b)
        for part in (split.step1[d], split.step2[d]):
            assert len(part) == 4 * 5
            assert sorted(part.labels) == sorted([c for c in range(5) for _ in range(4)])
    again = few_shot_split(synthetic.datasets, targets=["cartoon"], n_shot=4, seed=0)
    assert all(_indices(again.step2[d]) == _indices(split.step2[d]) for d in split.source_domains)
    assert _indices(few_shot_split(synthetic.datasets, ["cartoon"], n_shot=4, seed=5).step1["photo"]) != _indices(split.step1["photo"])
    # 10 images per class: 5 per half; asking for 8 gives all 5 of each half, with a warning
    with pytest.warns(UserWarning, match="fewer than 8 images per half"):
        short = few_shot_split(synthetic.datasets, targets=["cartoon"], n_shot=8, seed=0)
    assert len(short.step1["photo"]) == 25 and len(short.step2["photo"]) == 25
    assert sorted(_indices(short.step1["photo"]) + _indices(short.step2["photo"])) == list(range(50))


def test_with_transforms_gives_each_part_its_own_view(synthetic):
    split = multi_source_split(synthetic.datasets, targets=["sketch"])
    flipped = split.with_transforms(step1=lambda x: x.flip(-1), test=lambda x: x * 0)
    x_base, y_base = split.step1["photo"][0]
    x_view, y_view = flipped.step1["photo"][0]
    assert y_base == y_view and torch.equal(x_view, x_base.flip(-1))
    assert flipped.step2["photo"] is split.step2["photo"]
    assert float(flipped.test["sketch"][3][0].abs().sum()) == 0.0 and len(flipped.test["sketch"]) == 50
    assert split.step1["photo"].transform is None  # the original split is untouched


# ---------------------------------------------------------------------------------------------
# ImageNet-DG on a fake tree
# ---------------------------------------------------------------------------------------------
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331"]
A_WNIDS = ["n01443537", "n01491361", "n01496331"]


@pytest.fixture()
def imagenet_tree(tmp_path):
    root = tmp_path / "ImageNet"
    code = {w: i for i, w in enumerate(WNIDS)}  # pixel colour encodes the wnid: checks alignment
    by_code = lambda folder: code[folder]  # noqa: E731
    _make_domain(root / "i" / "train", WNIDS, 6, by_code)
    _make_domain(root / "i" / "val", WNIDS, 2, by_code)
    _make_domain(root / "s" / "images", WNIDS, 6, by_code)  # CoOp layout: one level down
    for i, w in enumerate(WNIDS):  # ImageNetV2 layout: numbered folders in sorted-wnid order
        for k in range(4):
            _write_png(root / "v2" / str(i) / f"{k}.jpeg", code[w])
    _make_domain(root / "a", A_WNIDS, 3, by_code)
    (root / "a" / "classnames.txt").write_text(
        "n01443537 goldfish\nn01491361 tiger shark\nn01496331 electric ray\n"
    )
    _make_domain(root / "r", WNIDS[:2], 2, by_code)
    return root


def test_build_imagenet_dg_fake_tree(imagenet_tree):
    root = imagenet_tree
    split = build_imagenet_dg(root / "i", root / "s", root / "v2", a_root=root / "a", r_root=root / "r",
                              target="imagenet_a", n_shot=2, seed=0)
    assert split.source_domains == ["imagenet", "imagenet_sketch", "imagenet_v2"]
    assert split.target_domains == ["imagenet_a"]
    assert split.classnames == ["goldfish", "tiger shark", "electric ray"]
    assert split.info["wnids"] == A_WNIDS
    counts = split.counts()
    assert counts["step1"] == counts["step2"] == {"imagenet": 6, "imagenet_sketch": 6, "imagenet_v2": 6}
    assert counts["test"] == {"imagenet_a": 9}
    code = {i: WNIDS.index(w) for i, w in enumerate(A_WNIDS)}
    for part in (split.step1, split.step2, split.test):
        for d, ds in part.items():
            for k in range(len(ds)):
                image, label = ds[k]
                assert _decode(image) == code[label], f"{d}[{k}]: label {label} is not its wnid's folder"
    for d in split.source_domains:
        assert set(_indices(split.step1[d])).isdisjoint(_indices(split.step2[d]))
    again = build_imagenet_dg(root / "i", root / "s", root / "v2", a_root=root / "a", n_shot=2, seed=0)
    assert all(_indices(again.step1[d]) == _indices(split.step1[d]) for d in split.source_domains)
    assert split.info["count_check"] == {}  # nothing here looks like the full datasets


def test_build_imagenet_dg_other_targets(imagenet_tree):
    root = imagenet_tree
    r = build_imagenet_dg(root / "i", root / "s", root / "v2", r_root=root / "r", target="r", n_shot=1,
                          transform=T.ToTensor())
    assert r.classnames == WNIDS[:2]  # no classnames.txt anywhere near: the wnids
    assert len(r.test["imagenet_r"]) == 4 and r.step1["imagenet"][0][0].shape == (3, 5, 6)
    val = build_imagenet_dg(root / "i", root / "s", root / "v2", target="imagenet_val", n_shot=3)
    assert val.num_classes == 6 and len(val.test["imagenet_val"]) == 12
    assert len(val.step1["imagenet"]) == 18 and len(val.step1["imagenet_v2"]) == 12  # v2: 2 per half


def test_build_imagenet_dg_errors(imagenet_tree):
    root = imagenet_tree
    args = (root / "i", root / "s", root / "v2")
    with pytest.raises(ValueError, match="unknown ImageNet-DG target 'imagenet_c'"):
        build_imagenet_dg(*args, target="imagenet_c")
    with pytest.raises(ValueError, match="needs a_root"):
        build_imagenet_dg(*args, target="imagenet_a")
    with pytest.raises(FileNotFoundError, match="sketch_root"):
        build_imagenet_dg(root / "i", root / "missing", root / "v2", a_root=root / "a")
    # a source that lacks one of the target's classes is named
    for f in (root / "s" / "images" / "n01491361").iterdir():
        f.unlink()
    (root / "s" / "images" / "n01491361").rmdir()
    with pytest.raises(FileNotFoundError, match=r"imagenet_sketch.*'n01491361'"):
        build_imagenet_dg(*args, a_root=root / "a")


def test_build_imagenet_dg_count_check(imagenet_tree, monkeypatch):
    """With full data the counts are compared with the published sizes: shrink those to the fake tree."""
    import guidg_fast.data.imagenet_dg as imagenet_dg

    root = imagenet_tree
    args = (root / "i", root / "s", root / "v2")
    fake_full = {"imagenet": (6, 36), "imagenet_val": (6, 12), "imagenet_sketch": (6, 36), "imagenet_v2": (6, 24),
                 "imagenet_a": (3, 9), "imagenet_r": (2, 4)}
    monkeypatch.setattr(imagenet_dg, "IMAGENET_DG_FULL", fake_full)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything matches: no warning
        split = build_imagenet_dg(*args, target="imagenet_val", n_shot=3)
    check = split.info["count_check"]
    assert {k: v["found"] for k, v in check.items() if "/" not in k} == {
        "imagenet": 36, "imagenet_sketch": 36, "imagenet_v2": 24, "imagenet_val": 12}
    assert check["step1/imagenet"] == {"found": 18, "expected": 18, "ok": True}
    assert check["step2/imagenet_v2"] == {"found": 12, "expected": 12, "ok": True}  # 4 per class: 2 per half
    assert all(v["ok"] for v in check.values())
    # a 200-class style target: only the target total is comparable
    a = build_imagenet_dg(*args, a_root=root / "a", n_shot=3)
    assert a.info["count_check"]["imagenet_a"] == {"found": 9, "expected": 9, "ok": True}
    assert "imagenet" not in a.info["count_check"]
    fake_full["imagenet_a"] = (3, 7_500)
    with pytest.warns(UserWarning, match="imagenet_a has 9 images in 3 classes; the full dataset has 7,500"):
        a = build_imagenet_dg(*args, a_root=root / "a", n_shot=3)
    assert a.info["count_check"]["imagenet_a"]["ok"] is False


# ---------------------------------------------------------------------------------------------
# synthetic domains
# ---------------------------------------------------------------------------------------------
def test_synthetic_deterministic_and_well_formed(synthetic):
    again = SyntheticDomains(num_classes=5, images_per_class=10, image_size=16, seed=0)
    other = SyntheticDomains(num_classes=5, images_per_class=10, image_size=16, seed=1)
    assert synthetic.classnames == ["circle", "square", "triangle", "cross", "ring"]
    assert list(synthetic.datasets) == ["photo", "sketch", "painting", "cartoon"]
    for d, ds in synthetic.datasets.items():
        assert len(ds) == 50 and ds.domain == d and ds.classnames == synthetic.classnames
        assert sorted(ds.labels) == sorted(list(range(5)) * 10)
        assert ds.images.shape == (50, 3, 16, 16) and ds.images.dtype == torch.float32
        assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
        assert torch.equal(ds.images, again.datasets[d].images)
        assert not torch.equal(ds.images, other.datasets[d].images)
    x, y = synthetic.datasets["photo"][3]
    assert x.shape == (3, 16, 16) and isinstance(y, int)
    # a domain's images depend only on (seed, name): adding domains does not change them
    solo = SyntheticDomains(num_classes=5, domains=("sketch",), images_per_class=10, image_size=16, seed=0)
    assert torch.equal(solo.datasets["sketch"].images, synthetic.datasets["sketch"].images)


def test_synthetic_domains_differ_in_style(synthetic):
    stats = {}
    for d, ds in synthetic.datasets.items():
        im = ds.images
        grey_gap = (im - im.mean(dim=1, keepdim=True)).abs().mean()  # colourfulness
        stats[d] = torch.stack([im.mean(), grey_gap, im.std()])
    assert stats["sketch"][1] < 0.02 < stats["cartoon"][1]  # the sketch domain is grey, cartoon colourful
    assert stats["sketch"][0] > 0.75  # paper background
    names = list(stats)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert (stats[names[i]] - stats[names[j]]).abs().max() > 0.03, (names[i], names[j])
    # same class, different domains: clearly different pixels
    a, b = synthetic.datasets["photo"].images, synthetic.datasets["cartoon"].images
    assert (a - b).abs().mean() > 0.1


def test_synthetic_transform_and_args():
    clip = SyntheticDomains(num_classes=3, domains=("photo", "zoo"), images_per_class=2, image_size=8, transform="clip")
    raw = SyntheticDomains(num_classes=3, domains=("photo", "zoo"), images_per_class=2, image_size=8)
    x, _ = clip.datasets["zoo"][1]
    expected = (raw.datasets["zoo"][1][0] - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert torch.allclose(x, expected)
    resized = SyntheticDomains(num_classes=3, domains=("photo",), images_per_class=1, image_size=8,
                               transform=clip_transform(image_size=12))
    assert resized.datasets["photo"][0][0].shape == (3, 12, 12)
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticDomains(num_classes=50)
    with pytest.raises(ValueError, match="transform"):
        SyntheticDomains(transform="imagenet")


def test_synthetic_written_as_domainbed_folder(tmp_path):
    synth = SyntheticDomains(num_classes=3, domains=("photo", "sketch"), images_per_class=2, image_size=8)
    synth.write_folder(tmp_path)
    domains = load_domainbed(tmp_path, transform=T.ToTensor())
    assert list(domains) == ["photo", "sketch"] and len(domains["photo"]) == 6
    assert domains["photo"].classnames == sorted(synth.classnames)


@pytest.mark.parametrize("held_out", ["sketch", "painting"])
def test_synthetic_shapes_transfer_to_a_held_out_domain(held_out):
    """The class signal is the shape: a small CNN trained on three domains beats chance on the fourth."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only add overhead
    try:
        torch.manual_seed(0)
        synth = SyntheticDomains(num_classes=5, images_per_class=24, image_size=32, seed=0)
        train = [ds for d, ds in synth.datasets.items() if d != held_out]
        x = torch.cat([ds.images for ds in train])
        y = torch.tensor([label for ds in train for label in ds.labels])
        test = synth.datasets[held_out]

        def edges(images):  # grey-level gradient magnitude: a colour-free input
            g = images.mean(dim=1, keepdim=True)
            return (g[..., 1:, :-1] - g[..., :-1, :-1]).abs() + (g[..., :-1, 1:] - g[..., :-1, :-1]).abs()

        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(64, 5),
        )
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(100):
            idx = torch.randint(len(x), (32,))
            loss = torch.nn.functional.cross_entropy(net(edges(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (net(edges(test.images)).argmax(1) == torch.tensor(test.labels)).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert acc > 0.4, f"held-out {held_out} accuracy {acc:.2f} (chance 0.2)"


# ---------------------------------------------------------------------------------------------
# domain-balanced batches
# ---------------------------------------------------------------------------------------------
class _Indexed(Dataset):
    def __init__(self, n, tag):
        self.n, self.tag = n, tag

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([float(self.tag), float(i)]), i % 3


def test_domain_balanced_batches():
    datasets = {"a": _Indexed(10, 0), "b": _Indexed(3, 1), "c": _Indexed(25, 2)}
    it = domain_balanced_batches(datasets, batch_per_domain=4, seed=0)
    seen = {0: [], 1: [], 2: []}
    batches = [next(it) for _ in range(5)]
    for x, y, d in batches:
        assert x.shape == (12, 2) and y.shape == (12,) and d.shape == (12,)
        assert y.dtype == torch.long and d.dtype == torch.long
        assert d.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert torch.equal(x[:, 0].long(), d)  # each sample comes from the domain it is tagged with
        assert torch.equal(y, x[:, 1].long() % 3)
        for k in range(3):
            seen[k].extend(x[d == k, 1].long().tolist())
    # the trainer's epochs (epoch_batch_indices): an epoch of a domain is ceil(n / 4) batches whose
    # first n draws are a permutation; its last batch wraps around to stay full
    assert sorted(seen[0][:10]) == list(range(10)) and len(set(seen[0][12:20])) == 8
    for e in range(5):  # domain "b" (3 samples): one epoch per batch
        assert sorted(seen[1][4 * e: 4 * e + 3]) == [0, 1, 2]
    assert len(set(seen[2])) == 20
    again = domain_balanced_batches(datasets, batch_per_domain=4, seed=0)
    assert all(torch.equal(b[0], next(again)[0]) for b in batches)
    other = domain_balanced_batches(datasets, batch_per_domain=4, seed=1)
    assert not all(torch.equal(b[0], next(other)[0]) for b in batches)


def test_domain_balanced_batches_worker_processes_give_the_same_batches(synthetic):
    split = multi_source_split(synthetic.datasets, targets=["sketch"])
    in_process = domain_balanced_batches(split.step1, batch_per_domain=3, seed=4)
    workers = domain_balanced_batches(split.step1, batch_per_domain=3, seed=4, num_workers=2)
    for _ in range(3):
        a, b = next(in_process), next(workers)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_domain_balanced_batches_on_split(synthetic):
    split = multi_source_split(synthetic.datasets, targets=["sketch"])
    x, y, d = next(domain_balanced_batches(split.step2, batch_per_domain=2, seed=0))
    assert x.shape == (6, 3, 16, 16) and d.tolist() == [0, 0, 1, 1, 2, 2]


def test_domain_balanced_batches_errors(pacs_root):
    with pytest.raises(ValueError, match="batch_per_domain"):
        domain_balanced_batches({"a": _Indexed(3, 0)}, batch_per_domain=0, seed=0)
    with pytest.raises(ValueError, match="domain 'b' has no samples"):
        domain_balanced_batches({"a": _Indexed(3, 0), "b": _Indexed(0, 1)}, batch_per_domain=1, seed=0)
    domains = _load_quiet(pacs_root, "PACS")  # no transform: PIL images
    with pytest.raises(TypeError, match="clip_transform"):
        next(domain_balanced_batches(domains, batch_per_domain=1, seed=0))


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------
def test_clip_transform():
    image = Image.new("RGB", (40, 30), (255, 128, 0))
    x = clip_transform(image_size=24)(image)
    assert x.shape == (3, 24, 24)
    expected = (torch.tensor([1.0, 128 / 255, 0.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[:, 12, 12], expected, atol=1e-5)
    kinds = lambda t: [type(s).__name__ for s in t.transforms]  # noqa: E731
    assert "RandomResizedCrop" in kinds(clip_transform(train=True)) and "RandomHorizontalFlip" in kinds(clip_transform(train=True))
    rrc = next(s for s in clip_transform(train=True).transforms if isinstance(s, T.RandomResizedCrop))
    assert rrc.scale == (0.7, 1.0) and rrc.size == (224, 224)
    assert "RandAugment" in kinds(clip_transform(randaugment=True)) and "CenterCrop" in kinds(clip_transform(randaugment=True))
    assert "RandAugment" not in kinds(clip_transform(train=True))
    tensor_in = torch.rand(3, 20, 20)  # float tensors in [0, 1] are accepted too
    for t in (clip_transform(16), clip_transform(16, train=True), clip_transform(16, randaugment=True)):
        assert t(tensor_in).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="image_size"):
        clip_transform(image_size=0)
