"""The digit classifier behind the generation-quality numbers, and the quality CLI."""

import numpy as np
import pytest
import torch

from pretrain.quality import check_digits, digit_classifier, digit_prompt, prompt_digit, score_digits


def real_digits():
    from sklearn.datasets import load_digits
    data = load_digits()
    return torch.from_numpy(data.images / 16.0).float()[:, None], data.target


def test_prompts_name_their_digit_and_a_prompt_without_one_is_refused():
    assert [prompt_digit(digit_prompt(d)) for d in range(10)] == list(range(10))
    assert prompt_digit("Digit Seven, not one") == 1  # the last digit word
    with pytest.raises(ValueError, match="names no digit"):
        prompt_digit("a cat")


def test_the_digit_scorer_refuses_up_front_what_it_could_not_judge():
    check_digits([digit_prompt(d) for d in range(10)], (1, 8, 8))
    with pytest.raises(ValueError, match="names no digit"):
        check_digits(["a handwritten digit four", "a cat"], (1, 8, 8))
    with pytest.raises(ValueError, match="3x16x16"):
        check_digits(["digit four"], (3, 16, 16))


def test_a_run_whose_eval_prompts_the_scorer_cannot_judge_stops_before_training(tiny_config, tmp_path):
    """Checked on every rank when the trainer is built, not on rank 0 at the first evaluation."""
    from data_pipelines.shards import load_manifest
    from model.config_system import ConfigError, load_config
    from pretrain.config import ExperimentConfig
    from pretrain.evaluation.in_loop import EvalSampler
    common = [f"run.dir={tmp_path}", "train.eval_interval=5", "train.sample_quality=digits"]
    cfg = load_config(ExperimentConfig, tiny_config, common)
    manifests = [load_manifest(d.path) for d in cfg.data.datasets]
    assert EvalSampler(cfg, manifests).enabled
    bad = load_config(ExperimentConfig, tiny_config, [*common, "train.sample_prompts=[a digit seven, a cat]"])
    with pytest.raises(ConfigError, match="sample_quality=digits: prompt 'a cat' names no digit"):
        EvalSampler(bad, manifests)


def test_the_classifier_reads_real_digits_and_not_noise():
    clf = digit_classifier()
    assert clf.holdout_accuracy > 0.97
    images, labels = real_digits()
    prompts = [digit_prompt(d) for d in range(10)]
    per = 20
    picked = torch.cat([images[np.flatnonzero(labels == d)[:per]] for d in range(10)])
    scores = score_digits(prompts, picked, per)
    assert scores["digit_accuracy"] > 0.95 and min(scores[f"digit_accuracy_{d}"] for d in range(10)) >= 0.85
    shuffled = score_digits(prompts[1:] + prompts[:1], picked, per)  # every sample asked as another digit
    assert shuffled["digit_accuracy"] < 0.1
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert score_digits(prompts, noise, per)["digit_accuracy"] < 0.3
    with pytest.raises(ValueError, match="8x8"):
        clf.predict(torch.zeros(2, 1, 16, 16))


def test_spread_tells_one_mode_and_copies_from_varied_new_digits():
    from pretrain.quality import digit_spread
    images, labels = real_digits()
    wanted = np.repeat(np.arange(10), 10)
    copies = torch.cat([images[np.flatnonzero(labels == d)[:1]].repeat(10, 1, 1, 1) for d in range(10)])
    s = digit_spread(copies, wanted)
    assert s["within_digit_distance"] == pytest.approx(0, abs=1e-3) and s["nearest_real_distance"] == pytest.approx(0, abs=1e-3)
    assert s["near_copy_share"] == 1.0
    varied = torch.cat([images[np.flatnonzero(labels == d)[-10:]] for d in range(10)])
    s = digit_spread(varied, wanted)
    assert s["within_digit_distance"] > 0.8 * s["real_within_digit_distance"]
    noised = (varied + 0.15 * torch.randn(varied.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert digit_spread(noised, wanted)["near_copy_share"] < 0.2  # new (here: disturbed) digits are not copies


def test_the_video_digit_scorer_reads_real_moving_digits_and_not_the_wrong_caption_or_blur():
    from data_pipelines.sources import moving_digits
    from pretrain.quality import check_video_digits, score_video_digits
    docs = list(moving_digits(num_samples=40, frames=6, canvas=16, max_digits=1, seed=3))
    videos = torch.from_numpy(np.stack([d[1]["video"] for d in docs])).permute(0, 4, 1, 2, 3)  # n,1,T,H,W
    captions = [d[0]["text"] for d in docs]
    real = score_video_digits(captions, videos, 1)
    assert real["video_digit_accuracy"] > 0.8 and real["video_jumps_over_limit"] == 0
    wrong = [c.replace(c.split()[1], "one" if c.split()[1] != "one" else "zero") for c in captions]
    assert score_video_digits(wrong, videos, 1)["video_digit_accuracy"] < 0.2
    torch.manual_seed(0)
    shuffled = torch.stack([v[:, torch.randperm(6)] for v in videos])  # frames out of order: the digit jumps
    assert score_video_digits(captions, shuffled, 1)["video_mean_jump"] > 1.5 * real["video_mean_jump"]
    with pytest.raises(ValueError, match="video_digits scorer: videos must be 1xTxHxW grey.*3x6x16x16"):
        check_video_digits(captions[:1], (3, 6, 16, 16))
