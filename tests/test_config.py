"""The config system: YAML + dotted overrides, strict keys and types, one-line errors."""
import dataclasses
import json

import pytest

from model.config_system import ConfigError, describe, load_config
from model.model_config import ModelConfig
from model.overfit import OverfitConfig


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides(tmp_path):
    path = write(tmp_path, "model:\n  dim: 64\n  n_heads: 4\nsteps: 10\n")
    cfg = load_config(OverfitConfig, path, ["model.dim=128", "lr=3e-4", "model.objective=flow"])
    assert cfg.model.dim == 128 and cfg.model.n_heads == 4 and cfg.steps == 10
    assert cfg.lr == pytest.approx(3e-4) and cfg.model.objective == "flow"


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "model:\n  dimm: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(OverfitConfig, path)
    msg = str(e.value)
    assert "model.dimm" in msg and str(path) in msg and "\n" not in msg


def test_unknown_override_names_key():
    with pytest.raises(ConfigError, match="model.nope"):
        load_config(OverfitConfig, None, ["model.nope=1"])


@pytest.mark.parametrize("override,key", [("steps=ten", "steps"), ("model.qk_norm=3", "model.qk_norm"),
                                          ("model.dim=1.5", "model.dim"), ("model.objective=score", "model.objective")])
def test_wrong_type_or_choice_names_key(tmp_path, override, key):
    path = write(tmp_path, "steps: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(OverfitConfig, path, [override])
    assert key in str(e.value) and str(path) in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nothere.yaml"):
        load_config(OverfitConfig, tmp_path / "nothere.yaml")


def test_every_knob_has_a_default_and_a_doc():
    lines = describe(OverfitConfig)
    assert any(line.startswith("model.dim = 256") for line in lines)
    for f in dataclasses.fields(ModelConfig):
        assert f.metadata.get("doc"), f.name


def test_round_trip_through_dict():
    cfg = ModelConfig(dim=96, n_heads=3, objective="flow")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides_index_into_lists(tmp_path):
    from pretrain.config import ExperimentConfig
    path = write(tmp_path, "data:\n  datasets:\n    - {path: a, weight: 0.5}\n    - {path: b}\n")
    cfg = load_config(ExperimentConfig, path, ["data.datasets.1.path=c", "data.datasets.0.weight=2"])
    assert [(d.path, d.weight) for d in cfg.data.datasets] == [("a", 2.0), ("c", 1.0)]
    with pytest.raises(ConfigError, match="index '5'"):
        load_config(ExperimentConfig, path, ["data.datasets.5.path=x"])


@pytest.mark.parametrize("override,key", [("train.stop_at=7", "stop_at"), ("train.sample_quality=fid", "sample_quality"),
                                          ("train.zero_stage=4", "zero_stage"), ("train.eval_interval=-1", "eval_interval"),
                                          ("train.eval_batches=-1", "eval_batches"), ("train.sample_steps=0", "sample_steps"),
                                          ("train.sample_cfg=-1", "sample_cfg")])
def test_experiment_values_out_of_range_name_their_key(override, key):
    from pretrain.config import ExperimentConfig
    with pytest.raises(ConfigError, match=key):
        load_config(ExperimentConfig, None, ["train.max_steps=5", override])


def test_a_retry_budget_longer_than_the_ranks_wait_is_refused():
    """A rank retrying a read holds the others in a collective: the budget must fit in the timeout."""
    from pretrain.config import ExperimentConfig
    assert load_config(ExperimentConfig, None, ["data.retry_budget=600"]).data.retry_budget == 600
    with pytest.raises(ConfigError, match=r"data.retry_budget \+ data.read_timeout \+ data.retry_backoff_max = 930 s"):
        load_config(ExperimentConfig, None, ["data.retry_budget=840"])


def test_datasets_are_named_by_their_folder_unless_named_and_a_name_is_used_once(tmp_path):
    from pretrain.config import ExperimentConfig
    path = write(tmp_path, "data:\n  datasets:\n    - {path: runs/data/digits/}\n    - {path: 'http://h/x/text'}\n"
                           "    - {path: 'pipe:curl -s http://h/laion/{shard}'}\n")
    cfg = load_config(ExperimentConfig, path, ["data.datasets.1.path=other/text2"])
    assert [d.name for d in cfg.data.datasets] == ["digits", "text2", "laion"]
    with pytest.raises(ConfigError, match="more than one is named 'digits'"):
        load_config(ExperimentConfig, path, ["data.datasets.1.path=elsewhere/digits"])
    cfg = load_config(ExperimentConfig, path, ["data.datasets.1.path=elsewhere/digits", "data.datasets.1.name=d2"])
    assert [d.name for d in cfg.data.datasets] == ["digits", "d2", "laion"]


def test_summary_prints_target_and_realised_shares_per_schedule_phase(tmp_path):
    """pretrain.summary reads the run's config from its latest checkpoint and the ledger from its metrics."""
    from pretrain.checkpoint import CONFIG_FILE, run_checkpoints, write_latest
    from pretrain.config import ExperimentConfig
    from pretrain.summary import summarize
    cfg = load_config(ExperimentConfig, None, [
        "data.datasets=[{path: a/digits, weight: 1}, {path: b/text, weight: 1}]",
        "data.schedule=[{step: 0, weights: {digits: 1}}, {step: 10, weights: {digits: 3}}]", "data.interpolate=false"])
    root = run_checkpoints(tmp_path)
    (root / "step_00000020").mkdir(parents=True)
    (root / "step_00000020" / CONFIG_FILE).write_text(json.dumps(cfg.to_dict()))
    write_latest(root, "step_00000020")
    records = [{"step": s, "loss": 1.0, "tokens_per_s": 1.0, "data/digits/tokens": d, "data/text/tokens": t}
               for s, d, t in ((5, 50, 50), (10, 100, 100), (15, 250, 150), (20, 400, 200))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = summarize(tmp_path)
    assert "data mixture (target / realised share):" in text
    assert "steps 0-10 (tokens): digits 0.500 / 0.500, text 0.500 / 0.500" in text, text
    assert "steps 10-20 (tokens): digits 0.750 / 0.750, text 0.250 / 0.250" in text, text
    # a restart at step 15 (its attempt had logged step 20 too) with a third dataset, its own weights,
    # by documents: each part of the run is judged by its own mixture
    from pretrain.metrics import MIXTURE, mixture_config
    edited = load_config(ExperimentConfig, None, [
        "data.datasets=[{path: a/digits, weight: 1}, {path: b/text, weight: 1}, {path: c/notes, weight: 2}]",
        "data.mix_by=documents"])
    more = [{"step": 15, MIXTURE: mixture_config(edited.data), "data/digits/documents": 10, "data/text/documents": 10,
             "data/notes/documents": 0},
            {"step": 25, "data/digits/documents": 20, "data/text/documents": 20, "data/notes/documents": 40}]
    records = [dict(r, **{f"data/{n}/documents": 10 for n in ("digits", "text")}) for r in records]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records + more))
    text = summarize(tmp_path)
    assert "steps 10-15 (tokens): digits 0.750 / 0.750, text 0.250 / 0.250" in text, text
    assert "steps 15-20" not in text and "steps 10-20" not in text, text
    assert "steps 15-25 (documents): digits 0.250 / 0.167, text 0.250 / 0.167, notes 0.500 / 0.667" in text, text


@pytest.mark.parametrize("override,what", [
    ("data.datasets.0.name='a b'", "must be letters"),
    ("data.schedule=[{step: 0, weights: {digits: 1, '0': 2}}]", "names dataset 0 a second time"),
    ("data.schedule=[{step: 0, weights: {digits: true}}]", "must be a number >= 0"),
    ("data.schedule=[{step: 5, weights: {digits: 1}}, {step: 5, weights: {digits: 2}}]", "increasing")])
def test_a_dataset_name_or_schedule_that_would_be_ambiguous_is_refused(tmp_path, override, what):
    from pretrain.config import ExperimentConfig
    path = write(tmp_path, "data:\n  datasets:\n    - {path: runs/data/digits}\n    - {path: runs/data/text}\n")
    with pytest.raises(ConfigError, match=what):
        load_config(ExperimentConfig, path, [override])
