"""Plan a run: what the config's model and state weigh on a cluster, before launching it.

    python -m pretrain.plan --config configs/monoformer-1b.yaml --nodes 4 --gpus-per-node 8 --gpu h100
    python -m pretrain.plan --config configs/tiny-cpu.yaml --gpus-per-node 2 --gpu cpu --json

Prints the parameters (total, by the tokens that use them), the memory per device at the step's peak
at ZeRO-1/2/3 (working weights, gradients, fp32 master weights and Adam moments, the EMA, DeepSpeed's
buffers, one micro-batch's activations; pretrain/plan/memory.py), the activations of each attention
back-end with and without checkpointing, a checkpoint's bytes on disk and its write time at --write-gbps, the shards each dataset needs for
ranks x workers x data.shards_in_flight against those its manifest lists, the loader state's size,
and verdict lines naming the knob to change.
"""
from __future__ import annotations

import argparse
import json
import sys

from pretrain.plan.compute import CPU_MFU, GPU_MFU, micro_batch_flops, sampled_batches, timing
from pretrain.plan.devices import GB, GPUS, device
from data_pipelines.loader_state import state_bytes
from pretrain.plan.memory import activation_key, activations, batch_shape, fit_fix, peak_per_device
from pretrain.plan.sizes import checkpoint_bytes, count_parameters
from model.attention import resolve_backend


def plan(cfg, nodes: int, per_node: int, gpu: str, write_gbps: float, memory_gb: float = 0.0,
         mfu: float = 0.0, latent_share: float = 0.5, headroom: float = -1.0) -> dict:
    """The plan as a JSON-able dict (see the module doc). `headroom`: the share of a device's memory
    kept free (-1: 0.1 on a GPU for the CUDA context, NCCL and the allocator's fragmentation; 0 on the CPU)."""
    dev = device(gpu, per_node, memory_gb)
    devices = nodes * per_node
    precision = dev.precision if cfg.train.precision == "auto" else cfg.train.precision
    params = count_parameters(cfg.model)
    batches, source, oversize = sampled_batches(cfg)
    backend = resolve_backend(cfg.model.attention, "cpu" if dev.name == "cpu" else "cuda")
    acts = activations(cfg, batch_shape(cfg, batches, latent_share), precision)
    ckpt_on, ema, stage = cfg.train.activation_checkpointing, cfg.train.ema_decay > 0, cfg.train.zero_stage
    headroom = headroom if headroom >= 0 else (0.0 if dev.name == "cpu" else 0.1)

    def peak_at(n, checkpointing=ckpt_on):
        return peak_per_device(params, n, precision, acts[activation_key(backend, checkpointing)], ema,
                               on_cpu=dev.name == "cpu")
    memory = peak_at(devices)
    usable = dev.memory * (1 - headroom)
    fits = memory[str(stage)]["total"] <= usable
    fix = None if fits else fit_fix(lambda n, s, c: peak_at(n, c)[str(s)]["total"], devices, per_node, stage,
                                    ckpt_on, usable)
    slots = devices * max(1, cfg.data.num_workers)
    data_state = state_bytes(slots, len(cfg.data.datasets), cfg.data.pack_buffer)
    ckpt = checkpoint_bytes(params, cfg.train.zero_stage, precision, devices,
                            data_state + len(json.dumps(cfg.to_dict())))
    if not ema:
        ckpt.pop("ema")
    shards = [_shards(d.path, d.name, slots, cfg.data) for d in cfg.data.datasets]
    mfu = mfu or (CPU_MFU if dev.name == "cpu" else GPU_MFU)
    compute = timing(cfg, micro_batch_flops(cfg, params.by_use, batches, latent_share), devices, dev.peak, mfu,
                     batches)
    compute.update(mfu=mfu, peak=dev.peak, flops_from=source if batches else
                   f"stated: {latent_share:.0%} latent tokens, full rows of one document (shards: {source})")
    return {"compute": compute, "oversize": oversize, "write_gbps": write_gbps, "devices": devices, "device": dev.name, "device_memory": dev.memory, "precision": precision,
            "zero_stage": stage, "parameters": params.total, "embedding": params.embedding,
            "parameters_by_use": params.by_use, "largest_layer": params.largest_layer,
            "memory": memory, "activations": acts, "attention": backend, "headroom": headroom,
            "usable_memory": usable, "fits": fits, "fix": fix,
            "activation_checkpointing": ckpt_on, "checkpoint_bytes": ckpt,
            "checkpoint_total": sum(ckpt.values()), "checkpoint_write_s": sum(ckpt.values()) / (write_gbps * GB),
            "loader_state_bytes": data_state, "slots": slots, "shards": shards}


def _shards(path: str, name: str, slots: int, data) -> dict:
    """Shards wanted (slots x data.shards_in_flight) and listed; each slot's share of an epoch (max / min
    samples)."""
    from data_pipelines.order import DatasetOrder
    from data_pipelines.shards import load_manifest
    from pretrain.plan.deal import slot_samples
    in_flight = data.shards_in_flight
    wanted = slots * in_flight
    try:
        manifest = load_manifest(path)
    except (OSError, ValueError) as e:
        return {"name": name, "wanted": wanted, "have": None, "why": str(e).splitlines()[0][:200]}
    share = slot_samples(DatasetOrder(manifest.shard_sizes, data.seed, data.shuffle), slots, in_flight)
    return {"name": name, "wanted": wanted, "have": len(manifest.shards),
            "share_max_min": float(share.max() / share.min()) if share.min() else None}


def _fix_text(p: dict) -> str:
    fix, stage, ckpt = p["fix"], p["zero_stage"], p["activation_checkpointing"]
    if not fix:
        return ("no ZeRO stage, number of devices or activation checkpointing fits: lower "
                "train.micro_batch_size or data.seq_len, or use a device with more memory")
    knobs = [f"train.zero_stage={fix['stage']}"] if fix["stage"] != stage else []
    if fix["checkpointing"] and not ckpt:
        knobs.insert(0, "train.activation_checkpointing=true")
    if "devices" in fix:
        return f"add devices: {fix['devices']} (--nodes {fix['nodes']}) fit" + (f" with {' and '.join(knobs)}"
                                                                              if knobs else "")
    return "use " + " and ".join(knobs)


def verdicts(p: dict) -> list[str]:
    """One line per problem, naming the knob to change."""
    lines = []
    if p["oversize"]:
        lines.append(f"documents longer than data.seq_len: {p['oversize']} skipped in the first packed batches "
                     "(an image or video with its caption does not fit a row): raise data.seq_len")
    m = p["memory"][str(p["zero_stage"])]
    if not p["fits"]:
        lines.append(f"does not fit: ZeRO-{p['zero_stage']} needs {m['total'] / GB:.1f} GB per device at the step's "
                     f"peak (model states and buffers {(m['total'] - m['activations']) / GB:.1f}, activations "
                     f"{m['activations'] / GB:.1f}), a {p['device']} has {p['usable_memory'] / GB:.1f} GB usable; "
                     + _fix_text(p))
    for s in p["shards"]:
        if s["have"] is not None and s["have"] < s["wanted"]:
            lines.append(f"too few shards: {s['name']} has {s['have']}, {p['slots']} slots x data.shards_in_flight "
                         f"want {s['wanted']} (each shard is then read by several slots): write more shards "
                         "(write_shards --samples-per-shard smaller) or lower data.shards_in_flight or data.num_workers")
    return lines


def render(p: dict) -> str:
    by_use = p["parameters_by_use"]
    lines = [f"plan: {p['devices']} x {p['device']} ({p['device_memory'] / GB:.0f} GB each, "
             f"{p['usable_memory'] / GB:.1f} usable: --headroom {p['headroom']:.2f}), {p['precision']}, ZeRO-{p['zero_stage']}",
             f"parameters: {p['parameters']:,} (embedding {p['embedding']:,}; used at every token {by_use['every']:,}, "
             f"at text targets {by_use['text']:,}, at latent tokens {by_use['latent']:,})",
             f"memory per device at the step's peak, GB ({p['attention']} attention, activation checkpointing "
             f"{'on' if p['activation_checkpointing'] else 'off'}):"]
    for stage, parts in p["memory"].items():
        mark = "  <- configured" if stage == str(p["zero_stage"]) else ""
        lines.append(f"  ZeRO-{stage}: {parts['total'] / GB:8.2f} (" + ", ".join(
            f"{k} {v / GB:.2f}" for k, v in parts.items() if k != "total") + f"){mark}")
    a = p["activations"]
    lines.append("activations of one micro-batch, GB: " + ", ".join(
        f"{k} {a[k] / GB:.2f}" for k in ("sdpa", "sdpa checkpointed", "flex", "flex checkpointed")) +
        f" (the sdpa mask {a['sdpa mask'] / GB:.3f} of them)")
    ckpt = p["checkpoint_bytes"]
    lines.append(f"checkpoint: {p['checkpoint_total'] / GB:.2f} GB on disk (" +
                 ", ".join(f"{k} {v / GB:.3f}" for k, v in ckpt.items()) +
                 f"), written in {p['checkpoint_write_s']:.1f} s at {p['write_gbps']:g} GB/s (--write-gbps, "
                 "the file system's, all ranks together)")
    c = p["compute"]
    lines.append(f"compute: {c['step_flops']:.3g} FLOP per step ({c['flops_from']}); at MFU {c['mfu']:.2f} of "
                 f"{c['peak'] / 1e12:.3g} TFLOP/s per device: {c['step_s']:.3g} s per step, "
                 f"{c['tokens_per_day']:.3g} tokens/day, {c['hours_to_max_steps']:.3g} h to train.max_steps")
    for s in p["shards"]:
        have = s["have"] if s["have"] is not None else f"unknown ({s['why']})"
        share = f"; a slot's share of an epoch: max / min {s['share_max_min']:.2f}" if s.get("share_max_min") else ""
        lines.append(f"shards: {s['name']}: {p['slots']} slots x data.shards_in_flight want {s['wanted']}, "
                     f"the manifest lists {have}{share}")
    if p["fits"]:
        lines.append("verdict: it fits")
    lines += verdicts(p)
    return "\n".join(lines)


def main(argv=None) -> int:
    a = argparse.ArgumentParser(prog="python -m pretrain.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--config", required=True)
    a.add_argument("--nodes", type=int, default=1)
    a.add_argument("--gpus-per-node", type=int, default=1, help="ranks per node")
    a.add_argument("--gpu", default="h100", choices=[*GPUS, "cpu"])
    a.add_argument("--memory-gb", type=float, default=0.0, help="memory of one device (default: the --gpu's)")
    a.add_argument("--headroom", type=float, default=-1.0,
                   help="share of a device's memory kept free (default 0.1 on a GPU: CUDA context, NCCL, "
                        "the allocator's fragmentation; 0 on the CPU)")
    a.add_argument("--write-gbps", type=float, default=2.0, help="checkpoint write bandwidth, GB/s")
    a.add_argument("--mfu", type=float, default=0.0, help=f"model FLOPs utilisation (default {GPU_MFU} on a GPU, "
                                                         f"assumed; {CPU_MFU} on the CPU, measured)")
    a.add_argument("--latent-share", type=float, default=0.5,
                   help="share of latent tokens when the shards cannot be read to measure FLOPs")
    a.add_argument("--json", action="store_true", help="the plan as JSON")
    a.add_argument("overrides", nargs="*", help="dotted config overrides, as for pretrain.train")
    args = a.parse_args(argv)
    from model.config_system import load_config
    from pretrain.config import ExperimentConfig
    try:
        cfg = load_config(ExperimentConfig, args.config, args.overrides)
        if min(args.nodes, args.gpus_per_node) < 1:
            raise ValueError("--nodes and --gpus-per-node must be >= 1")
        if args.write_gbps <= 0 or args.memory_gb < 0:
            raise ValueError("--write-gbps must be > 0 and --memory-gb >= 0")
        if not 0 <= args.mfu <= 1 or not 0 <= args.latent_share <= 1 or not (args.headroom == -1 or
                                                                          0 <= args.headroom < 1):
            raise ValueError("--mfu and --latent-share must be in [0, 1], --headroom in [0, 1)")
        p = plan(cfg, args.nodes, args.gpus_per_node, args.gpu, args.write_gbps, args.memory_gb, args.mfu,
                 args.latent_share, args.headroom)
    except (OSError, ValueError) as e:  # ConfigError is a ValueError
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(json.dumps(dict(p, verdicts=verdicts(p)), indent=2) if args.json else render(p))
    return 0
