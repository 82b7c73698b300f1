"""Trainer parts that need no process group: configs, schedules, activation checkpointing, how a rank
process ends."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config_system import load_config
from model.transformer import UnifiedTransformer
from pretrain.config import ExperimentConfig, TrainConfig
from pretrain.ema import decay_at
from pretrain.engine import param_groups
from pretrain.metrics import batch_flops, loss_record
from pretrain.schedule import lr_factor
from tests.launch import REPO, env
from tests.test_model import packed_mixed_batch, randomize, tiny

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
EXPECTED_PARAMS = {"monoformer-1b": (1.0e9, 1.2e9), "acdit-xl": (0.6e9, 0.8e9)}


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name != "overfit-tiny.yaml"], ids=lambda p: p.stem)
def test_every_experiment_config_loads_and_builds(path):
    cfg = load_config(ExperimentConfig, path)
    with torch.device("meta"):
        model = UnifiedTransformer(cfg.model)
    n = model.num_params()
    lo, hi = EXPECTED_PARAMS.get(path.stem, (1e5, 1e8))
    assert lo <= n <= hi, f"{path.stem}: {n / 1e6:.0f}M parameters"


def test_cosine_and_wsd_schedules():
    cos = TrainConfig(max_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cos) == pytest.approx(0.1) and lr_factor(9, cos) == pytest.approx(1.0)
    assert lr_factor(55, cos) == pytest.approx(0.55) and lr_factor(100, cos) == pytest.approx(0.1)
    wsd = TrainConfig(max_steps=100, warmup_steps=10, schedule="wsd", wsd_decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, wsd) == 1.0 and lr_factor(79, wsd) == 1.0
    assert lr_factor(90, wsd) == pytest.approx(0.5) and lr_factor(100, wsd) == pytest.approx(0.0)


def test_ema_warmup_forgets_the_initialisation_early():
    import math
    init_weight = {w: math.prod(decay_at(n, 0.9999, w) for n in range(100)) for w in (True, False)}
    assert init_weight[True] < 1e-6 and init_weight[False] > 0.99  # share of the init after 100 steps
    assert decay_at(0, 0.9999) == pytest.approx(0.1) and decay_at(10 ** 6, 0.9999) == 0.9999


def test_flops_count_each_parameter_for_the_tokens_that_use_it():
    from model.layout import LayoutSpec, TextSegment, layout_document, pack_rows
    from model.synthetic import synthetic_batch
    cfg = tiny()
    model = UnifiedTransformer(cfg)
    use = model.params_by_use()
    assert sum(use.values()) + model.tok_emb.weight.numel() == sum(p.numel() for p in model.parameters())
    spec = LayoutSpec.from_model_config(cfg)
    text = pack_rows([[layout_document([TextSegment(list(range(10, 30)))], spec)]], 30)  # 20 tokens + 10 padding
    causal_pairs = 20 * 21 // 2
    assert batch_flops(cfg, use, text) == 6 * (use["every"] * 20 + use["text"] * 19) + \
        12 * cfg.n_layers * cfg.dim * causal_pairs
    image = synthetic_batch(cfg, 1, 0, 4)  # one latent, no text target: the LM head's size does not count
    assert not image.text_loss.any() and batch_flops(cfg, use, image) == batch_flops(cfg, dict(use, text=10 ** 9), image)
    assert batch_flops(cfg, use, text) == batch_flops(cfg, dict(use, latent=10 ** 9), text)


def test_weight_decay_reaches_linear_weights_only():
    model = UnifiedTransformer(tiny())
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert {"lm_head.weight", "blocks.0.attn.wq.weight", "blocks.0.ffn.w2.weight", "ada.weight",
            "latent_in.weight", "time_embed.mlp.0.weight"} <= decayed
    assert not decayed & {"tok_emb.weight", "blocks.0.ada_table", "blocks.0.attn_norm.weight", "ada.bias",
                          "norm.weight"}


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = tiny()
    torch.manual_seed(0)
    model = randomize(UnifiedTransformer(cfg)).train()
    batch = packed_mixed_batch(cfg)
    grads = []
    for on in (False, True):
        model.activation_checkpointing = on
        model.zero_grad()
        loss = model.loss(batch, torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_logged_losses_are_token_weighted_and_an_absent_modality_is_absent():
    cfg = tiny(lm_weight=0.5)
    # two windows' sums over ranks: 300 text targets with a CE sum of 600, no latent token
    assert loss_record([600.0, 0.0], [300, 0], cfg) == {"loss": 1.0, "lm_loss": 2.0}
    # a micro-batch mean of 4.0 over 10 tokens and of 1.0 over 990 tokens is 1.03, not their mean 2.5
    record = loss_record([40.0 + 990.0, 25.0], [1000, 50], cfg, prefix="eval/")
    assert record == {"eval/loss": pytest.approx(0.5 * 1.03 + 0.5), "eval/lm_loss": pytest.approx(1.03),
                      "eval/diffusion_loss": 0.5}
    assert loss_record([0.0, 0.0], [0, 0], cfg) == {}


EXITING = """
import atexit, ctypes, os, sys, threading, time

class Teardown:
    def __del__(self):
        os.write(2, b"teardown")

sys.modules["probe"] = type(sys)("probe")
sys.modules["probe"].kept = Teardown()  # a module's global: deleted in the interpreter's teardown
log = open(os.environ["EXIT_LOG"], "a")
atexit.register(lambda: log.write("atexit\\n"))

def main():
    threading.Thread(target=lambda: (time.sleep(0.5), log.write("thread\\n"))).start()
    print("py")  # to a pipe: block-buffered, lost unless flushed
    ctypes.CDLL(None).printf(b"c\\n")  # C stdio: likewise
    {body}
"""


@pytest.mark.parametrize("body,status,error", [("return 3", (3, 0), ""), ("sys.exit(-1)", (255, 255), ""),
                                               ("sys.exit('error: bad input')", (1, 1), "error: bad input"),
                                               ("raise RuntimeError('boom')", (1, 1), "RuntimeError: boom")])
@pytest.mark.parametrize("launch", ["run_and_exit", "slurm.boot"])
def test_a_rank_process_ends_as_a_normal_exit_would_without_the_teardown(tmp_path, launch, body, status, error):
    """How pretrain.train, slurm.task and submitit tasks (through slurm.boot, which runs submitit's
    module, whose requeue exits -1) end: the teardown, where gloo's threads can abort a finished rank,
    is skipped; the status, traceback, joined threads, atexit handlers and flushed output are as with
    a normal exit."""
    code = EXITING.replace("{body}", body)
    if launch == "run_and_exit":
        cmd = [sys.executable, "-c", code + "from pretrain.process import run_and_exit\nrun_and_exit(main)\n"]
    else:  # submitit's module raises or returns; slurm.boot ends the process
        (tmp_path / "exiting.py").write_text(code + "main()\n")
        cmd = [sys.executable, "-m", "slurm.boot", "-u", "-m", "exiting"]
    e = env(EXIT_LOG=str(tmp_path / "log"))
    e["PYTHONPATH"] += os.pathsep + str(tmp_path)
    e.pop("PYTHONUNBUFFERED", None)
    r = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == status[launch == "slurm.boot"], r.stderr
    assert sorted(r.stdout.splitlines()) == ["c", "py"]  # two buffers: either may be flushed first
    assert (tmp_path / "log").read_text() == "thread\natexit\n"
    assert "teardown" not in r.stderr
    assert (r.stderr.strip().splitlines() or [""])[-1] == error
