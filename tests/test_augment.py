"""Augmented views (issue 16): each sample's view depends on (seed, sample, epoch) alone; crop, flip,
mixup and cutmix do what they say; mixed labels are a proper soft target; teacher and student get
the same tensors in a step; a run resumed after an augmented epoch ends with the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from distill import Distiller, DistillError, HardLabelCE, SoftTargetKD
from distill.cache import CachedTeacher
from distill.core.losses.response import hard_label_ce
from distill.pipeline.config import TrainSpec, load_config, parse_config
from distill.pipeline.experiment import cache_teacher, obtain_teacher, run_experiment
from distill.tasks.augment import AugmentSpec, ImageAugment
from distill.tasks.image_data import DataSpec, load_data
from distill.tasks.models import MLP, MLPSpec
from distill.train.loop import train

from conftest import tiny_config


def images(n: int = 40, size: int = 6) -> torch.Tensor:
    return torch.randn(n, 2, size, size, generator=torch.Generator().manual_seed(0))


def test_a_view_depends_on_seed_sample_and_epoch_not_on_its_batch():
    x = images()
    augment = ImageAugment(AugmentSpec(crop=2, flip=True, mixup=0.4, cutmix=1.0), seed=3)
    whole, mix = augment(x[:10], torch.arange(10), 5, x)
    alone, mix_alone = augment(x[7:8], torch.tensor([7]), 5, x)
    assert torch.equal(whole[7:8], alone)
    assert torch.equal(mix.partner[7:8], mix_alone.partner) and torch.equal(mix.share[7:8], mix_alone.share)
    again, _ = augment(x[:10], torch.arange(10), 5, x)
    assert torch.equal(whole, again)
    assert not torch.equal(whole, augment(x[:10], torch.arange(10), 6, x)[0])  # another epoch, other views
    other_seed = ImageAugment(AugmentSpec(crop=2, flip=True, mixup=0.4, cutmix=1.0), seed=4)
    assert not torch.equal(whole, other_seed(x[:10], torch.arange(10), 5, x)[0])


def test_crop_is_a_shift_within_the_padding_with_mean_fill():
    x, pad = images(), 2
    views, mix = ImageAugment(AugmentSpec(crop=pad), seed=0)(x, torch.arange(len(x)), 0, x)
    assert mix is None and views.shape == x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = set()
    for i in range(len(x)):
        found = [
            (top, left)
            for top in range(2 * pad + 1)
            for left in range(2 * pad + 1)
            if torch.equal(views[i], padded[i, :, top : top + 6, left : left + 6])
        ]
        assert found, f"sample {i}'s view is no crop of its padded image"
        offsets.add(found[0])
    assert len(offsets) > 10  # the offsets vary over 25 possibilities


def test_flip_mirrors_about_half_of_the_images():
    x = images(200)
    views, _ = ImageAugment(AugmentSpec(flip=True), seed=0)(x, torch.arange(len(x)), 0, x)
    flipped = [torch.equal(v, xi.flip(-1)) for v, xi in zip(views, x, strict=True)]
    kept = [torch.equal(v, xi) for v, xi in zip(views, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 80 <= sum(flipped) <= 120


def test_mixup_blends_with_the_partner_by_its_share():
    x = images()
    views, mix = ImageAugment(AugmentSpec(mixup=0.5), seed=1)(x[:20], torch.arange(20), 2, x)
    assert ((mix.share >= 0) & (mix.share <= 1)).all() and mix.share.std() > 0.1
    expected = mix.share.view(-1, 1, 1, 1) * x[:20] + (1 - mix.share.view(-1, 1, 1, 1)) * x[mix.partner]
    torch.testing.assert_close(views, expected)


def test_cutmix_pastes_a_box_whose_area_is_one_minus_the_share():
    x = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1).expand(40, 1, 8, 8).contiguous()  # one value each
    views, mix = ImageAugment(AugmentSpec(cutmix=1.0), seed=2)(x, torch.arange(40), 0, x)
    for i in range(40):
        own = (views[i] == i).float().mean()
        from_partner = (views[i] == float(mix.partner[i])).float().mean()
        if int(mix.partner[i]) != i:
            assert float(own + from_partner) == 1.0
            assert float(own) == pytest.approx(float(mix.share[i]))
    assert (mix.share < 1).sum() > 20


def test_mixed_labels_are_a_soft_target_that_sums_to_one():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels, partner = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([1, 1, 0, 2, 3, 0])
    share = torch.tensor([0.3, 1.0, 0.5, 0.9, 0.0, 0.7])
    target = share[:, None] * F.one_hot(labels, 4) + (1 - share[:, None]) * F.one_hot(partner, 4)
    torch.testing.assert_close(target.sum(-1), torch.ones(6))
    reference = F.cross_entropy(logits, target)  # cross-entropy with probabilities
    torch.testing.assert_close(hard_label_ce(logits, labels, mix=(partner, share)), reference)
    # an unlabeled partner: that row leaves the mean unless the row was not mixed
    partner[0], partner[1] = -1, -1
    keep = torch.tensor([False, True, True, True, True, True])
    torch.testing.assert_close(
        hard_label_ce(logits, labels, mix=(partner, share)), F.cross_entropy(logits[keep], target[keep])
    )
    assert HardLabelCE().rows(_batch(labels, partner, share)) == 5


def _batch(labels, partner, share):
    from distill.core.losses import Batch

    return Batch(None, labels, None, (partner, share))


class Recorder(nn.Module):
    """A model that remembers the inputs of its training-mode calls (a teacher: of all its calls)."""

    def __init__(self, model: nn.Module, always: bool = False) -> None:
        super().__init__()
        self.model, self.seen, self.always = model, [], always

    def forward(self, x):
        if self.training or self.always:
            self.seen.append(x.detach().clone())
        return self.model(x)


def digits(limit: int = 96):
    return load_data(DataSpec(source="digits", limit_train=limit))


def test_teacher_and_student_see_the_same_augmented_tensors_every_step():
    data = digits()
    torch.manual_seed(0)
    teacher = Recorder(MLP((1, 8, 8), 10, MLPSpec(hidden=[16])), always=True).eval()
    student = Recorder(MLP((1, 8, 8), 10, MLPSpec(hidden=[8])))
    distiller = Distiller(student, teacher, {"kd": SoftTargetKD(2.0), "ce": HardLabelCE()})
    augment = ImageAugment(AugmentSpec(crop=1, flip=True, mixup=0.3), seed=0)
    train(distiller, data, TrainSpec(epochs=2, batch_size=32), remember_teacher=True, augment=augment)
    steps = 2 * 3
    teacher_steps = [t for t in teacher.seen if len(t) == 32]
    student_steps = [s for s in student.seen if len(s) == 32]
    assert len(teacher_steps) == steps  # the teacher ran every step: never remembered under augmentation
    for seen_by_teacher, seen_by_student in zip(teacher_steps, student_steps, strict=True):
        assert torch.equal(seen_by_teacher, seen_by_student)
    assert not any(torch.equal(s, data.train.x[: len(s)]) for s in student_steps)


def test_a_run_resumed_after_an_augmented_epoch_ends_with_the_same_weights(tmp_path):
    data = digits()
    spec = TrainSpec(epochs=3, batch_size=32)
    augment = AugmentSpec(crop=1, flip=True, cutmix=1.0)

    def distiller():
        torch.manual_seed(0)
        teacher = MLP((1, 8, 8), 10, MLPSpec(hidden=[16])).eval()
        return Distiller(MLP((1, 8, 8), 10, MLPSpec(hidden=[8], dropout=0.2)), teacher, {"kd": SoftTargetKD(2.0)})

    whole = distiller()
    train(whole, data, spec, checkpoint=tmp_path / "a.pt", seed=1, augment=ImageAugment(augment, 1))

    class Stop(Exception):
        pass

    def stop_after_first(log):
        if log.epoch == 1:
            raise Stop

    broken = distiller()
    with pytest.raises(Stop):
        train(
            broken, data, spec, checkpoint=tmp_path / "b.pt", seed=1, augment=ImageAugment(augment, 1),
            on_epoch_end=stop_after_first,
        )  # fmt: skip
    resumed = distiller()
    train(resumed, data, spec, checkpoint=tmp_path / "b.pt", resume=True, seed=1, augment=ImageAugment(augment, 1))
    for key, value in whole.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key


def test_a_cached_teacher_needs_a_fixed_number_of_views(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "data: {source: digits, augment: {flip: true}}\nteacher: {kind: cache, path: nowhere}\nstudent: {arch: mlp}\n"
    )
    with pytest.raises(DistillError, match="set data.augment.epochs"):
        load_config(tmp_path / "c.yaml")


VIEWS = {"crop": 1, "flip": True, "mixup": 0.3, "cutmix": 1.0, "epochs": 2, "seed": 5}


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory):
    """A teacher trained on digits and the float32 cache of all 10 classes on 2 views of each image."""
    tmp = tmp_path_factory.mktemp("views")
    config = parse_config(tiny_config(tmp, **{"data.augment": VIEWS, "cache.k": 10, "cache.dtype": "float32"}))
    path = cache_teacher(config, console=Console(quiet=True), cache_dir=tmp / "cache")
    data = load_data(config.data)
    teacher, _, _ = obtain_teacher(config, data, "cpu", Console(quiet=True), tmp / "cache")
    return tmp, path, data, teacher


def test_the_cache_of_views_holds_the_live_teachers_outputs_on_each_view(views_cache):
    _, path, data, teacher = views_cache
    cache = CachedTeacher(path)
    n = len(data.train)
    assert cache.views == {"augment": {k: VIEWS[k] for k in ("crop", "flip", "mixup", "cutmix")}, "seed": 5, "count": 2}
    assert cache.manifest["splits"]["views"]["samples"] == 2 * n
    augment = ImageAugment(AugmentSpec(**VIEWS), seed=0)  # the views' own seed (5) wins over the run's
    index = torch.tensor([0, 3, 700, n - 1])
    for epoch in (0, 1, 2, 7):  # epoch e shows view e mod 2
        x, _ = augment(data.train.x[index], index, epoch, data.train.x)
        with torch.no_grad():
            live = torch.log_softmax(teacher.eval()(x), -1)
        cached = cache.lookup(augment.view_rows(index, epoch, n), split="views").logits.to_dense()
        torch.testing.assert_close(torch.log_softmax(cached, -1), live, atol=1e-5, rtol=1e-5)
    plain = cache.lookup(index).logits.to_dense()  # the plain images are still there
    with torch.no_grad():
        torch.testing.assert_close(
            torch.log_softmax(plain, -1), torch.log_softmax(teacher(data.train.x[index]), -1), atol=1e-5, rtol=1e-5
        )


def test_students_taught_from_cached_views_match_students_taught_live(views_cache):
    tmp, path, _, _ = views_cache
    common = {"data.augment": VIEWS, "baseline": False, "distill": {"terms": [{"type": "kd", "temperature": 1.0}]}}
    live = run_experiment(
        parse_config(tiny_config(tmp, **common, **{"output.name": "live"})), console=Console(quiet=True)
    )
    cached_config = tiny_config(
        tmp, **common, **{"output.name": "cached", "teacher": {"kind": "cache", "path": str(path)}}
    )
    cached = run_experiment(parse_config(cached_config), console=Console(quiet=True))
    a = load_file(str(live.run_dir / "student.safetensors"))
    b = load_file(str(cached.run_dir / "student.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    history = [e["loss"] for e in cached.metrics["training"]["distilled"]["history"]]
    assert history == pytest.approx([e["loss"] for e in live.metrics["training"]["distilled"]["history"]], rel=1e-4)


def test_a_cache_of_other_views_is_refused(views_cache):
    tmp, path, _, _ = views_cache
    teacher = {"kind": "cache", "path": str(path)}
    for change, field in (
        ({"crop": 2}, "data.augment"),
        ({"seed": 6}, "data.augment.seed"),
        ({"epochs": 3}, "data.augment.epochs"),
    ):
        config = parse_config(tiny_config(tmp, **{"data.augment": {**VIEWS, **change}, "teacher": teacher}))
        with pytest.raises(DistillError, match=f"^{field}: cache .* holds views made with"):
            run_experiment(config, console=Console(quiet=True))
    plain = parse_config(tiny_config(tmp, **{"cache.path": str(tmp / "plain-cache")}))
    plain_cache = cache_teacher(plain, console=Console(quiet=True), cache_dir=tmp / "cache")
    config = parse_config(
        tiny_config(tmp, **{"data.augment": VIEWS, "teacher": {"kind": "cache", "path": str(plain_cache)}})
    )
    with pytest.raises(DistillError, match="holds the teacher on the plain images only"):
        run_experiment(config, console=Console(quiet=True))
    without_count = parse_config(tiny_config(tmp, **{"data.augment": {**VIEWS, "epochs": None}}))
    with pytest.raises(DistillError, match="data.augment.epochs: set how many views"):
        cache_teacher(without_count, console=Console(quiet=True), cache_dir=tmp / "cache")


def test_augmentation_settings_are_checked(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "data: {source: digits, augment: {crop: -1}}\nteacher: {kind: train, model: {arch: mlp}}\nstudent: {arch: mlp}\n"
    )
    with pytest.raises(DistillError, match="data.augment.crop"):
        load_config(tmp_path / "c.yaml")


def test_a_teacher_trained_on_augmented_views_is_its_own_cached_teacher(tmp_path):
    plain = parse_config(tiny_config(tmp_path))
    data = load_data(plain.data)
    teachers = {}
    for name, augment in (("plain", None), ("augmented", {"crop": 1, "flip": True})):
        config = parse_config(tiny_config(tmp_path, **{"teacher.augment": augment}))
        model, path, result = obtain_teacher(config, data, "cpu", Console(quiet=True), tmp_path / "cache")
        again, again_path, _ = obtain_teacher(config, data, "cpu", Console(quiet=True), tmp_path / "cache")
        assert again_path == path and result is not None  # trained once, then reused from the cache
        teachers[name] = (path, load_file(str(path)))
        for key, value in teachers[name][1].items():
            assert torch.equal(again.state_dict()[key].contiguous(), value)
    assert teachers["plain"][0] != teachers["augmented"][0]
    differ = [not torch.equal(teachers["plain"][1][k], teachers["augmented"][1][k]) for k in teachers["plain"][1]]
    assert any(differ)  # the views changed what the teacher learned
    text = {"task": "text_classification", "data": {"source": "csv", "path": "x.csv"}}
    with pytest.raises(DistillError, match="teacher.augment: augmentation is for image data"):
        parse_config(tiny_config(tmp_path, **text, **{"teacher.augment": {"crop": 1}}))
