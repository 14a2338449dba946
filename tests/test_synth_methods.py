"""Synthesis methods and judges on small real data: shapes and labels, the fitted policy moves the
statistics toward its domain, and bad batches (label-destroying noise, wrong-domain style) are caught."""
import numpy as np
import pytest
from PIL import Image

from mdcore.data.builtin import BuiltinSpec, materialize
from mdcore.data.imstats import STAT_NAMES, image_stats
from mdcore.synth.policy import apply_policy, fit_policy
from mdcore.synth.realism import DomainJudge, LabelJudge, StyleSpace, judge_batch
from mdcore.synth.fourier import fourier_style_transfer, radial_amplitude_profile, split_by_shares, stats_transfer


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """{domain: (uint8 N,32,32,3, labels)} of a 600-digit built-in tree."""
    root = tmp_path_factory.mktemp("synth") / "tree"
    materialize(root, seed=0, spec=BuiltinSpec(limit=600))
    out = {}
    for d in ("clean", "ink", "phone"):
        files = sorted((root / d).glob("*/*.png"))
        out[d] = (np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]),
                  np.array([f.parent.name for f in files]))
    return out


@pytest.fixture(scope="module")
def judges(digits):
    # train on every other image of each domain, keep the rest for checks
    x = np.concatenate([digits[d][0][::2] for d in digits])
    labels = np.concatenate([digits[d][1][::2] for d in digits])
    domains = np.concatenate([[d] * len(digits[d][0][::2]) for d in digits])
    return DomainJudge.fit(x, domains), LabelJudge.fit(x, labels), StyleSpace.fit(x)


def test_style_transfers_keep_shape_and_dtype(digits):
    content, style = digits["clean"][0][0], digits["phone"][0][0]
    profile = radial_amplitude_profile(digits["phone"][0])
    for out in (fourier_style_transfer(content, style, 0.05), fourier_style_transfer(content, style, 0.05, profile),
                stats_transfer(content, style)):
        assert out.shape == content.shape and out.dtype == np.uint8
    # same content and style: the amplitude swap changes nothing
    assert np.abs(fourier_style_transfer(content, content, 0.1).astype(int) - content).max() <= 1
    assert split_by_shares(7, {"fourier": 0.5, "augment": 0.5}) == {"fourier": 4, "augment": 3}
    assert split_by_shares(0, {"fourier": 1.0}) == {"fourier": 0}


def test_fitted_policy_moves_statistics_toward_the_domain(digits):
    phone, phone_labels = digits["phone"]
    clean, clean_labels = digits["clean"]
    policy = fit_policy("phone", phone, phone_labels, clean, clean_labels)
    assert 8 < policy.rotation_std < 30  # phone digits are rotated uniformly in +-30 degrees (std 17)
    rng = np.random.default_rng(0)
    outs = [apply_policy(img, policy, rng) for img in clean[:80]]
    augmented = np.stack([o[0] for o in outs])
    assert augmented.shape == clean[:80].shape and augmented.dtype == np.uint8
    assert {"angle", "blur", "brightness", "contrast", "noise", "gradient", "tint"} <= set(outs[0][1])
    target, before, after = (image_stats(x).mean(axis=0) for x in (phone, clean[:80], augmented))
    scale = image_stats(np.concatenate([phone, clean])).std(axis=0) + 1e-6
    for i, name in enumerate(STAT_NAMES):
        if abs(before[i] - target[i]) / scale[i] > 0.5:  # a statistic that differs between the domains...
            assert abs(after[i] - target[i]) < 0.5 * abs(before[i] - target[i]), name  # ...moves most of the way
    assert np.linalg.norm((after - target) / scale) < 0.3 * np.linalg.norm((before - target) / scale)


def test_good_batches_pass_and_bad_batches_are_rejected(digits, judges):
    domain_judge, label_judge, style = judges
    phone, phone_labels = digits["phone"]
    clean, clean_labels = digits["clean"][0][1::2], digits["clean"][1][1::2]  # not seen by the judges
    real_agreement = label_judge.agreement(phone[1::2], phone_labels[1::2])
    assert real_agreement > 0.55
    policy = fit_policy("phone", phone[::2], phone_labels[::2], digits["clean"][0][::2], digits["clean"][1][::2])
    rng = np.random.default_rng(1)
    good = np.stack([apply_policy(img, policy, rng)[0] for img in clean[:60]])
    profile = radial_amplitude_profile(phone[::2])
    fourier = np.stack([fourier_style_transfer(img, phone[i % 8 * 2], 0.05, profile)
                        for i, img in enumerate(clean[:60])])
    noise = np.clip(0.15 * clean[:60] + rng.normal(150, 60, clean[:60].shape), 0, 255).astype(np.uint8)
    labels = clean_labels[:60]

    def verdict(batch):
        return judge_batch(domain_judge.share(batch, "phone"), label_judge.agreement(batch, labels), real_agreement,
                           min_realism=0.5, min_agreement_ratio=0.7)

    assert verdict(good).accepted and verdict(fourier).accepted
    wrong_style = verdict(clean[:60])  # untouched clean scans labelled as phone images
    assert not wrong_style.accepted and "realism" in wrong_style.reasons[0]
    destroyed = verdict(noise)  # label-destroying noise
    assert not destroyed.accepted and any("label agreement" in r for r in destroyed.reasons)
    # the style distance agrees: the transfers are closer to real phone images than their content
    assert style.distance(good, phone) < style.distance(clean[:60], phone)
    assert style.distance(fourier, phone) < style.distance(clean[:60], phone)
