"""GRPO vs LUFFY vs RL-PLUS vs CalibRL on the CPU demo: same warm start, same budget, several seeds.

    python data/compare.py                       # 4 algorithms x 3 seeds, the demo preset (~15 min, 2 cores)
    python data/compare.py --seeds 0 1 --steps 30 --out runs/compare-quick

Writes <out>/<algo>-s<seed>/ (each a normal calibrl.py run folder), <out>/compare.md (a table:
final and best eval/accuracy, final policy entropy, wall time, mean +- std over seeds) and, when
matplotlib is installed (optional), <out>/compare.png (eval/accuracy and train/entropy against the
step, mean +- std over seeds). This is a benchmark, not a test.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import calibrl  # noqa: E402

ALGOS = ["grpo", "luffy", "rlplus", "calibrl"]


def read(run):
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    ev = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    ent = {r["step"]: r["train/entropy"] for r in rows if "train/entropy" in r}
    return ev, ent


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--algos", nargs="+", default=ALGOS)
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the demo preset's)")
    p.add_argument("--out", default=os.path.join("runs", "compare-" + time.strftime("%Y%m%d-%H%M%S")))
    args, extra = p.parse_known_args()   # anything else goes to calibrl.py, the same for every run
    results = {}
    for algo in args.algos:
        for seed in args.seeds:
            run = os.path.join(args.out, f"{algo}-s{seed}")
            argv = ["--algo", algo, "--seed", str(seed), "--output-dir", run, "--overwrite"] + extra
            if args.steps:
                argv += ["--steps", str(args.steps)]
            t0 = time.time()
            calibrl.main(argv)
            results[algo, seed] = (*read(run), time.time() - t0)

    lines = [f"Demo comparison ({time.strftime('%Y-%m-%d')}): `python data/compare.py {' '.join(sys.argv[1:])}`".rstrip(),
             "", f"{len(args.seeds)} seeds each; mean ± std over seeds; eval/accuracy = mean accuracy of "
             f"k sampled responses per validation problem; entropy = train/entropy of the last step.", "",
             "| algo | start acc | final acc | best acc | final entropy | wall time (s) |",
             "|---|---|---|---|---|---|"]
    for algo in args.algos:
        runs = [results[algo, s] for s in args.seeds]
        cell = lambda xs, f="{:.3f}": "{} ± {}".format(*(f.format(v) for v in mean_std(xs)))
        lines.append(f"| {algo} | {cell([ev[min(ev)] for ev, _, _ in runs])} | {cell([ev[max(ev)] for ev, _, _ in runs])} | "
                     f"{cell([max(ev.values()) for ev, _, _ in runs])} | {cell([ent[max(ent)] for _, ent, _ in runs], '{:.4f}')} | "
                     f"{cell([t for _, _, t in runs], '{:.0f}')} |")
    table = "\n".join(lines) + "\n"
    open(os.path.join(args.out, "compare.md"), "w").write(table)
    print(table)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for algo in args.algos:
        for ax, which, label in ((axes[0], 0, "eval/accuracy"), (axes[1], 1, "train/entropy")):
            curves = [results[algo, s][which] for s in args.seeds]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ms = [mean_std([c[t] for c in curves]) for t in steps]
            ax.plot(steps, [m for m, _ in ms], label=algo)
            ax.fill_between(steps, [m - s for m, s in ms], [m + s for m, s in ms], alpha=0.2)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle(f"CPU demo, tiny Qwen2.5-VL, mean ± std over seeds {args.seeds}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "compare.png"), dpi=110)
    print("wrote", os.path.join(args.out, "compare.png"))


if __name__ == "__main__":
    main()
