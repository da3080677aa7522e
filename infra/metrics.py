"""
infra/metrics.py -- the step's numbers: weighted means reduced over ranks, and where they go (one
line per step on stdout, metrics.jsonl always, TensorBoard on request).

A statistic is kept as [sum of value * n, sum of n] per key (add), so that micro-batches and ranks
of different sizes average correctly; reduce_stats sums them over ranks once per step. The engine
and packing reduce their own perf/* and rollout/* numbers (engine.rollout_metrics,
packing.perf_metrics); the metrics log is written whole or not at all (rundir.append_line).
"""
import json
import os
import time

import torch

from infra import distributed, rundir

def add(stats, key, value, n=1):
    """stats[key] = [sum of value * n, sum of n]: a weighted mean, reduced over ranks at log."""
    s = stats.setdefault(key, [0.0, 0.0])
    s[0], s[1] = s[0] + value * n, s[1] + n


def reduce_stats(stats):
    """[sum, n] per key, summed over ranks -> {key: mean}; keys with no data anywhere are dropped.
    Every rank must hold the same keys (register them with n = 0 where a rank has no data)."""
    keys = sorted(stats)
    t = distributed.all_sum(torch.tensor([v for k in keys for v in stats[k]], dtype=torch.float64))
    t = t.view(-1, 2)
    return {k: s / n for k, (s, n) in zip(keys, t.tolist()) if n}


def step_metrics(stats, groups):
    """The step's stats plus the train/* means over the on-policy rows (and the expert rows'
    accuracy), reduced over ranks."""
    add(stats, "train/expert_accuracy", 0.0, 0)  # a rank without expert rows still has the key
    for g in groups:
        for r in g.rows:
            add(stats, "train/reward", r.reward)
            add(stats, "train/accuracy", r.acc)
            add(stats, "train/format", r.fmt)
            add(stats, "train/response_length", len(r.resp))
            add(stats, "train/entropy", r.entropy.mean().item(), len(r.resp))
            add(stats, "train/zero_adv_rows", float(r.adv == 0.0))
        if g.expert:
            add(stats, "train/expert_accuracy", g.expert.acc)
    return reduce_stats(stats)


class Logger:
    """metrics.jsonl: one JSON object per line, written whole (a failed write is cut back, so the
    file never ends in half a line); one line per step on stdout; TensorBoard on request."""
    def __init__(self, out_dir, rank, tensorboard, steps):
        self.rank, self.steps, self.t0, self.tb = rank, steps, None, None
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if rank == 0 and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit("error: --tensorboard needs the tensorboard package "
                                 "(pip install tensorboard)")
            self.tb = SummaryWriter(out_dir)

    def truncate(self, start, say):
        """On resume: keep the rows of steps up to `start` (none when starting afresh: step 0's
        evaluation runs again), drop a torn last line; rewritten through a temporary file."""
        if self.rank != 0 or not os.path.exists(self.path):
            return
        keep, torn = [], 0
        for line in open(self.path, encoding="utf-8", errors="replace"):
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                torn += 1  # half a line from a run killed while writing
                continue
            if start > 0 and step <= start:
                keep.append(line if line.endswith("\n") else line + "\n")
        if torn:
            say(f"note: {self.path}: dropped {torn} unreadable line(s)")
        rundir.write_atomic(self.path, "".join(keep).encode())

    def log(self, step, metrics):
        if self.rank != 0:
            return
        rundir.append_line(self.path, json.dumps({"step": step, **metrics}) + "\n")
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        m = metrics
        if "train/reward" in m:
            self.t0 = self.t0 or (time.time() - m["time/step"], step - 1)  # for the ETA
            eta = (time.time() - self.t0[0]) / (step - self.t0[1]) * (self.steps - step)
            print(f"step {step}/{self.steps} eta {eta / 60:.1f}m | reward {m['train/reward']:.3f} "
                  f"acc {m['train/accuracy']:.3f} fmt {m['train/format']:.2f} | "
                  f"ent {m['train/entropy']:.3f} clip {m.get('loss/clipfrac', 0):.3f} "
                  f"guided {m.get('loss/guided', 0):.4f} | len {m['train/response_length']:.1f} | "
                  f"t {m['time/rollout']:.1f}/{m['time/logprob']:.1f}/{m['time/update']:.1f}s "
                  f"{m['perf/tokens_per_sec']:.0f} tok/s", flush=True)
        if "eval/accuracy" in m:
            print(f"eval {step:4d} | " + " ".join(f"{k[5:]} {m[k]:.3f}" for k in sorted(m)
                                                  if k.startswith("eval/")), flush=True)
