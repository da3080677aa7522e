"""Tests for calibrl.py, infra/ and kernels/, written as the specification they check: the spec's
test vectors, the loss against a per-token re-derivation, the reward rules, the data schema and
every class of bad input, end-to-end and distributed runs, resume and signals, and the fused
kernel against the readable loss (Triton's interpreter on a CPU, native on a GPU).

    python -m pytest -q test_calibrl.py          # a few minutes on 2 CPU cores
"""
import json
import math
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import calibrl  # on a CPU it switches Triton's interpreter on, before anything imports triton
from infra import (checker, checkpoints, dataset, distributed, engine, family, flags, packing,
                   rundir, sampling)
from calibrl import group_advantages, policy_loss, reward_fn

fused_calibrl = flags.fused_ops()  # kernels/fused_calibrl.py, loaded by path (kernels/ is no package)
fused_logprobs, fused_policy_loss = fused_calibrl.fused_logprobs, fused_calibrl.fused_policy_loss

D = torch.float64
HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"}
CPU_ENV = {**ENV, "CUDA_VISIBLE_DEVICES": ""}  # ranks on gloo/CPU, whatever GPUs the machine has


def close(a, b, tol, what=""):
    a, b = torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D)
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"{what}: max |diff| = {diff:.3e} > {tol:.1e}\n got {a}\n want {b}"

# -----------------------------------------------------------------------------
# Helpers: small runs of calibrl on the bundled demo, data rows, subprocesses

SMALL = ["--prompts-per-step", "4", "--mini-batch-prompts", "2", "--group-size", "4",
         "--micro-batch-size", "6", "--eval-every", "0"]


def run_flags(out, *more, steps=2):
    """The command line of a small run: `steps` steps of 4 prompts x 4 rollouts into folder `out`."""
    return ["--steps", str(steps), *SMALL, "--output-dir", str(out), *more]


def train(out, *more, steps=2):
    """Run calibrl for `steps` steps in this process (a new interpreter costs ~7 s) -> its folder."""
    return calibrl.main(run_flags(out, *more, steps=steps))


WALL_CLOCK = ("time/", "perf/", "mem/", "train/reward_seconds")  # they measure the machine, not the run


def run_metrics(d):
    """{step: metrics} of the training steps in a run folder's metrics.jsonl."""
    return {l["step"]: l for l in map(json.loads, open(os.path.join(d, "metrics.jsonl")))
            if "train/reward" in l}


def params(ckpt):
    return safetensors.torch.load_file(os.path.join(ckpt, "model.safetensors"))


def torchrun(n, *argv, timeout=300):
    """n ranks on as many GPUs if there are, else on CPUs (gloo); -> stdout, or fail with the output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *argv]
    env = ENV if torch.cuda.device_count() >= n else CPU_ENV
    p = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def demo_rows(n=3):
    rows = [json.loads(l) for l in open(calibrl.DEMO_TRAIN)][:n]
    base = os.path.dirname(calibrl.DEMO_TRAIN)
    for r in rows:  # absolute paths, so the rows can live in any folder
        r["images"] = [os.path.join(base, p) for p in r["images"]]
    return rows


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


class deadline:
    """with deadline(s): raises TimeoutError in the main thread after s seconds, even inside a wait
    on a pipe or a subprocess (SIGALRM interrupts the system call), so a hang fails the test."""
    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        import signal
        def fire(*_):
            raise TimeoutError(f"still running after {self.seconds} s")
        self.old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        import signal
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)


def bad(**change):
    """A demo row with fields changed (None: removed)."""
    r = demo_rows(1)[0]
    for k, v in change.items():
        if v is None:
            r.pop(k, None)
        else:
            r[k] = v
    return r

# -----------------------------------------------------------------------------
# Spec test vectors T1-T7

def guided(logp, base, adv, passed, **kw):
    """lam * token-mean of the guided term alone: policy_loss minus its PPO part (rho = 1 -> -A)."""
    lp = torch.tensor([logp], dtype=D, requires_grad=True)
    loss, _ = policy_loss(lp, lp.detach(), torch.tensor([adv], dtype=D), torch.ones(1, len(logp)),
                          expert_logp=torch.tensor([base], dtype=D), passed=torch.tensor([passed]), **kw)
    loss.backward()
    ppo_grad = -adv / len(logp)  # d(-A rho)/d logp at rho = 1, token-mean
    return loss.item() + adv, lp.grad[0] - ppo_grad

def test_T1_guided_term_correct_sample():
    val, grad = guided([-0.5, -2.0], [-1.0, -1.0], 0.55, True)
    close(val, 0.020625, 1e-12, "T1 value")
    close(grad, [-0.01375, -0.0275], 1e-12, "T1 gradient")

def test_T2_wrong_sample_zero_value_nonzero_gradient():
    val, grad = guided([-0.5, -2.0], [-1.0, -1.0], -0.45, False)
    close(val, 0.0, 1e-12, "T2 value")
    close(grad, [0.0225, 0.01125], 1e-12, "T2 gradient")

@pytest.mark.parametrize("rho,adv,want", [(1.5, 0.55, -0.66), (0.5, 0.55, -0.275), (1.0, 0.55, -0.55),
                                          (4.0, -0.45, 1.35), (0.5, -0.45, 0.36)])
def test_T3_dual_clip_ppo(rho, adv, want):
    loss, _ = policy_loss(torch.tensor([[math.log(rho)]], dtype=D), torch.zeros(1, 1, dtype=D),
                          torch.tensor([adv], dtype=D), torch.ones(1, 1), algo="grpo")
    close(loss, want, 1e-9, f"T3 rho={rho} A={adv}")

def test_T4_advantages_ignore_the_expert():
    r = torch.tensor([1.1, 1.1, 1.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0], dtype=D)
    adv, adv_e = group_advantages(r, 10, expert_rewards=torch.tensor([1.1], dtype=D))
    close(adv, [0.72] * 3 + [-0.28] * 5 + [-0.38] * 2, 1e-12, "T4 A")
    close(adv_e, [1.1 - 0.38], 1e-12, "T4 A_E")

def test_T4_passed_comes_from_the_accuracy():
    """passed <=> accuracy 1 (the official r > 0.1), never decided on a float reward: a format-only
    reward of 0.1 that went through float32 is 0.10000000149 in float64, above 0.1."""
    rows = [calibrl.Row(torch.zeros(1), acc=a, fmt=f) for a, f in ((1, 1), (1, 0), (0, 1), (0, 0))]
    assert [r.passed for r in rows] == [True, True, False, False]
    assert [r.reward for r in rows] == [1.1, 1.0, 0.1, 0.0]

def expert_token(algo, p=0.3, p_old=0.3, adv=0.72):
    lp = torch.tensor([[math.log(p)]], dtype=D, requires_grad=True)
    loss, _ = policy_loss(lp, torch.tensor([[math.log(p_old)]], dtype=D), torch.tensor([adv], dtype=D),
                          torch.ones(1, 1), algo=algo, expert_rows=torch.tensor([True]))
    loss.backward()
    return loss.item(), lp.grad.item()

def test_T5_luffy_expert_token():
    val, grad = expert_token("luffy")
    close(val, -0.54, 1e-12, "T5 value")
    close(grad, -0.135, 1e-12, "T5 gradient")

def test_T6_rlplus_expert_token():
    val, _ = expert_token("rlplus")
    close(val, -0.380460, 1e-6, "T6 value")

def random_batch(R=6, T=5, seed=0, expert_last=True):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(R, T, generator=g, dtype=D) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(R, T, generator=g, dtype=D)
    base = -torch.rand(R, T, generator=g, dtype=D) * 3
    mask = torch.rand(R, T, generator=g) > 0.2
    adv = torch.randn(R, generator=g, dtype=D)
    passed = torch.rand(R, generator=g) > 0.5
    exp = torch.zeros(R, dtype=torch.bool)
    exp[-1] = expert_last
    return logp, old, base, mask, adv, passed, exp

def test_T7_invariances():
    logp, old, base, mask, adv, passed, exp = random_batch()
    kw = dict(expert_logp=base, passed=passed, expert_rows=exp, alpha=1.0)
    grads = []
    for b in (base, base + 5.0):  # alpha = 1: the gradient does not depend on l^E
        logp.grad = None
        policy_loss(logp, old, adv, mask, **{**kw, "expert_logp": b})[0].backward()
        grads.append(logp.grad.clone())
    close(grads[0], grads[1], 1e-12, "T7 alpha=1 independent of l^E")
    # a uniform group: zero advantages -> zero loss and zero gradient
    logp.grad = None
    loss, _ = policy_loss(logp, old, torch.zeros(6, dtype=D), mask, expert_logp=base, passed=passed, expert_rows=exp)
    loss.backward()
    close(loss, 0.0, 0, "T7 uniform loss")
    close(logp.grad, torch.zeros_like(logp), 0, "T7 uniform gradient")
    # expert rows contribute exactly 0 under CalibRL, whatever their values
    logp.grad = None
    l1, _ = policy_loss(logp, old, adv, mask, expert_logp=base, passed=passed, expert_rows=exp)
    l1.backward()
    assert logp.grad[-1].abs().max().item() == 0.0
    logp2 = logp.detach().clone()
    logp2[-1] = -9.0
    l2, _ = policy_loss(logp2, old, adv, mask, expert_logp=base, passed=passed, expert_rows=exp)
    assert l1.item() == l2.item()

# -----------------------------------------------------------------------------
# policy_loss against an independent per-token float64 spec, and finite differences

def spec_loss(logp, old, adv, mask, base, passed, exp, algo, cl=0.2, ch=0.2, c=3.0, alpha=0.5, lam=0.1, num_tokens=None):
    """Scalar loops straight from calibrl-spec.md (Eq. C and the baselines)."""
    total, count = 0.0, 0
    for i in range(logp.shape[0]):
        A = float(adv[i])
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            lp = logp[i, t]
            if exp[i]:
                if algo in ("calibrl", "grpo"):
                    continue
                p = torch.exp(lp)
                if algo == "luffy":
                    total = total - A * p / (p + 0.1)
                else:
                    po = math.exp(float(old[i, t]))
                    total = total - A * (2 * p / (po + 0.5 * (po + 1))) * math.sqrt(max(0.0, 1 - p.item()))
                count += 1
                continue
            rho = torch.exp(lp - old[i, t])
            ppo = torch.maximum(-A * rho, -A * torch.clamp(rho, 1 - cl, 1 + ch))
            if A < 0:
                ppo = torch.minimum(ppo, torch.tensor(-A * c, dtype=D))
            total = total + ppo
            if algo == "calibrl":
                s = 1.0 if passed[i] else -1.0
                z = -s * (lp - base[i, t])
                total = total + lam * abs(A) * (z if z > 0 else alpha * z)
            count += 1
    return total / (num_tokens if num_tokens is not None else max(count, 1))

@pytest.mark.parametrize("algo", ["calibrl", "grpo", "luffy", "rlplus"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_loss_matches_spec_values_and_gradients(algo, seed):
    g = torch.Generator().manual_seed(100 + seed)
    R, T = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
    logp, old, base, mask, adv, passed, exp = random_batch(R, T, seed)
    kw = dict(cl=float(torch.rand(1, generator=g)) * 0.3, ch=float(torch.rand(1, generator=g)) * 0.3,
              c=2 + float(torch.rand(1, generator=g)) * 2, alpha=float(torch.rand(1, generator=g)),
              lam=float(torch.rand(1, generator=g)))
    num_tokens = [None, 37.0][seed % 2]
    want = spec_loss(logp, old, adv, mask, base, passed, exp, algo, num_tokens=num_tokens, **kw)
    want_grad, = torch.autograd.grad(want, logp) if torch.is_tensor(want) and want.requires_grad else (torch.zeros_like(logp),)
    got, _ = policy_loss(logp, old, adv, mask, algo=algo, expert_logp=base, passed=passed, expert_rows=exp,
                         clip_low=kw["cl"], clip_high=kw["ch"], clip_c=kw["c"], alpha=kw["alpha"], lam=kw["lam"],
                         num_tokens=num_tokens)
    got_grad, = torch.autograd.grad(got, logp)
    close(got, want, 1e-12, f"{algo} value")
    close(got_grad, want_grad, 1e-12, f"{algo} gradient")

@pytest.mark.parametrize("algo", ["calibrl", "grpo", "luffy", "rlplus"])
def test_policy_loss_finite_differences(algo):
    logp, old, base, mask, adv, passed, exp = random_batch(5, 6, seed=7)
    mask[:] = True
    # one shared-prefix position per on-policy row: log pi_theta == l^E there (z = 0, the kink)
    with torch.no_grad():
        base[:, 0] = logp[:, 0]
    f = lambda x: policy_loss(x, old, adv, mask, algo=algo, expert_logp=base, passed=passed, expert_rows=exp)[0]
    grad, = torch.autograd.grad(f(logp), logp)
    h, x0 = 1e-6, logp.detach()
    for i in range(5):
        for t in range(6):
            # at z = 0 PyTorch's LeakyReLU slope is alpha: the one-sided derivative towards z < 0,
            # i.e. log pi moving by +s (s = +1 passed, -1 failed); elsewhere a central difference
            kink = algo == "calibrl" and t == 0 and not exp[i]
            d = (1.0 if passed[i] else -1.0) if kink else 0.0
            e = torch.zeros_like(x0)
            if algo == "rlplus" and exp[i]:  # sg[(1-p)^0.5] is frozen: d/dlog pi of -A w sg is the term itself
                p, po = math.exp(x0[i, t]), math.exp(old[i, t])
                fd = -float(adv[i]) * (2 * p / (po + 0.5 * (po + 1))) * math.sqrt(1 - p) / mask.sum().item()
            elif kink:
                e[i, t] = d * h
                fd = (f(x0 + e) - f(x0)).item() / (d * h)
            else:
                e[i, t] = h
                fd = (f(x0 + e) - f(x0 - e)).item() / (2 * h)
            close(grad[i, t], fd, 1e-6, f"{algo} FD at row {i} token {t}")

def test_num_tokens_makes_micro_batches_add_up():
    logp, old, base, mask, adv, passed, exp = random_batch(8, 7, seed=3)
    kw = dict(expert_logp=base, passed=passed, expert_rows=exp)
    full, _ = policy_loss(logp, old, adv, mask, **kw)
    n = (mask & ~exp[:, None]).sum().item()
    parts = sum(policy_loss(logp[s], old[s], adv[s], mask[s], expert_logp=base[s], passed=passed[s],
                            expert_rows=exp[s], num_tokens=n)[0] for s in (slice(0, 3), slice(3, 8)))
    close(parts, full, 1e-12, "micro-batches with num_tokens")

def test_group_advantages_std_and_singletons():
    r = torch.tensor([1.0, 0.0, 0.0, 1.1, 1.1, 1.1], dtype=D)
    a = group_advantages(r, 3, std_normalize=True)
    g0 = r[:3]
    close(a[:3], (g0 - g0.mean()) / (g0.std() + 1e-6), 1e-12, "std-normalised")
    close(a[3:], [0, 0, 0], 0, "uniform group")
    close(group_advantages(r, 1), torch.zeros(6), 0, "groups of one (decision 5)")

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("std", [False, True])
def test_a_uniform_group_has_exactly_zero_advantage(dtype, std):
    """Eight well-formatted wrong answers (0.1 each), ten of 1.1, three of 1.0: A = 0 exactly, so the rows
    are skipped as zero-advantage rows, and A_E = r_E - r exactly (no rounding residue divided by a tiny std)."""
    for value, G in ((0.1, 8), (1.1, 10), (1.0, 3)):
        r = torch.full((2 * G,), value, dtype=dtype)
        adv, adv_e = group_advantages(r, G, std, expert_rewards=torch.tensor([1.1, 0.0], dtype=dtype))
        assert torch.equal(adv, torch.zeros_like(adv)), (value, adv)
        assert torch.equal(adv_e, torch.tensor([1.1, 0.0], dtype=dtype) - value), (value, adv_e)

def test_token_logprobs_reference():
    g = torch.Generator().manual_seed(0)
    logits, tgt = torch.randn(3, 4, 11, generator=g), torch.randint(0, 11, (3, 4), generator=g)
    logp, ent = calibrl.token_logprobs(logits, tgt, temperature=0.7)
    p = torch.softmax(logits.double() / 0.7, -1)
    close(logp, p.log().gather(-1, tgt[..., None])[..., 0], 1e-5, "log pi")
    close(ent, -(p * p.log()).sum(-1), 1e-5, "entropy")

# -----------------------------------------------------------------------------
# Reward

@pytest.mark.parametrize("response,gt,want", [
    ("<think>x</think><answer>5</answer>", "5", (1.0, 1.0)),
    ("<think>x</think><answer>5</answer>", 5, (1.0, 1.0)),                       # number ground truth
    ("<think>x</think><answer>2.5</answer>", 2.5, (1.0, 1.0)),
    ("<think>x</think><answer> \\frac{1}{2} </answer>", "0.5", (1.0, 1.0)),       # equivalent forms
    ("<think>x</think><answer>\\dfrac{1}{2}</answer>", "\\frac{1}{2}", (1.0, 1.0)),
    ("<think>x</think><answer>\\boxed{3}</answer>", "3", (1.0, 1.0)),
    ("<think>x</think><answer>12 cm</answer>", "12", (1.0, 1.0)),                 # units after a number
    ("<think>x</think><answer>30°</answer>", "30^\\circ", (1.0, 1.0)),
    ("<think>x</think><answer>45\\%</answer>", "45", (1.0, 1.0)),
    ("<think>x</think><answer>\\text{yes}</answer>", "yes", (1.0, 1.0)),
    ("<think>x</think><answer>B</answer>", "B", (1.0, 1.0)),                      # multiple choice
    ("<think>x</think><answer>B. 30</answer>", "B", (1.0, 1.0)),
    ("<think>x</think><answer>C</answer>", "B", (0.0, 1.0)),
    ("<think>x</think><answer>6</answer>", "5", (0.0, 1.0)),
    ("<think>x</think><answer>5</answer> and more", "5", (1.0, 0.0)),            # text after </answer>
    ("<answer>5</answer>", "5", (1.0, 0.0)),                                      # missing <think>
    ("<think>5</think>", "5", (0.0, 0.0)),                                        # missing <answer>
    ("the answer is 5", "5", (0.0, 0.0)),
    ("<think>a</think><answer>5</answer><answer>7</answer>", "7", (0.0, 1.0)),   # the first match counts
    ("<think></think><answer>}}{{\\frac{</answer>", "5", (0.0, 1.0)),             # garbage
    ("", "5", (0.0, 0.0)),
    # the official code's choices: math-verify's arguments in its order (the prediction first), a run of
    # letters as a multiple-choice answer, \text{ closed by the first }
    ("<think>x</think><answer>x \\ge 1</answer>", "[1, \\infty)", (1.0, 1.0)),
    ("<think>x</think><answer>[1, \\infty)</answer>", "x \\ge 1", (0.0, 1.0)),
    ("<think>x</think><answer>AB</answer>", "AB", (1.0, 1.0)),
    ("<think>x</think><answer>A</answer>", "AB", (0.0, 1.0)),
    ("<think>x</think><answer>\\text{a{b}}</answer>", "a{b}", (1.0, 1.0)),
    # where calibrl departs (README): cm² is dropped, the letter is read after the first \boxed{
    ("<think>x</think><answer>5 cm²</answer>", "5", (1.0, 1.0)),
    ("<think>x</think><answer>so \\boxed{B}</answer>", "B", (1.0, 1.0)),
])
def test_reward_rules(response, gt, want):
    assert reward_fn(response, gt) == want

# -----------------------------------------------------------------------------
# Configuration (calibrl.Args, infra/flags.py) and data (infra/dataset.py)

def test_presets_and_explicit_flags():
    demo = calibrl.parse_args([])
    assert demo.preset == "demo" and demo.model is None
    paper = calibrl.parse_args(["--model", "x"])
    assert (paper.preset, paper.group_size, paper.prompts_per_step, paper.mini_batch_prompts, paper.lr,
            paper.max_prompt_length, paper.max_response_length, paper.clip_c, paper.alpha, paper.lam) == \
        ("paper", 10, 480, 120, 1e-6, 20480, 4096, 3.0, 0.5, 0.1)
    mixed = calibrl.parse_args(["--model", "x", "--group-size", "4", "--preset", "paper", "--lam", "0.2"])
    assert (mixed.group_size, mixed.lam, mixed.prompts_per_step) == (4, 0.2, 480)

@pytest.fixture(scope="module")
def demo():
    """(model, processor, tokenizer, is_vlm) of the bundled tiny Qwen2.5-VL."""
    return calibrl.load_model(calibrl.DEMO_MODEL, torch.float32, torch.device("cpu"))

def test_data_forms(tmp_path, demo):
    """jsonl and parquet; string and chat prompts; paths, {'bytes'} and {'path'} images; verl answers."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    Image.new("RGB", (28, 28), (255, 0, 0)).save(tmp_path / "a.png")
    png = (tmp_path / "a.png").read_bytes()
    verl_rows = [  # parquet as verl writes it: chat prompts, image dicts, reward_model.ground_truth
        {"prompt": [{"role": "user", "content": "<image><image>Two? " + calibrl.INSTRUCTION}],
         "images": [{"bytes": png, "path": None}, {"bytes": None, "path": "a.png"}],
         "reward_model": {"ground_truth": "B"}, "solution": "<think>s</think><answer>B</answer>"},
        {"prompt": [{"role": "user", "content": "<image>One?"}], "images": [{"bytes": png, "path": None}],
         "reward_model": {"ground_truth": "7"}, "solution": "<think>s</think><answer>7</answer>"},
    ]
    pq.write_table(pa.Table.from_pylist(verl_rows), tmp_path / "d.parquet")
    args = calibrl.parse_args([])
    exs = calibrl.load_examples(str(tmp_path / "d.parquet"), args, *demo[1:])
    assert [e["answer"] for e in exs] == ["B", "7"]
    parts = exs[0]["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image", "image", "text"]
    assert parts[-1]["text"].count(calibrl.INSTRUCTION) == 1          # not appended twice
    assert [dataset.open_image(r).size for r in exs[0]["images"]] == [(28, 28), (28, 28)]
    rows = [
        {"prompt": "<image>Q1?", "images": ["a.png"], "answer": 3, "solution": ["<think>s</think><answer>3</answer>", "x"]},
        {"prompt": "Text only", "images": [], "answer": 2.5, "solution": {"role": "assistant", "content": "sol"}},
        {"prompt": "No expert", "answer": "x", "solution": "sol", "pass_ratio": 0.0},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    exs = calibrl.load_examples(str(tmp_path / "d.jsonl"), args, *demo[1:])
    assert [e["answer"] for e in exs] == ["3", "2.5", "x"]
    assert [e["solution"] for e in exs] == ["<think>s</think><answer>3</answer>", "sol", None]
    assert exs[0]["messages"][0]["content"][-1]["text"] == "Q1? " + calibrl.INSTRUCTION
    assert dataset.open_image(exs[0]["images"][0]).size == (28, 28)

def test_instruction_once_and_the_verl_ground_truth_wins(tmp_path, demo):
    """The instruction is not appended again when any message (the system one too) holds it, whitespace
    aside; with both `answer` and reward_model.ground_truth, the ground truth is verl's (the official reward
    reads only it)."""
    loose = "  ".join(calibrl.INSTRUCTION.split(" "))            # the same words, other whitespace
    rows = [{"prompt": [{"role": "system", "content": calibrl.INSTRUCTION}, {"role": "user", "content": "Q1?"}],
             "answer": "1", "reward_model": {"ground_truth": "2"}},
            {"prompt": [{"role": "user", "content": "Q2?\n" + loose}], "answer": "3"},
            {"prompt": [{"role": "user", "content": "Q3?"}], "reward_model": {"ground_truth": 4}}]
    exs = calibrl.load_examples(write_jsonl(tmp_path / "d.jsonl", rows), calibrl.parse_args([]), *demo[1:])
    texts = ["".join(p.get("text", "") for m in e["messages"] for p in m["content"]) for e in exs]
    assert texts[0] == calibrl.INSTRUCTION + "Q1?" and texts[1] == "Q2?\n" + loose
    assert texts[2] == "Q3? " + calibrl.INSTRUCTION
    assert [e["answer"] for e in exs] == ["2", "3", "4"]
    mine = calibrl.load_examples(write_jsonl(tmp_path / "e.jsonl", rows[:2]),
                                 calibrl.parse_args(["--answer-key", "answer"]), *demo[1:])
    assert [e["answer"] for e in mine] == ["1", "3"]  # a key given explicitly is the one read

def dirty_model_copy(tmp_path):
    """The tiny model with the sampling defaults Qwen2.5-VL-Instruct ships in generation_config.json."""
    import shutil
    path = tmp_path / "dirty"
    shutil.copytree(calibrl.DEMO_MODEL, path)
    cfg = json.loads((path / "generation_config.json").read_text())
    cfg.update(repetition_penalty=1.05, top_k=1, top_p=0.001, temperature=0.1, do_sample=True, min_p=0.5,
               no_repeat_ngram_size=2)
    (path / "generation_config.json").write_text(json.dumps(cfg))
    return str(path)

def test_sampling_ignores_the_model_folders_generation_config(tmp_path, demo):
    """Rollouts and evaluation sample from softmax(logits / T) whatever generation_config.json holds."""
    model, proc, tok, is_vlm = demo
    dirty = calibrl.load_model(dirty_model_copy(tmp_path), torch.float32, torch.device("cpu"))
    args = calibrl.parse_args([])
    exs = calibrl.load_examples(calibrl.DEMO_TRAIN, args, proc, tok, is_vlm)[:3]
    args.max_response_length = 12
    encs = [calibrl.encode_prompt(proc, ex, is_vlm) for ex in exs]
    for greedy in (False, True):
        outs = []
        for m in (model, dirty[0]):
            torch.manual_seed(0)
            policy = calibrl.Policy(m, args.temperature, tok.suppress_ids, fused=False)
            outs.append(calibrl.generate(policy, tok, encs, 1 if greedy else 4, args, greedy))
        assert [o.tolist() for o in outs[0].responses] == [o.tolist() for o in outs[1].responses], \
            f"greedy={greedy}"
        assert all(torch.equal(a, b) for a, b in zip(outs[0].logprobs, outs[1].logprobs))
    # the processed scores of every sampled step are exactly logits / T, -inf only at the suppressed ids
    args.temperature = 0.7
    seen, process = [], sampling.process_logits
    def spy(logits, sp, suppress):
        scores = process(logits, sp, suppress)
        seen.append((logits.clone(), scores.clone()))
        return scores
    sampling.process_logits = spy
    try:
        torch.manual_seed(1)
        policy = calibrl.Policy(dirty[0], 0.7, dirty[2].suppress_ids, fused=False)
        calibrl.generate(policy, dirty[2], encs, 2, args)
    finally:
        sampling.process_logits = process
    assert len(seen) > 1 and dirty[2].suppress_ids
    for logits, scores in seen:
        want = logits / 0.7
        want[:, dirty[2].suppress_ids] = -math.inf
        assert torch.equal(scores, want)
    # the exported checkpoint keeps the shipped defaults; the sampler does not use them
    assert dirty[0].generation_config.repetition_penalty is None
    assert dirty[0].shipped_generation_config.repetition_penalty == 1.05

def test_log_probs_score_the_samplers_distribution():
    """pi_old, l^E and the update exclude the ids the sampler suppresses (their logits are -inf)."""
    g = torch.Generator().manual_seed(0)
    logits, tgt = torch.randn(2, 3, 9, generator=g, dtype=D), torch.randint(0, 6, (2, 3), generator=g)
    tgt[0, 0] = 7  # id 7 stays; 6 and 8 go
    logp, ent = calibrl.token_logprobs(logits, tgt, 0.8, suppress_ids=[6, 8])
    keep = torch.log_softmax(torch.cat([logits[..., :6], logits[..., 7:8]], -1) / 0.8, -1)  # ids 0-5, 7
    close(logp, keep.gather(-1, tgt.clamp(max=6)[..., None])[..., 0], 1e-6, "log pi over the kept ids")
    close(ent, -(keep.exp() * keep).sum(-1), 1e-6, "entropy over the kept ids")

def test_prompt_stream_epochs():
    """Each epoch is a pass over the data, reshuffled (or in file order); a step never spans two epochs:
    the last partial batch of an epoch is dropped, as verl's drop_last does."""
    s = dataset.PromptStream(10, seed=0)
    steps = [s.take(4) for _ in range(4)]          # 10 // 4 = 2 steps per epoch
    assert len(set(steps[0] + steps[1])) == 8 and len(set(steps[2] + steps[3])) == 8
    assert steps[:2] != steps[2:]                  # reshuffled
    again = dataset.PromptStream(10, seed=0)
    assert [again.take(4) for _ in range(4)] == steps   # deterministic
    ordered = dataset.PromptStream(10, seed=0, shuffle=False)
    assert [ordered.take(4) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]

def test_the_paper_preset_is_the_official_recipe(tmp_path):
    """--preset paper: one epoch in file order (the official run: total_epochs=1, data.shuffle=False, the last
    partial batch dropped) unless --steps is given; evaluation every 5 steps."""
    paper = calibrl.parse_args(["--model", "x"])
    assert (paper.steps, paper.shuffle, paper.eval_every) == (None, False, 5)
    assert calibrl.parse_args(["--model", "x", "--steps", "7"]).steps == 7
    assert calibrl.parse_args(["--model", "x", "--shuffle", "--no-gradient-checkpointing"]).shuffle
    assert not calibrl.parse_args(["--model", "x", "--no-gradient-checkpointing"]).gradient_checkpointing
    rows = demo_rows(11)
    out = calibrl.main(["--preset", "paper", "--model", calibrl.DEMO_MODEL, "--data", write_jsonl(tmp_path / "t.jsonl", rows),
                        "--prompts-per-step", "4", "--mini-batch-prompts", "4", "--group-size", "2",
                        "--max-response-length", "30", "--max-prompt-length", "512", "--dtype", "float32",
                        "--no-gradient-checkpointing", "--output-dir", str(tmp_path / "o")])
    assert sorted(run_metrics(out)) == [1, 2]      # 11 // 4: one epoch, the last 3 rows dropped

# -----------------------------------------------------------------------------
# End to end on the tiny model (in-process: an interpreter start costs ~7 s)


@pytest.mark.parametrize("algo", ["calibrl", "grpo", "luffy", "rlplus"])
def test_two_steps_each_algo(algo, tmp_path):
    out = train(tmp_path, "--algo", algo)
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [l["step"] for l in lines] == [1, 2]
    for l in lines:
        assert all(math.isfinite(v) for v in l.values())
        assert l["loss/ratio_first_dev"] < 1e-5   # pi_theta / pi_old == 1 on the first update
        assert l["loss/grad_norm"] > 0            # the update moved something
    from transformers import AutoModelForImageTextToText
    ckpt = os.path.join(out, "checkpoint-2")
    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    saved = params(ckpt)
    assert any(not torch.equal(v, params(calibrl.DEMO_MODEL)[k]) for k, v in saved.items())
    assert family.load_processor(ckpt, model.config).image_processor is not None

# -----------------------------------------------------------------------------
# infra/distributed.py, checkpoints.py, rundir.py: torchrun (FSDP2 on gloo), resume, signals

def test_torchrun_two_ranks_trains_and_checkpoints(tmp_path):
    # 3 eval problems, 1 per sampled call (288 KV positions each): rank 0 runs 2 calls, rank 1 one
    out = torchrun(2, "calibrl.py", *run_flags(tmp_path, "--eval-every", "1", "--eval-max-prompts", "3",
                                           "--rollout-max-tokens", "300"))
    assert "world 2" in out and "step 2/2" in out
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["step"] for l in lines if "train/reward" in l] == [1, 2]
    assert sorted(os.listdir(tmp_path / "checkpoint-2" / "state")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    from transformers import AutoModelForImageTextToText
    AutoModelForImageTextToText.from_pretrained(str(tmp_path / "checkpoint-2"))

FIXED_ROLLOUT_UPDATE = '''
"""Fixed rollouts -> one training step's update -> full parameters; must not depend on the rank count."""
import sys
import torch
import calibrl
from infra import distributed, packing
out = sys.argv[1]
rank, world, device = distributed.setup_distributed()
result = {}
for algo in ("calibrl", "luffy"):
    args = calibrl.parse_args(["--algo", algo, "--group-size", "4", "--prompts-per-step", "4",
                               "--mini-batch-prompts", "2", "--micro-batch-size", "3"])
    model, proc, tok, is_vlm = calibrl.load_model(calibrl.DEMO_MODEL, torch.float32, device)
    policy = calibrl.Policy(model, args.temperature, tok.suppress_ids, fused=False)
    if distributed.active():
        distributed.shard(policy, torch.float32, device)
    # SGD: the parameter change is the gradient itself. (Adam's first step is lr * sign(g), so float
    # noise on near-zero gradient elements would flip whole lr-sized steps and hide the comparison.)
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    data = calibrl.load_examples(calibrl.DEMO_TRAIN, args, proc, tok, is_vlm)[:4]
    mine = list(range(4))[rank::world]                  # main()'s strided shard
    groups = []
    for p in mine:                                      # responses depend on the global prompt only
        g = torch.Generator().manual_seed(p)
        sol, ans = data[p]["solution"], data[p]["answer"]
        # no response starts like the expert's: where a rollout shares the expert's prefix, log pi_theta and
        # l^E are the same number up to rounding (z = 0, the LeakyReLU kink), and the slope there (alpha or 1)
        # turns on the last bit, which sharding may change. Elsewhere the update must not depend on ranks.
        texts = ["so " + sol, "no</think><answer>%d</answer>" % (int(ans) + 1), "x", "so " + sol]
        ids = lambda text: torch.tensor(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_id])
        rows = [calibrl.Row(ids(texts[int(torch.randint(0, 4, (1,), generator=g))])) for _ in range(4)]
        group = calibrl.Group(data[p], calibrl.encode_prompt(proc, data[p], is_vlm), rows,
                              expert=calibrl.Row(ids(sol), expert=True))
        for r in group.all_rows():
            r.acc, r.fmt = calibrl.reward_fn(tok.decode(r.resp, skip_special_tokens=True), ans)
        groups.append(group)
    calibrl.old_logprobs(policy, groups, args, device, tok.pad_id)
    calibrl.update(policy, opt, sched, calibrl.advantages(groups, args), args, device, tok.pad_id, world)
    for n, p in policy.named_parameters():
        result[algo + ":" + n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
if rank == 0:
    torch.save(result, out)
'''

def test_update_is_independent_of_the_number_of_ranks(tmp_path):
    script = tmp_path / "fixed_update.py"
    script.write_text(FIXED_ROLLOUT_UPDATE)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], cwd=HERE, env=CPU_ENV, check=True,
                   capture_output=True)
    torchrun(2, str(script), str(tmp_path / "two.pt"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    init = params(calibrl.DEMO_MODEL)
    moved = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"1 vs 2 ranks: max |diff| = {moved:.2e}")
    assert moved <= 1e-6, f"1 vs 2 ranks: max |diff| = {moved:.2e}"
    assert any((v - init[k.split(":model.", 1)[1]]).abs().max() > 1e-5 for k, v in one.items()
               if k.split(":model.", 1)[1] in init), "the update changed nothing"

def test_a_process_group_torchrun_did_not_make_is_not_a_run_of_ranks(tmp_path, monkeypatch):
    """vLLM makes a process group of one in a plain process (--rollout vllm): calibrl must not take it
    for torchrun's (FSDP2, blank images); under torchrun the collectives reduce over the group."""
    monkeypatch.delenv("RANK", raising=False)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                                         world_size=1)
    try:
        assert not distributed.active() and distributed.world_size() == 1
        monkeypatch.setenv("RANK", "0")
        assert distributed.active()
        got = distributed.all_sum(torch.tensor([2.0, 3.0]))
        assert got.tolist() == [2.0, 3.0] and got.dtype == torch.float64 and distributed.all_max(4) == 4.0
    finally:
        torch.distributed.destroy_process_group()

def test_resume_is_exact(tmp_path):
    common = ["--eval-every", "1", "--eval-max-prompts", "4", "--save-every", "2"]
    straight = train(tmp_path / "a", *common, steps=4)
    train(tmp_path / "b", *common, steps=2)
    resumed = train(tmp_path / "b", "--resume", *common, steps=4)
    a, b = params(os.path.join(straight, "checkpoint-4")), params(os.path.join(resumed, "checkpoint-4"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ma, mb = run_metrics(straight), run_metrics(resumed)
    assert sorted(mb) == [1, 2, 3, 4]
    for step in (3, 4):
        for k, v in ma[step].items():
            if not k.startswith(WALL_CLOCK):
                assert abs(v - mb[step][k]) <= 1e-6, (step, k, v, mb[step][k])

def test_refuses_another_runs_output_dir(tmp_path):
    train(tmp_path, steps=1)
    with pytest.raises(SystemExit, match="--resume"):
        train(tmp_path)

def test_sigterm_checkpoints_and_resumes(tmp_path):
    import signal
    import time
    argv = [sys.executable, "calibrl.py"] + run_flags(tmp_path, steps=200)
    p = subprocess.Popen(argv, cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)        # lands in the middle of step 2 or so
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    assert "stopped by signal" in out and "Traceback" not in out
    (step, ckpt), = checkpoints.checkpoints(str(tmp_path))
    assert step < 200
    train(tmp_path, "--resume", steps=step + 1)
    assert sorted(run_metrics(str(tmp_path))) == list(range(1, step + 2))

# -----------------------------------------------------------------------------
# infra/dataset.py, checker.py: bad input named by file, row and field; no check hangs

BAD_DATASETS = [  # (name, rows: the bad one is row 3 of the file, extra flags, expected pieces of the message)
    ("invalid json", ['{"prompt": "<image>Q", '], [], ["row 3", "'json'", "invalid JSON"]),
    ("not an object", ["[1, 2]"], [], ["row 3", "'row'"]),
    ("missing prompt", [bad(prompt=None)], [], ["row 3", "'prompt'", "missing"]),
    ("empty prompt", [bad(prompt="")], [], ["row 3", "'prompt'"]),
    ("chat without content", [bad(prompt=[{"role": "user"}])], [], ["row 3", "'prompt'"]),
    ("missing answer", [bad(answer=None)], [], ["row 3", "'answer'", "missing"]),
    ("empty answer", [bad(answer="  ")], [], ["row 3", "'answer'"]),
    ("images not a list", [bad(images="a.png")], [], ["row 3", "'images'", "not a list"]),
    ("image missing", [bad(images=["/no/such/image.png"])], [], ["row 3", "'images[0]'", "cannot be read"]),
    ("image not an image", [bad(images=[__file__])], [], ["row 3", "'images[0]'", "cannot be read"]),
    ("image entry not a path", [bad(images=[5])], [], ["row 3", "'images[0]'"]),
    ("too few images", [bad(prompt="<image><image>Count.")], [], ["row 3", "'prompt'", "2 <image> placeholders for 1 images"]),
    ("too many images", [bad(images=demo_rows(2)[0]["images"] * 2)], [], ["row 3", "'prompt'", "1 <image> placeholders for 2"]),
    ("luffy without expert", [bad(solution=None)], ["--algo", "luffy"], ["row 3", "'solution'", "needs an expert"]),
    ("rlplus, expert off", [bad(pass_ratio=0.0)], ["--algo", "rlplus"], ["row 3", "'solution'"]),
    ("solution not text", [bad(solution=7)], [], ["row 3", "'solution'"]),
    ("prompt too long", [], ["--max-prompt-length", "40"], ["row 1", "'prompt'", "> --max-prompt-length 40"]),
    ("solution too long", [], ["--max-response-length", "6"], ["row 1", "'solution'", "> --max-response-length 6"]),
    ("content an int", [bad(prompt=[{"role": "user", "content": 5}])], [], ["row 3", "'prompt'", "wrong type (int"]),
    ("content a dict", [bad(prompt=[{"role": "user", "content": {"text": "Q"}}])], [],
     ["row 3", "'prompt'", "wrong type (dict"]),
    ("content strings", [bad(prompt=[{"role": "user", "content": ["Q", "R"]}])], [], ["row 3", "'prompt'", "wrong type"]),
    ("system only, an image", [bad(prompt=[{"role": "system", "content": "Count."}])], [],
     ["row 3", "'prompt'", "no user message"]),
    ("assistant only", [bad(prompt=[{"role": "assistant", "content": "<image>Count."}])], [],
     ["row 3", "'prompt'", "no user message"]),
    ("unknown role", [bad(prompt=[{"role": "teacher", "content": "<image>Count."}])], [],
     ["row 3", "'prompt'", "unknown role 'teacher'"]),
    ("answer of a wrong type", [bad(answer={"value": 5})], [], ["row 3", "'answer'", "wrong type (dict"]),
]

@pytest.mark.parametrize("name,bad_rows,extra,want", BAD_DATASETS, ids=[b[0] for b in BAD_DATASETS])
def test_bad_dataset_is_named_before_training(tmp_path, name, bad_rows, extra, want):
    path = write_jsonl(tmp_path / "train.jsonl", demo_rows(2) + bad_rows + demo_rows(1))
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "out", "--data", path, *extra)
    msg = str(e.value.code)
    assert msg.startswith("error: data file " + path), msg
    for piece in want:
        assert piece in msg, f"{piece!r} not in {msg!r}"
    assert not (tmp_path / "out" / "metrics.jsonl").exists() or not (tmp_path / "out" / "metrics.jsonl").read_text()

def test_bad_files_and_bad_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "rows.csv").write_text("prompt,answer\nQ,1\n")
    (tmp_path / "folder.jsonl").mkdir()
    for path, want in [(tmp_path / "rows.csv", "unknown format '.csv'"), (tmp_path / "folder.jsonl", "is a folder"),
                       (tmp_path / "none.jsonl", "not found"), (tmp_path / "empty.jsonl", "no rows"),
                       (tmp_path / "junk.parquet", "unreadable"), (tmp_path / "img.parquet", r"row 2, field 'images\[0\]'")]:
        if path.name == "empty.jsonl":
            path.write_text("\n")
        if path.name == "junk.parquet":
            path.write_bytes(b"not parquet at all")
        if path.name == "img.parquet":  # bytes that do not decode, in verl's parquet layout
            png = open(demo_rows(1)[0]["images"][0], "rb").read()
            rows = [{"prompt": "<image>Count.", "images": [{"bytes": b}], "answer": "3"} for b in (png, b"\x89PNG broken")]
            pq.write_table(pa.Table.from_pylist(rows), path)
        with pytest.raises(SystemExit, match=want):
            train(tmp_path / "out", "--data", str(path))

def test_many_bad_rows_are_summarised(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", demo_rows(1) + [bad(answer=None)] * 30)
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "o", "--data", path)
    msg = str(e.value.code)
    assert "has 30 bad rows" in msg and "row 21, field 'answer'" in msg and "and 10 more bad rows" in msg
    assert "row 22," not in msg

def test_bad_data_from_the_command_line_exits_1_without_traceback(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", demo_rows(1) + [bad(images=["missing.png"])])
    p = subprocess.run([sys.executable, "calibrl.py", "--data", path, "--output-dir", str(tmp_path / "o")],
                       cwd=HERE, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"error: data file {path}" in p.stderr and "row 2, field 'images[0]'" in p.stderr

def test_validation_rows_need_no_expert(tmp_path, capsys):
    """--algo luffy / rlplus with an --eval-data file without solutions (or with long or odd ones) trains:
    the expert's rules apply to training rows only, and eval rows draw no 'no expert' warning."""
    rows = demo_rows(3)
    rows[0].pop("solution")
    rows[1]["solution"] = "<think>" + "long " * 400 + "</think><answer>5</answer>"
    rows[2]["solution"] = 7
    val = write_jsonl(tmp_path / "val.jsonl", rows)
    for algo in ("luffy", "calibrl"):
        out = train(tmp_path / algo, "--algo", algo, "--eval-data", val, "--eval-every", "1",
                    "--eval-samples", "1", steps=1)
        assert "eval/accuracy" in json.loads(open(os.path.join(out, "metrics.jsonl")).readlines()[-1])
    assert "no expert" not in capsys.readouterr().out

def test_skip_bad_rows_trains_on_the_rest(tmp_path, capsys):
    path = write_jsonl(tmp_path / "t.jsonl", [bad(answer=None), "{oops"] + demo_rows(4) + [bad(images=5)])
    out = train(tmp_path / "o", "--data", path, "--skip-bad-rows", steps=1)
    said = capsys.readouterr().out
    assert "skipped 3 bad rows of 7" in said and "row 1, field 'answer'" in said and "row 2, field 'json'" in said
    assert sorted(run_metrics(out)) == [1]

def test_model_errors(tmp_path):
    with pytest.raises(SystemExit, match="model .*no-such-model.*cannot be loaded"):
        calibrl.main(["--model", str(tmp_path / "no-such-model"), "--steps", "1"])
    import shutil
    shutil.copytree(calibrl.DEMO_MODEL, tmp_path / "m")
    for f in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / "m" / f).unlink(missing_ok=True)
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="no chat template"):
        calibrl.main(["--model", str(tmp_path / "m"), "--steps", "1", "--output-dir", str(tmp_path / "o")])

@pytest.mark.parametrize("answer", ["{" * 20000 + "}" * 20000, "9^{9^{9^{9^{9^{9}}}}}", "10^{10^{10^{10}}}",
                                    "1" * 100000, "\\frac{" * 3000 + "1" + "}{2}" * 3000, "x" * 100000])
def test_adversarial_answers_score_zero_and_return(answer, monkeypatch):
    monkeypatch.setattr(calibrl.VERIFY, "timeout", 2.0)
    with deadline(60):  # a hang guard that stops a hanging call, not a timing test
        acc, fmt = reward_fn(f"<think>t</think><answer>{answer}</answer>", "5")
        assert (acc, fmt) == (0.0, 1.0)
        assert reward_fn("<think>t</think><answer>5</answer>", "5") == (1.0, 1.0)  # still works

def test_non_finite_loss_skips_steps_then_stops_with_a_checkpoint(tmp_path, monkeypatch):
    real = calibrl.policy_loss
    def nan_loss(*a, **kw):
        loss, m = real(*a, **kw)
        return loss * float("nan"), m
    monkeypatch.setattr(calibrl, "policy_loss", nan_loss)
    with pytest.raises(SystemExit, match="non-finite loss or gradient norm in 2 consecutive steps"):
        train(tmp_path, "--max-bad-steps", "2", steps=5)
    m = run_metrics(str(tmp_path))
    assert sorted(m) == [1, 2] and all(m[s]["loss/skipped_frac"] == 1.0 for s in m)
    (step, ckpt), = checkpoints.checkpoints(str(tmp_path))
    a, b = params(ckpt), params(calibrl.DEMO_MODEL)
    assert step == 2 and all(torch.equal(a[k], b[k]) for k in b if k in a)  # the weights were never touched

# -----------------------------------------------------------------------------
# infra/flags.py, rundir.py, checkpoints.py: faults and misuse; nothing lost, nothing silent

FLAG_ERRORS = [  # (flags, the flag named in the message)
    (["--group-size", "0"], "--group-size 0"), (["--group-size", "-1"], "--group-size -1"),
    (["--prompts-per-step", "0"], "--prompts-per-step 0"), (["--micro-batch-size", "0"], "--micro-batch-size 0"),
    (["--mini-batch-prompts", "0"], "--mini-batch-prompts 0"), (["--ppo-epochs", "0"], "--ppo-epochs 0"),
    (["--rollout-max-tokens", "0"], "--rollout-max-tokens 0"),
    (["--lr", "nan"], "--lr nan"), (["--lr", "inf"], "--lr inf"), (["--temperature", "0"], "--temperature 0.0"),
    (["--steps", "0"], "--steps 0"), (["--max-bad-steps", "0"], "--max-bad-steps 0"),
    (["--reward-timeout", "0"], "--reward-timeout 0.0"), (["--top-p", "0"], "--top-p 0.0"),
    (["--clip-low", "1"], "--clip-low 1.0"), (["--alpha", "2"], "--alpha 2.0"),
    (["--dist-timeout", "-5"], "--dist-timeout -5.0"),
    (["--eval-only", "--model", calibrl.DEMO_MODEL, "--preset", "demo"], "--eval-only needs --eval-data"),
]

@pytest.mark.parametrize("extra,named", FLAG_ERRORS, ids=[" ".join(f[0][:2]) for f in FLAG_ERRORS])
def test_flag_errors_are_named_before_the_model_loads(tmp_path, extra, named, monkeypatch):
    monkeypatch.setattr(calibrl, "load_model", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "o", *extra)
    assert str(e.value.code).startswith("error: ") and named in str(e.value.code), e.value.code

def test_a_flag_error_from_the_command_line_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "calibrl.py", "--lr", "nan", "--output-dir", str(tmp_path)],
                       cwd=HERE, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == "error: --lr nan: must be > 0", p.stderr

def test_rows_the_processor_refuses_or_that_are_not_utf8(tmp_path):
    """An image with an aspect ratio over 200 (the processor's ValueError) and a line with a byte that is
    not UTF-8 are bad rows (named, skippable), not a traceback or an unreadable file."""
    from PIL import Image
    Image.new("RGB", (2, 600), (9, 9, 9)).save(tmp_path / "thin.png")
    rows = demo_rows(4) + [bad(images=[str(tmp_path / "thin.png")])]
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "o", "--data", str(path))
    msg = str(e.value.code)
    assert "row 5, field 'images'" in msg and "aspect ratio" in msg, msg
    assert "row 6, field 'json': not UTF-8 (byte 0xe9 at column 16)" in msg, msg
    out = train(tmp_path / "p", "--data", str(path), "--skip-bad-rows", steps=1)
    assert sorted(run_metrics(out)) == [1]

def test_resume_without_a_checkpoint_starts_afresh_and_says_so(tmp_path, capsys):
    """--resume where no checkpoint was written (a run killed before its first save) starts at step 0 and
    drops the old rows (no step twice); without --resume such a folder is refused; --resume on a missing
    folder says it starts afresh."""
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "metrics.jsonl").write_text('{"step": 1, "train/reward": 9}\n{"step": 2, "train/reward": 9}\n')
    with pytest.raises(SystemExit, match="holds an earlier run .metrics.jsonl.; pass --resume"):
        train(tmp_path / "o")
    train(tmp_path / "o", "--resume", steps=2)
    assert "no complete checkpoint" in capsys.readouterr().out
    steps = [json.loads(l)["step"] for l in open(tmp_path / "o" / "metrics.jsonl")]
    assert steps == [1, 2] and all(m["train/reward"] < 2 for m in run_metrics(str(tmp_path / "o")).values())
    train(tmp_path / "new", "--resume", steps=1)
    assert "starting from step 0" in capsys.readouterr().out

def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    out = train(tmp_path, "--save-every", "1", steps=1)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 2, "train/rew')             # a run killed while appending
    train(tmp_path, "--resume", steps=2)
    assert sorted(run_metrics(out)) == [1, 2]

CORRUPTIONS = {  # what goes wrong in the newest checkpoint -> a piece of the reason given for skipping it
    "state metadata missing": (lambda c: os.remove(c / "state" / ".metadata"), "state/.metadata is missing"),
    "a truncated shard": (lambda c: truncate(c / "state" / "__0_0.distcp"), "__0_0.distcp has"),
    "trainer.json missing": (lambda c: os.remove(c / "trainer.json"), "trainer.json is missing"),
    "rng state missing": (lambda c: os.remove(c / "rng-0.pt"), "rng-0.pt is missing"),
    "a truncated model export": (lambda c: truncate(c / "model.safetensors"), "model.safetensors has"),
    "no manifest (save cut short)": (lambda c: os.remove(c / "manifest.json"), "no manifest"),
}

def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)

def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    import shutil
    base = train(tmp_path / "base", "--save-every", "1", steps=2)  # checkpoint-1, checkpoint-2
    for name, (corrupt, reason) in CORRUPTIONS.items():
        run = tmp_path / name.replace(" ", "-")
        shutil.copytree(base, run)
        corrupt(run / "checkpoint-2")
        capsys.readouterr()
        train(run, "--resume", steps=1)  # resume, and with step 1 done there is nothing to run
        said = capsys.readouterr().out
        assert f"skipping {run / 'checkpoint-2'}: " in said and reason in said, (name, said)
        assert f"resuming from {run / 'checkpoint-1'} (step 1)" in said, (name, said)
        assert sorted(run_metrics(str(run))) == [1]  # step 2's row, after the checkpoint, is dropped
    # a truncated exported model is a clear error in --eval-only, not a SafetensorError
    truncate(tmp_path / "base" / "checkpoint-2" / "model.safetensors")
    with pytest.raises(SystemExit, match="error: model .*checkpoint-2: cannot be loaded"):
        calibrl.main(["--eval-only", "--model", str(tmp_path / "base" / "checkpoint-2"), "--preset", "demo",
                      "--eval-data", calibrl.DEMO_VAL, "--output-dir", str(tmp_path / "e")])

class RunsCode:
    """Unpickling this creates a file: what a crafted checkpoint would do with a real payload."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))

@pytest.mark.parametrize("victim", ["rng-0.pt", "state/.metadata"])
def test_resume_refuses_a_checkpoint_whose_pickles_would_run_code(tmp_path, victim):
    """--resume runs no code from a checkpoint folder: rng-<rank>.pt loads with weights_only=True
    and DCP's state/.metadata is read first by an unpickler that builds only DCP's own classes. A
    crafted file (its manifest entry made to match) stops the run with a clear error, unexecuted."""
    import pickle
    out = train(tmp_path / "run", steps=1)
    ckpt, marker = tmp_path / "run" / "checkpoint-1", str(tmp_path / "code-ran")
    payload = {"torch": RunsCode(marker)} if victim.endswith(".pt") else RunsCode(marker)
    with open(ckpt / victim, "wb") as f:
        (torch.save(payload, f) if victim.endswith(".pt") else pickle.dump(payload, f))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest[victim] = os.path.getsize(ckpt / victim)  # a complete checkpoint, as far as sizes go
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoints.incomplete(ckpt) is None
    with pytest.raises(SystemExit, match=f"refuses .*checkpoint-1: .*{victim}.*(pickled objects|not plain "
                                         "DCP metadata).*could run code"):
        train(out, "--resume", steps=2)
    assert not os.path.exists(marker)
    assert sorted(run_metrics(out)) == [1]  # nothing was lost: the folder is as it was

def test_two_runs_on_one_folder(tmp_path):
    """A second run on a folder in use stops at once with a clear message (the first holds a lock)."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(tmp_path / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match="is in use by another run"):
            train(tmp_path, steps=1)
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert sorted(run_metrics(train(tmp_path, steps=1))) == [1]  # once it is gone the folder is usable

def test_a_full_disk_keeps_the_previous_checkpoint_and_whole_metrics_lines(tmp_path, monkeypatch):
    import errno
    real_save = torch.save
    def full_disk(obj, f, *a, **kw):
        if "checkpoint-2" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match="checkpoint-2 could not be written .no space left on the device"):
        train(tmp_path, "--save-every", "1", steps=2)
    assert [s for s, _ in checkpoints.checkpoints(str(tmp_path))] == [1] and not checkpoints.incomplete(tmp_path / "checkpoint-1")
    assert not (tmp_path / "checkpoint-2.tmp").exists()
    monkeypatch.setattr(torch, "save", real_save)
    # the metrics append: a failed write is cut back, never half a line
    def half_then_full(fd, data):
        os.write(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(rundir, "_write_all", half_then_full)
    with pytest.raises(SystemExit, match="cannot write .*metrics.jsonl .No space left on device."):
        train(tmp_path, "--resume", steps=2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1]

def test_non_finite_weights_after_a_step_stop_the_run_unsaved(tmp_path, monkeypatch):
    """An optimizer step that leaves an infinite weight (with a finite gradient norm) stops the run at
    once; nothing is saved over the last good checkpoint."""
    real_step = torch.optim.AdamW.step
    def blow_up(self, *a, **kw):
        out = real_step(self, *a, **kw)
        if self.state and next(iter(self.state.values()))["step"] >= 2:  # the second step
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", blow_up)
    with pytest.raises(SystemExit, match="step 2 left non-finite weights; they are not saved"):
        train(tmp_path, "--save-every", "1", "--mini-batch-prompts", "4", steps=3)
    assert [s for s, _ in checkpoints.checkpoints(str(tmp_path))] == [1]

def test_long_answers_and_the_per_step_budget_skip_math_verify(monkeypatch):
    v = checker.Verifier(calibrl.math_equal, timeout=5.0, budget=30.0)
    assert v("1/2", "0.5") == 1.0 and v.failures == 0 and v.spent > 0
    assert v("0." + "5" * 2000, "0.5") == 0.0 and v.failures == 1        # too long: not parsed at all
    v.spent = v.budget                                                   # the step's budget is spent
    assert v("1/2", "0.5") == 0.0 and v.failures == 2
    v.start_step()
    assert v("1/2", "0.5") == 1.0

def test_an_orphaned_answer_checker_exits_quietly(tmp_path):
    """After a SIGKILL of the trainer, its answer-checking worker ends without an EOFError traceback."""
    import signal
    import time
    script = ("import time, calibrl\ncalibrl.VERIFY('1/2', '0.5')\n"
              "print(calibrl.VERIFY.proc.pid, flush=True)\ntime.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", script], cwd=HERE, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    worker = int(p.stdout.readline())
    p.send_signal(signal.SIGKILL)
    p.wait()
    for _ in range(100):  # the worker sees its pipe close and leaves
        if not os.path.exists(f"/proc/{worker}") or open(f"/proc/{worker}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the orphaned worker is still running")
    assert "Traceback" not in p.stderr.read()

def children(pid):
    """The ranks torchrun started: {RANK: pid}."""
    out = {}
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and open(f"/proc/{d}/stat").read().split(") ")[1].split()[1] == str(pid):
                env = dict(x.split("=", 1) for x in open(f"/proc/{d}/environ").read().split("\0") if "=" in x)
                if "RANK" in env:
                    out[int(env["RANK"])] = int(d)
        except OSError:
            pass
    return out

def test_sigterm_to_torchrun_in_a_long_rollout_checkpoints_the_last_step(tmp_path):
    """torchrun forwards SIGTERM to the ranks and SIGKILLs them 30 s later: a stop in the middle of step 2's
    rollout abandons it and writes checkpoint-1 (the state before step 2, the random state as at its start)
    at once; --resume then replays step 2 exactly as an uninterrupted run does."""
    import signal
    import time
    long = run_flags(tmp_path / "cut", "--group-size", "16", "--temperature", "3", "--max-response-length", "400",
                 steps=2)  # at temperature 3 the tiny model rarely stops: rollouts of a few seconds
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "calibrl.py"]
    p = subprocess.Popen(cmd + long, cwd=HERE, env=CPU_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    with deadline(240):  # step 1's line; then the stop check after step 1 has passed (a signal
        while not (metrics.exists() and '"step": 1,' in metrics.read_text()):  # before it ends the
            time.sleep(0.1)                                                    # run after step 1)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)                     # step 2's rollout has begun
    t0 = time.time()
    out, _ = p.communicate(timeout=120)
    assert time.time() - t0 < 30, out[-3000:]          # before torchrun's SIGKILL
    assert "stopped by signal in step 2" in out and "checkpoint-1" in out, out[-3000:]
    assert [s for s, _ in checkpoints.checkpoints(str(tmp_path / "cut"))] == [1]
    assert "Traceback (most recent call last):\n  File \"/work" not in out.split("stopped by signal")[0]
    torchrun(2, "calibrl.py", *long, "--resume")
    torchrun(2, "calibrl.py", *run_flags(tmp_path / "straight", *long[len(run_flags(tmp_path / "cut", steps=2)):], steps=2))
    resumed, straight = run_metrics(str(tmp_path / "cut")), run_metrics(str(tmp_path / "straight"))
    assert sorted(resumed) == [1, 2]
    for k, v in straight[2].items():
        if not k.startswith(WALL_CLOCK):
            assert abs(v - resumed[2][k]) <= 1e-6, (k, v, resumed[2][k])

def test_a_frozen_rank_ends_the_run_after_dist_timeout(tmp_path):
    """A rank stopped (SIGSTOP) leaves its peer waiting in a collective: after --dist-timeout the peer stops
    with one line instead of hanging for torch's default 30 minutes."""
    import signal
    import time
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "calibrl.py",
           *run_flags(tmp_path, "--dist-timeout", "3", steps=100)]
    env = {**CPU_ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2"}  # torchrun's wait before it SIGKILLs the rest
    p = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    try:
        with deadline(240):
            while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
                time.sleep(0.1)
            ranks = children(p.pid)
        os.kill(ranks[1], signal.SIGSTOP)
        out, _ = p.communicate(timeout=120)
    finally:
        p.kill()
    assert "rank 0: a collective waited longer than --dist-timeout" in out, out[-3000:]

# -----------------------------------------------------------------------------
# The fused Triton op (kernels/) against the readable torch path, float64 reference.
# On a CPU it runs in Triton's interpreter; shapes are ragged on purpose (not multiples of the blocks).
# The interpreter's config splits the vocabulary in S = 2 (256 columns each at V = 500), so the merge
# of split partials runs in every test.

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64


def kclose(name, got, ref, rtol, atol=0.0):
    """max |got - ref| <= rtol * max |ref| + atol, else fail with the numbers."""
    got, ref = torch.as_tensor(got).detach().to(F64).cpu(), torch.as_tensor(ref).detach().to(F64).cpu()
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rtol * scale + atol, f"{name}: max |diff| {err:.3e} > {rtol:.0e} * max |ref| {scale:.3e} + {atol:.0e}"
    return err / max(scale, 1e-30)


def make_head(N, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 0.6).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.6).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    return h.to(DEV), w.to(DEV), t.to(DEV)


def suppressed(logits, ids):
    """The readable reference for suppress_ids: those columns set to -1e30 (no gradient reaches them)."""
    return logits if ids is None else logits.index_fill(-1, torch.as_tensor(ids, device=logits.device), -1e30)


def check_logprobs(N, H, V, dtype, temperature, rtol_fwd, rtol_grad, use_ent=True, zero_rows=True, ids=None):
    h, w, t = make_head(N, H, V, dtype)
    if ids is not None:   # the sampler never produces a suppressed id
        t = torch.where(torch.isin(t, torch.tensor(ids, device=DEV)), (t + 1) % V, t)
        t = torch.where(torch.isin(t, torch.tensor(ids, device=DEV)), torch.full_like(t, 1), t)
    hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, ent = fused_logprobs(hf, wf, t, temperature, suppress_ids=ids)
    hd, wd = h.to(F64).requires_grad_(), w.to(F64).requires_grad_()   # reference on the same rounded inputs
    rlogp, rent = calibrl.token_logprobs(suppressed(hd @ wd.T, ids), t, temperature)
    assert logp.dtype == ent.dtype == torch.float32
    kclose("logp", logp, rlogp, rtol_fwd)
    kclose("entropy", ent, rent, rtol_fwd)
    gen = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(N, generator=gen, dtype=F64).to(DEV), torch.randn(N, generator=gen, dtype=F64).to(DEV)
    if zero_rows:
        g1[::3], g2[::3] = 0, 0   # rows with no gradient are skipped in the backward
    out = (logp.double() * g1 + (ent.double() * g2 if use_ent else 0)).sum()
    ref = (rlogp * g1 + (rent * g2 if use_ent else 0)).sum()
    out.backward()
    ref.backward()
    assert hf.grad.dtype == dtype and wf.grad.dtype == dtype
    if zero_rows:
        assert hf.grad[::3].abs().max() == 0
    return kclose("dH", hf.grad, hd.grad, rtol_grad), kclose("dW", wf.grad, wd.grad, rtol_grad)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_fp32(temperature):
    check_logprobs(200, 48, 500, torch.float32, temperature, 1e-5, 1e-5)


def test_logprobs_fp32_vocab_chunks(monkeypatch):
    # force several (ragged) vocab chunks in the backward: VC = 128 columns for 134 live rows
    monkeypatch.setattr(fused_calibrl, "CHUNK_ELEMS", 128 * 134)
    check_logprobs(201, 40, 451, torch.float32, 1.3, 1e-5, 1e-5)


def test_logprobs_logp_only():
    check_logprobs(77, 33, 300, torch.float32, 1.0, 1e-5, 1e-5, use_ent=False, zero_rows=False)


def test_logprobs_fp16():
    check_logprobs(200, 48, 500, torch.float16, 0.7, 1e-5, 5e-3)


def test_logprobs_bf16_small():
    # bf16 through the interpreter (its dot upcasts to fp32 there, see kernel-notes) or natively on a GPU
    check_logprobs(150, 40, 450, torch.bfloat16, 0.7, 1e-5, 2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tensor-core dots at a larger shape need a GPU")
def test_logprobs_bf16():
    check_logprobs(1000, 256, 5000, torch.bfloat16, 0.7, 1e-5, 2e-2)


@pytest.mark.parametrize("ids", [[3, 255, 256, 499], list(range(256, 384)) + [0]], ids=["scattered", "whole-tile"])
def test_logprobs_suppress_ids(ids):
    # suppressed columns on both sides of the split boundary (256), at the ends of the vocabulary, and a
    # whole vocab tile (the first tile of split 2: its running max starts at -inf)
    check_logprobs(130, 40, 500, torch.float32, 0.8, 1e-5, 1e-5, ids=ids)


def test_logprobs_strided_hidden_is_read_in_place():
    # hidden as the model hands it over, h[:, L-1:-1] of a (R, L + T, H) tensor: no copy, same numbers
    h, w, t = make_head(4 * 30, 40, 300, torch.float32)
    big = h.view(4, 30, 40)
    hs = big[:, 7:-3]                                    # (4, 20, 40), strides (1200, 40, 1)
    logp, ent = fused_logprobs(hs, w, t.view(4, 30)[:, 7:-3], 0.9)
    rlogp, rent = calibrl.token_logprobs(hs.to(F64) @ w.to(F64).T, t.view(4, 30)[:, 7:-3], 0.9)
    kclose("logp", logp, rlogp, 1e-5)
    kclose("entropy", ent, rent, 1e-5)
    assert fused_calibrl._readable(hs) is hs           # the kernels read the slice where it is


import triton  # noqa: E402  (after calibrl, which switches the interpreter on first where there is no GPU)
import triton.language as tl  # noqa: E402


@triton.jit
def _bwd_rows_first(h, w, tgt, lse, g, ent, gh, sup, dz, N, H, stride_h, v0, VC, INV_T: tl.constexpr,
                    HAS_GH: tl.constexpr, HAS_SUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """The backward's first grid order: token blocks on axis 0, vocab tiles on axis 1."""
    fused_calibrl._dz_tile(tl.program_id(0), tl.program_id(1), h, w, tgt, lse, g, ent, gh, sup, dz, N, H,
                           stride_h, v0, VC, INV_T, HAS_GH, HAS_SUP, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)


def test_backward_grid_order_is_bit_identical():
    # the backward grid puts vocab tiles on axis 0 (L2 reuse); the old rows-first order gives the same dz
    h, w, t = make_head(150, 40, 450, torch.float32)
    lse, _, ent, _, _ = fused_calibrl._head_fwd(h, None, w, t, 1.0, None)
    g, gh = torch.randn(150, device=DEV), torch.randn(150, device=DEV)
    cfg = fused_calibrl._tile_cfg(fused_calibrl._config(torch.float32))
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    out = []
    for kernel, grid in [(fused_calibrl._head_bwd_kernel, (triton.cdiv(300, bv), triton.cdiv(150, bn))),
                         (_bwd_rows_first, (triton.cdiv(150, bn), triton.cdiv(300, bv)))]:
        dz = torch.full((150, 300), float("nan"), device=DEV)
        kernel[grid](h, w, t, lse, g, ent, gh, t, dz, 150, 40, 40, 128, 300, INV_T=1.0, HAS_GH=True, HAS_SUP=False, **cfg)
        out.append(dz)
    assert torch.isfinite(out[0]).all() and torch.equal(out[0], out[1])


# -----------------------------------------------------------------------------
# The loss: rows [3 on-policy + 1 expert] x 3 groups; group 1 has equal rewards (A = 0),
# one on-policy row of group 2 is fully masked, ragged response lengths.

P, G, T, H, V = 3, 3, 20, 48, 500


def make_batch(dtype, seed=0, rewards=None, std_normalize=False):
    R = P * (G + 1)
    gen = torch.Generator().manual_seed(seed)
    h, w, _ = make_head(R * T, H, V, dtype, seed)
    hidden = h.view(R, T, H)
    targets = torch.randint(0, V, (R, T), generator=gen)
    lengths = torch.randint(4, T + 1, (R,), generator=gen)
    lengths[9] = 0                                                      # a fully masked on-policy row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()       # (R, T)
    expert_rows = torch.tensor([False] * G + [True]).repeat(P)          # (R,)
    group_ids = torch.arange(P).repeat_interleave(G + 1)                # (R,)
    if rewards is None:
        rewards = torch.tensor([1.1, 0.1, 0.0, 1.1,   1.0, 1.0, 1.0, 1.1,   0.0, 1.1, 0.1, 1.0])
    with torch.no_grad():
        ref_logp = calibrl.token_logprobs(h.to(F64) @ w.to(F64).T, targets.reshape(-1).to(DEV), 0.8)[0].view(R, T).cpu()
    old_logp = (ref_logp + 0.3 * torch.randn(R, T, generator=gen, dtype=F64)) * mask   # ratios hit both clips
    expert_logp = (ref_logp + 0.5 * torch.randn(R, T, generator=gen, dtype=F64)) * mask
    # Eq. A via calibrl.group_advantages on the contiguous on-policy layout it expects
    adv_on, adv_e = calibrl.group_advantages(rewards[~expert_rows].to(F64), G, std_normalize,
                                             expert_rewards=rewards[expert_rows].to(F64))
    adv = torch.empty(R, dtype=F64)
    adv[~expert_rows], adv[expert_rows] = adv_on, adv_e
    b = dict(targets=targets, old_logp=old_logp, mask=mask, expert_logp=expert_logp, expert_rows=expert_rows,
             group_ids=group_ids, rewards=rewards, advantages=adv, passed=rewards > 0.5)
    return hidden, w, {k: v.to(DEV) for k, v in b.items()}


def reference_loss(hidden, w, b, rows=slice(None), ids=None, **kw):
    hd, wd = hidden.to(F64).requires_grad_(), w.to(F64).requires_grad_()
    logp = calibrl.token_logprobs(suppressed(hd[rows] @ wd.T, ids), b["targets"][rows], 0.8)[0]
    loss, m = calibrl.policy_loss(logp, b["old_logp"][rows], b["advantages"][rows], b["mask"][rows],
                                  expert_logp=b["expert_logp"][rows], passed=b["passed"][rows],
                                  expert_rows=b["expert_rows"][rows], **kw)
    loss.backward()
    return loss, m, hd.grad, wd.grad


def run_fused(hidden, w, b, rows=slice(None), from_rewards=False, **kw):
    hf, wf = hidden.clone().requires_grad_(), w.clone().requires_grad_()
    adv = dict(rewards=b["rewards"][rows], group_ids=b["group_ids"][rows]) if from_rewards else \
        dict(advantages=b["advantages"][rows], passed=b["passed"][rows])
    loss, m = fused_policy_loss(hf[rows], wf, b["targets"][rows], b["old_logp"][rows], b["mask"][rows],
                                expert_logp=b["expert_logp"][rows], expert_rows=b["expert_rows"][rows],
                                temperature=0.8, **adv, **kw)
    loss.backward()
    return loss, m, hf.grad, wf.grad


def compare_loss(fused, ref, rtol_grad=1e-5):
    (loss, m, dh, dw), (rloss, rm, rdh, rdw) = fused, ref
    kclose("loss", loss, rloss, 1e-5, 1e-8)
    assert m.keys() == rm.keys()
    for k in rm:
        kclose(k, m[k], rm[k], 1e-5, 1e-6)   # approx_kl is a mean of differences of O(5) numbers
    kclose("dH", dh, rdh, rtol_grad)
    kclose("dW", dw, rdw, rtol_grad)


@pytest.mark.parametrize("from_rewards", [True, False], ids=["rewards", "advantages"])
@pytest.mark.parametrize("algo", ["calibrl", "grpo", "luffy", "rlplus"])
def test_policy_loss_fp32(algo, from_rewards):
    hidden, w, b = make_batch(torch.float32)
    fused = run_fused(hidden, w, b, from_rewards=from_rewards, algo=algo)
    compare_loss(fused, reference_loss(hidden, w, b, algo=algo))
    dh = fused[2]
    assert dh[9].abs().max() == 0 and dh[4:7].abs().max() == 0   # masked row and the A = 0 group
    if algo in ("calibrl", "grpo"):
        assert dh[b["expert_rows"]].abs().max() == 0              # expert rows never train


@pytest.mark.parametrize("algo", ["calibrl", "luffy"])
def test_policy_loss_num_tokens(algo):
    # a fixed denominator (the mini-batch's token count), as a Python number and as a tensor
    hidden, w, b = make_batch(torch.float32, seed=5)
    ref = reference_loss(hidden, w, b, algo=algo, num_tokens=123.0)
    compare_loss(run_fused(hidden, w, b, algo=algo, num_tokens=123.0), ref)
    compare_loss(run_fused(hidden, w, b, algo=algo, num_tokens=torch.tensor(123.0, device=DEV)), ref)


def test_policy_loss_std_normalize_from_rewards():
    hidden, w, b = make_batch(torch.float32, seed=2, std_normalize=True)
    fused = run_fused(hidden, w, b, from_rewards=True, std_normalize=True, algo="calibrl", alpha=0.3)
    compare_loss(fused, reference_loss(hidden, w, b, algo="calibrl", alpha=0.3))
    assert fused[2][4:7].abs().max() == 0   # the uniform group: A = 0 exactly, also divided by std + eps


def test_policy_loss_micro_batches_add_up():
    # gradient accumulation: two micro-batches with num_tokens = the mini-batch count == one call
    hidden, w, b = make_batch(torch.float32, seed=3)
    n = b["mask"][~b["expert_rows"]].sum()
    rloss, _, rdh, rdw = reference_loss(hidden, w, b, num_tokens=n)
    hf, wf = hidden.clone().requires_grad_(), w.clone().requires_grad_()
    total = 0
    for rows in (slice(0, 5), slice(5, None)):
        loss, _ = fused_policy_loss(hf[rows], wf, b["targets"][rows], b["old_logp"][rows], b["mask"][rows],
                                    advantages=b["advantages"][rows], passed=b["passed"][rows],
                                    expert_logp=b["expert_logp"][rows], expert_rows=b["expert_rows"][rows],
                                    temperature=0.8, num_tokens=n)
        loss.backward()
        total = total + loss.detach()
    kclose("loss", total, rloss, 1e-5, 1e-8)
    kclose("dH", hf.grad, rdh, 1e-5)
    kclose("dW", wf.grad, rdw, 1e-5)


def test_policy_loss_fp16():
    hidden, w, b = make_batch(torch.float16)
    loss, m, dh, dw = run_fused(hidden, w, b, algo="calibrl", alpha=0.3, lam=0.5)
    rloss, rm, rdh, rdw = reference_loss(hidden, w, b, algo="calibrl", alpha=0.3, lam=0.5)
    kclose("loss", loss, rloss, 1e-4, 1e-7)
    kclose("dH", dh, rdh, 5e-3)
    kclose("dW", dw, rdw, 5e-3)


@pytest.mark.parametrize("algo", ["calibrl", "rlplus"])
def test_policy_loss_bf16(algo):
    # bf16 hidden / W (interpreter: upcast dots); the reference sees the same bf16-rounded inputs
    hidden, w, b = make_batch(torch.bfloat16, seed=4)
    loss, m, dh, dw = run_fused(hidden, w, b, algo=algo)
    rloss, rm, rdh, rdw = reference_loss(hidden, w, b, algo=algo)
    kclose("loss", loss, rloss, 1e-4, 1e-6)
    kclose("loss/ratio", m["loss/ratio"], rm["loss/ratio"], 1e-4)
    kclose("dH", dh, rdh, 2e-2)
    kclose("dW", dw, rdw, 2e-2)


def test_policy_loss_suppress_ids():
    hidden, w, b = make_batch(torch.float32, seed=6)
    ids = [2, 250, 255, 256, 257, 400, 499]
    b["targets"] = torch.where(torch.isin(b["targets"], torch.tensor(ids, device=DEV)), 1, b["targets"])
    compare_loss(run_fused(hidden, w, b, algo="calibrl", suppress_ids=ids),
                 reference_loss(hidden, w, b, algo="calibrl", ids=ids))
    compare_loss(run_fused(hidden, w, b, algo="luffy", suppress_ids=torch.tensor(ids)),
                 reference_loss(hidden, w, b, algo="luffy", ids=ids))


def test_policy_loss_tokens_entry_matches_padded():
    # the packed entry point on the valid tokens == the (R, T, H) one (which wraps it), here with
    # hidden a strided slice of a larger leaf tensor, read in place: its gradient lands in the slice
    hidden, w, b = make_batch(torch.float32, seed=7)
    R = hidden.shape[0]
    big = torch.randn(R, T + 5, H, device=DEV)
    big[:, 3:-2] = hidden
    big.requires_grad_()
    wf = w.clone().requires_grad_()
    hs = big[:, 3:-2]                                             # (R, T, H), strides ((T + 5) H, H, 1)
    assert fused_calibrl._readable(hs) is hs
    kw = dict(expert_rows=b["expert_rows"], algo="luffy", temperature=0.8)
    loss, m = fused_policy_loss(hs, wf, b["targets"], b["old_logp"], b["mask"], b["rewards"], b["group_ids"],
                                expert_logp=b["expert_logp"], **kw)
    loss.backward()
    valid = b["mask"] > 0
    hf, wf2 = hidden.clone().requires_grad_(), w.clone().requires_grad_()
    row_ids = torch.arange(R, device=DEV)[:, None].expand(R, T)[valid]
    loss2, m2 = fused_calibrl.fused_policy_loss_tokens(
        hf[valid], wf2, b["targets"][valid], b["old_logp"][valid], row_ids, b["expert_logp"][valid],
        b["rewards"], b["group_ids"], **kw)
    loss2.backward()
    kclose("loss", loss2, loss, 1e-6, 1e-9)
    for k in m:
        kclose(k, m2[k], m[k], 1e-6, 1e-9)
    kclose("dH", hf.grad, big.grad[:, 3:-2], 1e-6)
    kclose("dW", wf2.grad, wf.grad, 1e-6)
    assert big.grad[:, :3].abs().max() == 0 and big.grad[:, -2:].abs().max() == 0
    assert big.grad[:, 3:-2][~valid].abs().max() == 0
    rloss, rm, rdh, rdw = reference_loss(hidden, w, b, algo="luffy")
    kclose("loss vs readable", loss, rloss, 1e-5, 1e-7)   # A from fp32 rewards here
    kclose("dH vs readable", big.grad[:, 3:-2], rdh, 1e-5)


def test_fused_loss_does_not_call_the_readable_one(monkeypatch):
    hidden, w, b = make_batch(torch.float32)   # (the batch's own reference values use the readable path)

    def boom(*args, **kwargs):
        raise AssertionError("the fused op called the readable path")
    for name in ("policy_loss", "group_advantages", "token_logprobs"):
        monkeypatch.setattr(calibrl, name, boom)
    loss, m, dh, dw = run_fused(hidden, w, b, from_rewards=True, algo="calibrl")
    assert torch.isfinite(loss) and dh.abs().max() > 0
    src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "fused_calibrl.py")).read()
    assert "import calibrl" not in src and "from calibrl" not in src


def test_group_advantages_arbitrary_groups():
    # arbitrary group ids, expert rows, a group with a single on-policy row (A = 0 there, A_E = r_E - r)
    r = torch.tensor([1.1, 0.0, 0.1, 1.0, 1.1, 0.0, 1.0, 0.1, 1.1, 1.0, 0.0, 1.1, 1.0])
    gid = torch.tensor([7, 2, 7, 7, 2, 2, 7, 9, 9, 2, 7, 7, 2])
    exp = torch.tensor([False, False, False, True, False, False, False, False, True, True, False, False, False])
    for std_normalize in (False, True):
        adv, passed = fused_calibrl.fused_group_advantages(r.to(DEV), gid.to(DEV), exp.to(DEV), std_normalize)
        adv = adv.cpu()
        assert passed.tolist() == (r > 0.5).tolist()
        for g in gid.unique():
            on, ex = (gid == g) & ~exp, (gid == g) & exp
            if on.sum() == 1:   # decision 5
                ra, re_ = torch.zeros(1), r[ex] - r[on]
                assert adv[on].item() == 0 and adv[ex].item() == (r[ex] - r[on]).item()
            else:
                ra, re_ = calibrl.group_advantages(r[on].to(F64), int(on.sum()), std_normalize,
                                                   expert_rewards=r[ex].to(F64))
            kclose(f"A group {g.item()} std {std_normalize}", adv[on], ra, 1e-6, 1e-7)
            kclose(f"A_E group {g.item()} std {std_normalize}", adv[ex], re_, 1e-6, 1e-7)


@pytest.mark.parametrize("std_normalize", [False, True])
def test_group_advantages_uniform_groups_are_exactly_zero(std_normalize):
    # eight rewards of 0.1 (float32 0.1 does not sum to 0.8 exactly) and ten of 1.1, interleaved, each
    # with an expert row; the readable reference agrees (exactly, here, up to float32 vs float64)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    r = torch.tensor([0.1] * 8 + [1.1] * 10 + [1.1, 0.0])[perm]
    gid = torch.tensor([5] * 8 + [3] * 10 + [5, 3])[perm]
    exp = torch.tensor([False] * 18 + [True, True])[perm]      # expert rows: 1.1 in group 5, 0.0 in group 3
    adv, _ = fused_calibrl.fused_group_advantages(r.to(DEV), gid.to(DEV), exp.to(DEV), std_normalize)
    adv = adv.cpu()
    assert (adv[~exp] == 0).all(), adv[~exp]
    for g, r_on in ((5, 0.1), (3, 1.1)):   # A_E = r_E - r exactly, std or not (no spread: no rescale)
        e = (gid == g) & exp
        assert adv[e].item() == (r[e] - torch.tensor(r_on)).item(), (g, adv[e])
    for g in (3, 5):
        on, ex = (gid == g) & ~exp, (gid == g) & exp
        ra, re_ = calibrl.group_advantages(r[on].to(F64), int(on.sum()), std_normalize, expert_rewards=r[ex].to(F64))
        kclose(f"A group {g}", adv[on], ra, 0, 1e-6)
        kclose(f"A_E group {g}", adv[ex], re_, 1e-6, 1e-6)


def test_policy_loss_all_masked():
    # a micro-batch of padding only: zero loss, zero (not missing) gradients, no kernel launch
    h = torch.randn(2, 5, 16, device=DEV).requires_grad_()
    w = torch.randn(300, 16, device=DEV).requires_grad_()
    t, zeros = torch.randint(0, 300, (2, 5), device=DEV), torch.zeros(2, 5, device=DEV)
    loss, m = fused_policy_loss(h, w, t, zeros, zeros, advantages=torch.tensor([1.0, -1.0], device=DEV),
                                passed=torch.tensor([True, False], device=DEV), num_tokens=10)
    loss.backward()
    assert loss.item() == 0 and m["tokens"].item() == 0
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_fused_training_step_matches_the_readable_path(tmp_path):
    """calibrl.py --fused on: the same rollouts (sampling does not use the op) give the same update.
    float32 on a GPU too: bf16 paths differ by more than this test's tolerance (the GPU check compares them)."""
    outs = {f: train(tmp_path / f, "--fused", f, "--dtype", "float32", steps=1) for f in ("on", "off")}
    m_on, m_off = run_metrics(outs["on"])[1], run_metrics(outs["off"])[1]
    assert m_on["train/reward"] == m_off["train/reward"]            # identical rollouts
    assert m_on["loss/ratio_first_dev"] < 1e-5                       # pi_old and the update share one path
    for k in ("train/entropy", "loss/ppo", "loss/guided", "loss/ratio", "loss/clipfrac", "loss/grad_norm"):
        assert abs(m_on[k] - m_off[k]) <= 1e-5 * max(1.0, abs(m_off[k])), (k, m_on[k], m_off[k])
    # (parameters are not compared: Adam's first step is lr * sign(g) wherever |g| >> eps, so fp32 noise
    # on near-zero gradient elements flips whole lr-sized steps; the gradient norm above is the check)

FAKE_HF_KERNELS = '''
"""Stand-in for Hugging Face's `kernels`: the names transformers 5.17-5.24 import from it."""
import contextlib, enum
import triton  # noqa: F401  (like the real one: transformers then imports triton early)
class Mode(enum.Flag):
    INFERENCE, TRAINING, TORCH_COMPILE, FALLBACK = 1, 2, 4, 8
class _Spec:
    def __init__(self, *args, **kwargs):
        pass
CUDAProperties = ROCMProperties = Device = LayerRepository = LocalLayerRepository = KernelizeFallback = _Spec
def _decorator(*args, **kwargs):
    return lambda obj: obj
use_kernel_forward_from_hub = use_kernelized_func = replace_kernel_forward_from_hub = _decorator
register_kernel_mapping = lambda *args, **kwargs: None
use_kernel_mapping = lambda *args, **kwargs: contextlib.nullcontext()
kernelize = lambda model, *args, **kwargs: model
def get_kernel(*args, **kwargs):
    raise OSError("stand-in: no hub")
'''

def kernels_for_transformers(tmp_path):
    """-> (PYTHONPATH for a run, the `kernels` version it imports). transformers 5.25 and later
    depend on Hugging Face's `kernels` distribution: then it is installed and used as it is. Earlier
    releases import it only when present at a version they accept: then a stand-in is written, at
    the lowest version the installed transformers accepts (read from transformers itself)."""
    import importlib.metadata
    from transformers.utils import import_utils
    try:
        return HERE, importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pass
    want = import_utils.KERNELS_MIN_VERSION
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(FAKE_HF_KERNELS)
    (site / f"kernels-{want}.dist-info").mkdir()
    (site / f"kernels-{want}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: kernels\nVersion: {want}\n")
    return f"{site}{os.pathsep}{HERE}", want

@pytest.mark.parametrize("fused", ["on", "off"])
def test_an_installed_kernels_distribution_is_not_shadowed(tmp_path, fused):
    """transformers imports Hugging Face's `kernels` by name; calibrl's own kernels/ folder (no
    package, loaded by path) must neither hide it nor be hidden by it: `python calibrl.py` trains a
    step with the distribution importable and accepted by transformers, the fused op on and off."""
    path, version = kernels_for_transformers(tmp_path)
    env = {**ENV, "PYTHONPATH": path}
    env.pop("TRITON_INTERPRET", None)  # calibrl.py itself must switch the interpreter on, early enough
    probe = ("import calibrl, importlib.metadata, kernels, transformers.utils.import_utils as u; "
             "print(kernels.__file__, importlib.metadata.version('kernels'), u.is_kernels_available(), "
             "calibrl.flags.fused_ops().__file__)")
    p = subprocess.run([sys.executable, "-c", probe], cwd=HERE, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    where, seen, accepted, ours = p.stdout.split()
    assert not where.startswith(os.path.join(HERE, "kernels")), f"calibrl's kernels/ shadows {where}"
    assert seen == version and accepted == "True", p.stdout
    assert ours == os.path.join(HERE, "kernels", "fused_calibrl.py")
    p = subprocess.run([sys.executable, "calibrl.py", *run_flags(tmp_path / "o", "--fused", fused, steps=1)],
                       cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"fused {fused == 'on'}" in p.stdout and sorted(run_metrics(str(tmp_path / "o"))) == [1]

def test_fused_under_torchrun(tmp_path):
    out = torchrun(2, "calibrl.py", *run_flags(tmp_path, "--fused", "on", steps=1))
    assert "fused True" in out and "world 2" in out
    assert run_metrics(str(tmp_path))[1]["loss/ratio_first_dev"] < 1e-5


# -----------------------------------------------------------------------------
# infra/family.py: a tiny Qwen2-VL and a tiny text-only causal LM, built from configs

@pytest.fixture(scope="module")
def make_demo():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_demo", os.path.join(HERE, "data", "make_demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

def test_one_step_on_qwen2_vl(tmp_path, make_demo):
    make_demo.tiny_config_model("qwen2_vl", str(tmp_path / "m"))
    out = train(tmp_path / "o", "--preset", "demo", "--model", str(tmp_path / "m"), steps=1)
    assert sorted(run_metrics(out)) == [1]
    from transformers import AutoModelForImageTextToText
    assert type(AutoModelForImageTextToText.from_pretrained(os.path.join(out, "checkpoint-1"))).__name__ == \
        "Qwen2VLForConditionalGeneration"

def test_one_step_on_a_text_only_lm(tmp_path, make_demo):
    make_demo.tiny_config_model("text", str(tmp_path / "m"))
    rows = [{"prompt": f"What is {a} + {b}?", "answer": a + b,
             "solution": f"<think>{a} + {b} = {a + b}.</think><answer>{a + b}</answer>"} for a in range(3) for b in range(3)]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    model = ["--preset", "demo", "--model", str(tmp_path / "m")]
    assert sorted(run_metrics(train(tmp_path / "o", *model, "--data", data, steps=1))) == [1]
    with pytest.raises(SystemExit, match=r"row 1, field 'images': the model is text-only"):
        train(tmp_path / "p", *model, "--data", write_jsonl(tmp_path / "i.jsonl", demo_rows(1)), steps=1)


def test_eval_only_on_a_hand_written_jsonl(tmp_path):
    rows = demo_rows(3)
    rows[1]["answer"] = 99  # never right: accuracy can be neither 0 nor 1 only by chance
    data = write_jsonl(tmp_path / "mine.jsonl", rows)
    out = calibrl.main(["--eval-only", "--model", calibrl.DEMO_MODEL, "--preset", "demo", "--eval-data", data,
                        "--eval-samples", "3", "--output-dir", str(tmp_path / "o")])
    (m,) = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert set(m) == {"step", "eval/accuracy", "eval/pass@k", "eval/greedy_accuracy", "eval/greedy_reward",
                      "eval/format", "eval/response_length"}
    assert m["eval/greedy_accuracy"] <= m["eval/greedy_reward"] <= m["eval/greedy_accuracy"] + 0.1 + 1e-12
    assert 0 <= m["eval/accuracy"] <= 2 / 3 and m["eval/accuracy"] <= m["eval/pass@k"] <= 2 / 3
    assert m["eval/response_length"] > 0

# -----------------------------------------------------------------------------
# infra/engine.py, sampling.py (engine.generate): the tokens of transformers' generate, exactly the
# sampler's distribution, prefill once, the budget, validation, interrupt and progress

RG, RT = 4, 24  # samples per prompt, response budget: small, these run on 2 shared CPU cores


def bench_rollout():
    """data/bench_rollout.py, loaded by path: its today_generate is the rollout before the rollout engine
    (transformers' generate on a left-padded batch, num_return_sequences = G), the reference."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_rollout",
                                                  os.path.join(HERE, "data", "bench_rollout.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def mixed_prompts(proc, k=5, seed=0):
    """k demo prompts with a filler context of 40-200 words in front (~150-600 tokens, so prompts
    of different lengths share a call); prompt 1 loses its image (text only, in a VLM batch)."""
    import random
    exs = calibrl.load_examples(calibrl.DEMO_TRAIN, calibrl.parse_args([]), proc, proc.tokenizer,
                                True, say=lambda *a: None)[:k]
    words, rng = "the of a number square image count red blue add think answer cell grid".split(), \
        random.Random(seed)
    for i, ex in enumerate(exs):
        filler = " ".join(rng.choice(words) for _ in range(rng.randint(40, 200)))
        ex["messages"][0]["content"].insert(0, {"type": "text", "text": "Context: " + filler + "\n"})
        if i == 1:
            ex["messages"][0]["content"] = [p for p in ex["messages"][0]["content"] if p["type"] == "text"]
            ex["images"] = []
    return [calibrl.encode_prompt(proc, ex, True) for ex in exs]


@pytest.fixture(scope="module")
def mix(demo):
    return mixed_prompts(demo[1])


def sampler(tok, n=RG, greedy=False, T=RT, **kw):
    return sampling.Sampling(n, T, greedy=greedy, stop_ids=tok.stop_ids, suppress_ids=tok.suppress_ids,
                          **kw)


def lengths(encs):
    return [e["input_ids"].shape[1] for e in encs]


def run_engine(model, tok, encs, sp, budget=10**6, seed=0, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    calls = engine.plan_calls(lengths(encs), sp.n, sp.max_new_tokens, budget)
    return engine.generate(model, encs, sp, calls, pad_id=tok.pad_id, **{"progress": None, **kw})


def n_same(a, b):
    assert len(a) == len(b)
    return sum(torch.equal(x, y) for x, y in zip(a, b))


def test_rollout_greedy_matches_generate(demo, mix):
    """Greedy: the tokens of transformers' generate, in one call or in calls of 2 prompts, and
    through calibrl.generate (Policy's forward, the budget from the flags)."""
    model, _, tok, _ = demo
    sp = sampler(tok, n=1, greedy=True)
    ref = bench_rollout().today_generate(model, mix, sp, tok.pad_id, len(mix), "cpu")
    assert len({len(r) for r in ref}) > 1  # responses end at different steps
    two = engine.call_tokens(max(lengths(mix)), 1, RT, 2)
    for budget in (10**6, two):
        out = run_engine(model, tok, mix, sp, budget)
        assert n_same(ref, out.responses) == len(ref), f"budget {budget}"
        assert out.stats["perf/rollout_calls"] == (1 if budget > two else 3)
    args = calibrl.parse_args(["--max-response-length", str(RT), "--rollout-max-tokens", str(two)])
    policy = calibrl.Policy(model, args.temperature, tok.suppress_ids, fused=False)
    assert n_same(ref, calibrl.generate(policy, tok, mix, 1, args, greedy=True).responses) == len(ref)


def test_rollout_sampled_matches_generate_same_seed(demo, mix):
    """Sampled, in one call without compaction (the random stream's order kept: one multinomial
    over B*G rows per step, prompt-major): the same tokens as generate for the same seed. float64,
    where the fp32 probabilities of both paths are bitwise equal (fp32 logits differ in the last
    bits, another attention layout, which can move a draw across a bucket edge)."""
    model, _, tok, _ = calibrl.load_model(calibrl.DEMO_MODEL, torch.float64, "cpu")
    sp = sampler(tok)
    torch.manual_seed(3)
    ref = bench_rollout().today_generate(model, mix, sp, tok.pad_id, len(mix), "cpu")
    out = run_engine(model, tok, mix, sp, seed=3, compact=False)
    assert n_same(ref, out.responses) == len(ref)
    assert len({len(r) for r in ref}) > 1


def test_rollout_distribution_is_softmax_logits_over_T(demo, mix, monkeypatch):
    """With compaction and calls of 3 prompts the draws differ from generate's, so check the
    distribution itself: every sampled step's processed scores are the raw logits / T, -inf exactly
    at the suppressed ids; and each token's sampler log-prob equals pi_old's (calibrl's scoring
    path, teacher-forced), which a wrong position, mask or cache row after compaction would break."""
    model, _, tok, _ = demo
    sp = sampler(tok, T=40, temperature=0.7)
    seen, process, moves, keep_rows = [], sampling.process_logits, [], engine.StaticKV.keep_rows
    def spy(logits, sp_, suppress):
        scores = process(logits, sp_, suppress)
        seen.append((logits.clone(), scores.clone()))
        return scores
    def moved(kv, keep):
        moves.append(keep != list(range(len(keep))))
        return keep_rows(kv, keep)
    monkeypatch.setattr(sampling, "process_logits", spy)
    monkeypatch.setattr(engine.StaticKV, "keep_rows", moved)
    out = run_engine(model, tok, mix, sp, engine.call_tokens(max(lengths(mix)), RG, 40, 3), seed=4)
    assert out.stats["perf/rollout_calls"] == 2 and any(moves)  # a finished prompt left the cache
    assert out.stats["rollout/decode_rows"] < out.stats["rollout/decode_rows_dense"]  # compacted
    sup = torch.zeros(seen[0][0].shape[-1], dtype=torch.bool)
    sup[tok.suppress_ids] = True
    for logits, scores in seen:
        assert torch.isinf(scores[:, sup]).all() and (scores[:, sup] < 0).all()
        assert torch.equal(scores[:, ~sup], logits.float()[:, ~sup] / 0.7)
    policy = calibrl.Policy(model, 0.7, tok.suppress_ids, fused=False)
    encs = [e for e in mix for _ in range(RG)]
    inputs, L = calibrl.collate(family.of(model), encs, out.responses, tok.pad_id, "cpu")
    with torch.no_grad():
        old_logp, _ = policy(inputs, L)                                          # (R, T)
    gap = max((old_logp[i, :len(lp)] - lp).abs().max().item() for i, lp in enumerate(out.logprobs))
    assert gap < 1e-4, f"max |sampler log-prob - pi_old log-prob| = {gap:.2e}"


def test_rollout_prefill_once_equals_per_sample_prefill(demo, mix):
    """One prefill per prompt (right-padded prompts, images encoded once; one prompt per forward or
    all at once) writes the keys and values, and gives the next-token logits, of the per-sample
    prefill generate does (the prompt repeated G times)."""
    model, _, tok, _ = demo
    m = engine.RolloutModel(model)
    call = engine.plan_calls(lengths(mix[:3]), RG, RT, 10**6)[0]
    runs = []
    for per_forward in (call.P, 10**6):
        kv = engine.StaticKV(call.tokens)
        kv.start_call(len(call.prompts), call.tokens // len(call.prompts))
        with torch.no_grad(), engine.rollout_attention_on(model):
            logits, n_tok, _, _ = engine.prefill(m, mix, call, kv, tok.pad_id, per_forward)
        runs.append((kv, logits))
    (kv, logits), (_, logits2) = runs
    close(logits, logits2, 2e-5, "one prompt per forward vs all at once")
    for b, p in enumerate(call.prompts):
        n = int(n_tok[b])
        each = {k: v.repeat(RG, *[1] * (v.dim() - 1)) for k, v in mix[p].items()}  # G rows
        with torch.no_grad():
            ref = model(**each, use_cache=True)
        close(ref.logits[:, -1], logits[b].expand(RG, -1), 2e-5, f"prompt {p} logits")
        cache = getattr(ref, "cache", None) or ref.past_key_values
        for layer in range(len(cache.layers)):
            K, V = kv.layer(layer)
            close(cache.layers[layer].keys, K[b, :, :n].expand(RG, -1, -1, -1), 2e-5, f"K {layer}")
            close(cache.layers[layer].values, V[b, :, :n].expand(RG, -1, -1, -1), 2e-5, f"V {layer}")


def test_rollout_plan_arithmetic():
    """No call over the budget, every prompt in exactly one call, longest prompts first, and a call
    closed only when the next prompt would not fit; a prompt too long on its own is named."""
    import random
    rng = random.Random(0)
    for _ in range(300):
        n, T = rng.choice([1, 4, 10]), rng.choice([1, 16, 512])
        lens = [rng.randint(1, 3000) for _ in range(rng.randint(0, 40))]
        budget = engine.call_tokens(max(lens, default=1), n, T) * rng.choice([1, 2, 5, 50]) \
            + rng.randint(0, 999)
        calls = engine.plan_calls(lens, n, T, budget)
        assert sorted(i for c in calls for i in c.prompts) == list(range(len(lens)))
        for c in calls:
            assert c.P == max(lens[i] for i in c.prompts) and c.prompts == sorted(c.prompts)
            assert c.tokens == engine.call_tokens(c.P, n, T, len(c.prompts)) <= budget
            assert c.tokens // len(c.prompts) % engine.ALIGN == 0
        for a, b in zip(calls, calls[1:]):
            assert min(lens[i] for i in a.prompts) >= max(lens[i] for i in b.prompts)
            assert engine.call_tokens(a.P, n, T, len(a.prompts) + 1) > budget
    n, T, budget = 8, 64, 4096
    longest = engine.max_prompt_length(n, T, budget)
    assert engine.call_tokens(longest, n, T) <= budget < engine.call_tokens(longest + 1, n, T)
    assert [i for i, _ in engine.too_long([100, longest, longest + 1, 5000], n, T, budget)] == [2, 3]
    with pytest.raises(ValueError, match="prompt 2"):
        engine.plan_calls([100, longest, longest + 1], n, T, budget)


def test_rollout_every_rank_runs_the_same_synced_calls(demo, mix):
    """Ranks plan their own prompts (other counts, other lengths); with n_calls (the max over
    ranks) a rank with fewer calls runs dummies without a forward, so every rank meets all_sum
    equally often (1 + n_calls), and the progress counts all ranks."""
    model, _, tok, _ = demo
    sp = sampler(tok, n=2)
    budget = engine.call_tokens(max(lengths(mix)), 2, RT, 1)  # one prompt per call
    shards = [mix[0::3], mix[1::3], []]                       # 3 "ranks": 2, 2 and 0 prompts
    plans = [engine.plan_calls(lengths(s), 2, RT, budget) for s in shards]
    assert [len(p) for p in plans] == [2, 2, 0]
    for shard, plan in zip(shards, plans):
        sums, seen = [], []
        def all_sum(x):
            sums.append(x)
            return x * 3  # as if the 3 ranks held the same
        out = engine.generate(model, shard, sp, plan, pad_id=tok.pad_id, n_calls=2, all_sum=all_sum,
                             progress=seen.append, progress_every=0)
        assert len(sums) == 3 and len(out.responses) == 2 * len(shard)
        assert all(s["prompts_total"] == 3 * len(shard) for s in seen)
        assert out.stats["perf/rollout_calls"] == len(plan)


def test_rollout_too_long_prompt_is_reported_at_validation(tmp_path, capsys):
    """A prompt that cannot fit a call on its own under --rollout-max-tokens stops the run before
    step 1, named by row; validation rows are sized with --eval-samples, training rows with G."""
    rows = demo_rows(3)
    rows[1]["prompt"] = "<image>" + "count the squares " * 60 + rows[1]["prompt"].replace("<image>", "")
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    # G = 4 samples of 48 tokens: the 89-token prompts need 288 positions, row 2 more than 400
    argv = run_flags(tmp_path / "o", "--data", data, "--rollout-max-tokens", "400", steps=1)
    with pytest.raises(SystemExit, match=r"row 2, field 'prompt': \d+ tokens need \d+ KV positions "
                                         r"with 4 samples .* > --rollout-max-tokens 400"):
        calibrl.main(argv)
    assert not os.path.exists(tmp_path / "o" / "metrics.jsonl") or not run_metrics(tmp_path / "o")
    args = calibrl.parse_args(["--rollout-max-tokens", "200", "--eval-samples", "1"])
    _, proc, tok, is_vlm = calibrl.load_model(calibrl.DEMO_MODEL, torch.float32, "cpu")
    ok = calibrl.load_examples(write_jsonl(tmp_path / "v.jsonl", demo_rows(2)), args, proc, tok,
                               is_vlm, train=False)      # 1 sample: 89 + 48 -> 144 positions
    assert len(ok) == 2


def test_rollout_interrupt_ends_it_early(demo, mix):
    """interrupt() is checked once per decode step: it stops the call where it stands, no later
    call runs, and the Rollout says so."""
    model, _, tok, _ = demo
    sp = sampler(tok, T=40)
    checks = []
    def interrupt():
        checks.append(1)
        return len(checks) > 5
    budget = engine.call_tokens(max(lengths(mix)), RG, 40, 2)
    out = run_engine(model, tok, mix, sp, budget, interrupt=interrupt)
    assert out.interrupted and len(checks) == 6
    calls = engine.plan_calls(lengths(mix), RG, 40, budget)
    first = [p * RG + g for p in calls[0].prompts for g in range(RG)]
    assert all(0 < len(out.responses[i]) <= 5 for i in first)             # tokens 0..4, then cut
    assert all(len(r) == 0 for i, r in enumerate(out.responses) if i not in first)  # never ran
    assert not run_engine(model, tok, mix, sp, budget, interrupt=lambda: False).interrupted


def test_rollout_progress_is_rare_and_rank_0s(demo, mix, capsys):
    """Progress comes at most every progress_every seconds, never in a short rollout; the default
    prints one line on rank 0."""
    model, _, tok, _ = demo
    seen = []
    run_engine(model, tok, mix, sampler(tok), progress=seen.append, progress_every=0)
    assert seen and seen[-1]["prompts_total"] == len(mix)
    assert [s["tokens"] for s in seen] == sorted(s["tokens"] for s in seen)
    assert all(set(s) == {"prompts", "prompts_total", "tokens", "seconds", "tokens_per_sec"} for s in seen)
    quiet = []
    run_engine(model, tok, mix, sampler(tok), progress=quiet.append)  # default: every 10 s
    assert not quiet
    engine.show_progress(seen[-1])
    assert "rollout (rank 0)" in capsys.readouterr().out


def test_rollout_static_step_matches_eager(demo, mix):
    """The fixed-shape decode step a CUDA graph captures (all G slots, all S columns, the mask
    updated in place), run eagerly on the CPU, samples what the eager step samples."""
    model, _, tok, _ = demo
    sp = sampler(tok)
    a = run_engine(model, tok, mix, sp, seed=5, compact=False)
    b = run_engine(model, tok, mix, sp, seed=5, static=True)
    assert n_same(a.responses, b.responses) >= len(a.responses) - 2  # fp32: a draw may move


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_rollout_cuda_graph_matches_eager():
    import warnings
    model, proc, tok, _ = calibrl.load_model(calibrl.DEMO_MODEL, torch.float32, "cuda")
    encs, greedy = mixed_prompts(proc, 4), sampler(tok, n=1, greedy=True)
    ref = run_engine(model, tok, encs, greedy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert n_same(ref.responses, run_engine(model, tok, encs, greedy, cuda_graph=True).responses) \
            == len(ref.responses)
        a = run_engine(model, tok, encs, sampler(tok), seed=2, compact=False)
        b = run_engine(model, tok, encs, sampler(tok), seed=2, cuda_graph=True)
    assert not [w for w in caught if "rollout engine" in str(w.message)], [str(w.message) for w in caught]
    assert n_same(a.responses, b.responses) >= len(a.responses) - 2


def test_rollout_text_only_lm_greedy_matches_generate():
    """1-D RoPE, no vision tower: the tokens of transformers' generate."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    encs = [{"input_ids": torch.randint(20, 300, (1, n)), "attention_mask": torch.ones(1, n, dtype=torch.long)}
            for n in (7, 30, 18)]
    sp = sampling.Sampling(1, RT, greedy=True, stop_ids=(3,))
    ref = bench_rollout().today_generate(model, encs, sp, 0, 3, "cpu")
    assert n_same(ref, run_engine(model, type("Tok", (), {"pad_id": 0}), encs, sp).responses) == 3


def test_rollout_metrics_every_step(tmp_path):
    """Every step logs the rollout's speed, memory, calls, largest call (within the budget) and the
    sampler-vs-pi_old gap (~1e-7: both are softmax(logits / T) over the same ids)."""
    # 4 prompts of 89 tokens, G = 4, 48 tokens: 288 positions each, so 600 holds 2 prompts a call
    out = train(tmp_path, "--rollout-max-tokens", "600", steps=1)
    m = run_metrics(out)[1]
    assert m["perf/rollout_calls"] == 2 and m["perf/rollout_max_call_tokens"] == 576
    assert m["perf/rollout_tokens_per_sec"] > 0 and m["mem/rollout_peak_gb"] > 0
    assert m["rollout/logprob_gap"] < 1e-4, m["rollout/logprob_gap"]


def test_rollout_in_training_mode_with_gradient_checkpointing(demo, mix):
    """Evaluation runs after the update, with the model in training mode, and the paper preset
    checkpoints gradients; transformers 5.17 then drops every layer's cache. The engine decodes
    in eval mode and gives the model back in the mode it came in."""
    model, _, tok, _ = calibrl.load_model(calibrl.DEMO_MODEL, torch.float32, "cpu")
    sp = sampler(tok, n=1, greedy=True)
    ref = run_engine(model.eval(), tok, mix, sp)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out = run_engine(model.train(), tok, mix, sp)
    assert model.training and n_same(ref.responses, out.responses) == len(mix)

# -----------------------------------------------------------------------------
# infra/packing.py: the token-budget plan, the packed pi_old pass and update against the
# padded ones in float64, the shared vision forward, rank-count independence, one step both ways.

import random  # noqa: E402
import types  # noqa: E402

from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen25  # noqa: E402
from transformers.models.qwen2 import modeling_qwen2 as qwen2  # noqa: E402

PACK_BUDGET = 240  # the longest row (219 tokens, 229 on InternVL) fits; a group is cut
PACK_TOL = 1e-10
VISION = ("model.visual", "model.vision_tower", "model.multi_modal_projector")  # Qwen, InternVL


def lognormal_rows(n_groups, G, seed, mean=60, cap=400, prompt=(30, 200)):
    """-> tokens, groups: n_groups prompts x G rows, lognormal response lengths (about `mean`)."""
    rng = random.Random(seed)
    tokens, groups = [], []
    for g in range(n_groups):
        L = rng.randint(*prompt)
        for _ in range(G):
            tokens.append(L + min(cap, max(1, int(rng.lognormvariate(math.log(mean) - 0.4, 0.9)))))
            groups.append(g)
    return tokens, groups


@pytest.mark.parametrize("budget", [450, 1000, 4096])
def test_pack_plan_budget_every_row_once_equal_forwards(budget):
    ranks = [lognormal_rows(n, 9, seed) for seed, n in enumerate([7, 3, 5])]
    plans = [packing.plan_micro_batches(t, g, budget) for t, g in ranks]
    n = max(len(p) for p in plans)  # what in_step's all-reduce max agrees on
    for (tokens, groups), plan in zip(ranks, plans):
        padded = plan + [None] * (n - len(plan))  # in_step: dummy work is None (weight 0)
        assert len(padded) == n, "every rank runs the same number of forwards"
        assert sorted(i for mb in plan for i in mb) == list(range(len(tokens))), "every row exactly once"
        assert all(sum(tokens[i] for i in mb) <= budget for mb in plan), "a micro-batch over the budget"
        assert len(plan) <= -(-sum(tokens) // budget) + 1, "more than one forward above the lower bound"
    # keeping groups whole where it costs no forward: four groups of 3 x 30 tokens, budget 200
    plan = packing.plan_micro_batches([30] * 12, [i // 3 for i in range(12)], 200)
    assert plan == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]
    # a row longer than half the budget keeps its group whole; a group over the budget is cut in two
    assert packing.plan_micro_batches([130, 20, 20, 20, 20], [0, 0, 1, 1, 2], 200) == [[0, 1], [2, 3, 4]]
    assert packing.plan_micro_batches([90, 90, 90, 10], [0, 0, 0, 1], 200) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="row 1 has 300 tokens"):
        packing.plan_micro_batches([10, 300], [0, 0], 256)
    assert distributed.in_step(packing.plan_micro_batches([], [], 100)) == []


@pytest.mark.parametrize("budget", [450, 1000, 4096])
def test_pack_plan_with_shared_prompts_counts_each_prompt_once_per_micro_batch(budget):
    """--pack on's plan: a row costs its response, a prompt its L once in every micro-batch holding any of
    its rows (twice when its group is cut in two): every row once, each micro-batch's shared cost within
    the budget, forwards near the lower bound, and fewer than rows packed alone need."""
    for seed, n in enumerate([7, 3, 5]):
        tokens, groups = lognormal_rows(n, 9, seed, prompt=(200, 800))
        L = {}
        for g, t in zip(groups, tokens):  # lognormal_rows draws one L per group: recover it as the minimum
            L[g] = min(L.get(g, t), t)
        L = {g: l - 1 for g, l in L.items()}                     # every row keeps a response of >= 1 token
        resp = [t - L[g] for t, g in zip(tokens, groups)]
        plan = packing.plan_micro_batches(resp, groups, budget + 800, L)
        cost = lambda mb: sum(resp[i] for i in mb) + sum(L[g] for g in {groups[i] for i in mb})  # noqa: E731
        assert sorted(i for mb in plan for i in mb) == list(range(len(tokens)))
        assert all(cost(mb) <= budget + 800 for mb in plan)
        assert len(plan) <= -(-(sum(resp) + sum(L.values())) // (budget + 800)) + 1
        assert len(plan) <= len(packing.plan_micro_batches(tokens, groups, budget + 800))
    # two groups of 2 x 10-token responses behind 100-token prompts: 120 each, whole, in one forward of
    # 240; rows alone would cost 440
    assert packing.plan_micro_batches([10] * 4, [0, 0, 1, 1], 240, {0: 100, 1: 100}) == [[0, 1, 2, 3]]
    # cut in two, the group pays its prompt in each part: 100 + 60 + 60 > 200
    assert packing.plan_micro_batches([60, 60], [0, 0], 200, {0: 100}) == [[0], [1]]
    with pytest.raises(ValueError, match="row 0 has 301 tokens"):
        packing.plan_micro_batches([1], [0], 300, {0: 300})


def test_pack_budget_is_checked_before_the_model_loads():
    args = calibrl.parse_args(["--max-tokens-per-micro-batch", "500"])  # < 512 + 48
    with pytest.raises(SystemExit, match="raise it to at least 560"):
        flags.check_args(args, 1)
    flags.check_args(calibrl.parse_args(["--max-tokens-per-micro-batch", "500", "--pack", "off"]), 1)
    paper = calibrl.parse_args(["--preset", "paper"])
    assert paper.max_tokens_per_micro_batch >= paper.max_prompt_length + paper.max_response_length
    flags.check_args(paper, 8)


@pytest.fixture(scope="module")
def tiny64():
    model, processor, tok, _ = calibrl.load_model(calibrl.DEMO_MODEL, torch.float64, "cpu")
    return model, processor, tok


def logprobs64(logits, targets, temperature=1.0, suppress_ids=None):
    """calibrl.token_logprobs in the logits' dtype (it computes in float32)."""
    logits = logits / temperature
    if suppress_ids:
        logits = logits.index_fill(-1, torch.as_tensor(suppress_ids), -1e30)
    logp_all = torch.log_softmax(logits, dim=-1)                                     # (..., V)
    return logp_all.gather(-1, targets[..., None])[..., 0], -(logp_all.exp() * logp_all).sum(-1)


@pytest.fixture
def float64_throughout(monkeypatch):
    """transformers computes RMSNorm and the vision rotary in float32 even in a float64 model, and
    calibrl.token_logprobs casts the logits to float32. The packed and padded paths round there at
    different places (one vision forward summing the rows' gradients, or one per row), which leaves
    ~1e-7 relative differences (tested in float32 end to end below); in the input dtype they agree to
    float64 rounding."""
    def rotary(q, k, cos, sin):
        cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
        return q * cos + qwen25.rotate_half(q) * sin, k * cos + qwen25.rotate_half(k) * sin

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    monkeypatch.setattr(qwen25, "apply_rotary_pos_emb_vision", rotary)
    monkeypatch.setattr(qwen25.Qwen2_5_VLRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(qwen2.Qwen2RMSNorm, "forward", rms_norm)  # InternVL's decoder
    monkeypatch.setattr(calibrl, "token_logprobs", logprobs64)


def pack_groups(processor, seed=0):
    """4 prompts x (3 sampled rows + the expert's): images of two sizes (one prompt with two, one with
    none), prompts of four lengths, one row longer than half of PACK_BUDGET, random response ids (no
    response shares the expert's prefix: no LeakyReLU kink at z = 0), mixed rewards."""
    from PIL import Image
    prompts = [([(56, 56)], "How many squares?"),
               ([(84, 112), (56, 56)], "Count the dots in both pictures, then add the two counts."),
               ([(84, 112)], "Which colour covers most of this picture? Answer in one word."),
               ([], "What is 2 + 3? Think it through.")]
    g = torch.Generator().manual_seed(seed)
    groups = []
    for p, (sizes, text) in enumerate(prompts):
        images = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
                  for w, h in sizes]
        msgs = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
        chat = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        enc = dict(processor(text=[chat], images=images or None, return_tensors="pt"))
        resp = lambda T: torch.randint(20, 541, (T,), generator=g)                 # no vision ids
        rows = [calibrl.Row(resp(150 if (p, j) == (1, 0) else int(torch.randint(1, 24, (), generator=g))))
                for j in range(3)]
        group = calibrl.Group({}, enc, rows, expert=calibrl.Row(resp(12), expert=True))
        for j, r in enumerate(group.all_rows()):
            r.acc = float((j + p) % 2)
        groups.append(group)
    return groups


class GrabGrads:
    """A stand-in optimizer for calibrl.update: step() keeps the gradients; the weights stay put."""
    def __init__(self, model):
        self.model, self.grads = model, []

    def step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=True)


class LossRecorder(calibrl.Policy):
    """calibrl.Policy that keeps each micro-batch's loss."""
    losses = []

    def forward(self, *args, loss=None, **kw):
        out = super().forward(*args, loss=loss, **kw)
        if loss is not None:
            self.losses.append(out[0].item())
        return out


def pi_old_and_update(model, tok, groups, args):
    """calibrl's pi_old pass, Eq. A and one update (one mini-batch) -> per row (logp, entropy), the
    loss, the gradients, the update's stats."""
    policy = LossRecorder(model, 1.0, tok.suppress_ids, fused=False)
    policy.losses = []
    calibrl.old_logprobs(policy, groups, args, "cpu", tok.pad_id)
    scored = [(r.old_logp.clone(), r.entropy.clone()) for g in groups for r in g.all_rows()]
    noise = torch.Generator().manual_seed(1)
    for g in groups:  # ratios away from 1, so that the clipped branches carry gradients too
        for r in g.all_rows():
            r.old_logp = r.old_logp + 0.3 * torch.randn(r.old_logp.shape, generator=noise, dtype=r.old_logp.dtype)
    calibrl.advantages(groups, args)
    opt = GrabGrads(model)
    stats, _ = calibrl.update(policy, opt, types.SimpleNamespace(step=lambda: None), groups, args, "cpu",
                              tok.pad_id, 1)
    return scored, sum(policy.losses), opt.grads[0], stats


@pytest.mark.parametrize("algo", ["calibrl", "luffy"])
def test_packed_pi_old_and_update_equal_padded_float64(tiny64, float64_throughout, algo):
    """calibrl.old_logprobs and calibrl.update, --pack on (each prompt once per micro-batch, a group cut
    across micro-batches by the budget of 240) and --pack rows (gradient checkpointing on) against --pack
    off (4 rows per micro-batch): log-probs, entropies, loss, every gradient (the vision tower's included),
    the update's stats, to 1e-10 in float64."""
    packed_equals_padded(*tiny64, algo)


def packed_equals_padded(model, processor, tok, algo):
    common = ["--algo", algo, "--group-size", "3", "--mini-batch-prompts", "4", "--max-grad-norm", "1e9"]
    groups = pack_groups(processor)
    tokens = [g.enc["input_ids"].shape[1] + len(r.resp) for g in groups for r in g.all_rows()]
    assert PACK_BUDGET / 2 < max(tokens) <= PACK_BUDGET
    # the shared prompts' plan cuts a group across micro-batches, each holding its prompt once
    L = {id(g): g.enc["input_ids"].shape[1] for g in groups}
    pairs = [(r, g) for g in groups for r in g.all_rows()]
    plan = packing.plan_micro_batches([len(r.resp) for r, _ in pairs], [id(g) for _, g in pairs], PACK_BUDGET, L)
    assert len(plan) > 1 and any(len({id(pairs[i][1]) for i in mb}) < len(mb) for mb in plan)
    assert any(sum(id(pairs[i][1]) == id(g) for i in mb) not in (0, len(g.all_rows())) for mb in plan for g in groups)
    ref = pi_old_and_update(model, tok, groups, calibrl.parse_args(common + ["--pack", "off", "--micro-batch-size", "4"]))
    assert any(n.startswith(VISION) and g.abs().max() > 0 for n, g in ref[2].items())
    for pack in ("on", "rows"):  # each prompt once (the default), or once per row
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            got = pi_old_and_update(model, tok, groups, calibrl.parse_args(
                common + ["--pack", pack, "--max-tokens-per-micro-batch", str(PACK_BUDGET)]))
        finally:
            model.gradient_checkpointing_disable()
            model.eval()
        for i, ((lp_r, en_r), (lp, en)) in enumerate(zip(ref[0], got[0])):
            close(lp, lp_r, PACK_TOL, f"--pack {pack}: row {i} log pi_old")
            close(en, en_r, PACK_TOL, f"--pack {pack}: row {i} entropy")
        close(got[1], ref[1], PACK_TOL, f"--pack {pack}: loss")
        assert ref[2].keys() == got[2].keys()
        for n in ref[2]:
            close(got[2][n], ref[2][n], PACK_TOL, f"--pack {pack}: gradient {n}")
        # the stats: means over micro-batches weighted by their counted tokens, which for LUFFY include the
        # expert's while the means are over on-policy tokens: those depend on the partition, packed or not
        for k in ref[3] if algo == "calibrl" else ["loss/grad_norm"]:
            close(got[3][k][0] / got[3][k][1], ref[3][k][0] / ref[3][k][1], PACK_TOL, f"--pack {pack}: {k}")


def test_shared_vision_forward_equals_per_row(tiny64, float64_throughout):
    """Rows of a prompt share one vision forward (the same encoding object, as calibrl passes g.enc) or
    each encode their own (copies): the same log-probs, entropies and gradients, the vision tower's
    included; fewer images encoded."""
    model, processor, tok = tiny64
    groups = pack_groups(processor)[:3]  # the prompts with images
    rows = [(r, g) for g in groups for r in g.all_rows()]
    policy = calibrl.Policy(model, 1.0, tok.suppress_ids, fused=False)
    out = {}
    for share in (True, False):
        encs = [g.enc if share else dict(g.enc) for _, g in rows]
        pack = packing.pack_rows(model, encs, [r.resp for r, _ in rows])
        logp, entropy = policy(pack)                                                 # (R, T) each
        (logp.sum() + 0.1 * entropy.sum()).backward()
        out[share] = logp, entropy, GrabGrads(model), len(pack.images["image_grid_thw"])
        out[share][2].step()
        model.zero_grad(set_to_none=True)
    (lp, en, g, n), (lp2, en2, g2, n2) = out[True], out[False]
    close(lp2, lp, PACK_TOL, "log-probs")
    close(en2, en, PACK_TOL, "entropies")
    assert any(k.startswith("model.visual") for k in g.grads[0])
    for k, v in g.grads[0].items():
        close(g2.grads[0][k], v, PACK_TOL, f"gradient {k}")
    assert (n, n2) == (4, sum(family.num_images(g.enc) for _, g in rows))


def test_packed_rows_without_images_still_run_the_vision_tower_under_torchrun(tiny64, monkeypatch):
    """Under torchrun a packed micro-batch without images runs the vision tower on a blank image, times 0
    (FSDP's gathers of the vision unit must pair up with ranks whose micro-batch has images): the
    log-probs and gradients are unchanged, the vision parameters get gradients of exactly 0."""
    blank_image_runs_the_tower(*tiny64, monkeypatch)


def blank_image_runs_the_tower(model, processor, tok, monkeypatch):
    group = pack_groups(processor)[3]                                     # the prompt without images
    policy = calibrl.Policy(model, 1.0, tok.suppress_ids, fused=False)
    pack = packing.pack_rows(model, [group.enc] * 4, [r.resp for r in group.all_rows()])
    assert pack.images is None
    out = {}
    for ranks in (False, True):
        monkeypatch.setattr(distributed, "active", lambda: ranks)
        logp, _ = policy(pack)
        logp.sum().backward()
        out[ranks] = logp.detach(), GrabGrads(model)
        out[ranks][1].step()
        model.zero_grad(set_to_none=True)
    vision = [n for n in out[True][1].grads[0] if n.startswith(VISION)]
    assert vision and not any(n.startswith(VISION) for n in out[False][1].grads[0])
    assert all(out[True][1].grads[0][n].abs().max() == 0 for n in vision)
    close(out[True][0], out[False][0], 0.0, "log-probs")
    for n, g in out[False][1].grads[0].items():
        close(out[True][1].grads[0][n], g, 0.0, f"gradient {n}")


def test_packed_attention_leaves_generate_and_the_padded_forward_unchanged(tiny64):
    """load_model makes the decoder's attention packed_sdpa: without packed rows it is plain SDPA, so
    sampling (left-padded prompts, the cache) and the padded forward are bit for bit what they were."""
    model, processor, tok = tiny64
    groups = pack_groups(processor)
    config = family.of(model).text_decoder().config
    assert config._attn_implementation == packing.PACKED_ATTENTION
    prompts, _ = calibrl.collate(family.of(model), [g.enc for g in groups], None, tok.pad_id, "cpu")
    batch, _ = calibrl.collate(family.of(model), [g.enc for g in groups], [g.rows[0].resp for g in groups],
                               tok.pad_id, "cpu")
    out = {}
    try:
        for name in ("sdpa", packing.PACKED_ATTENTION):
            config._attn_implementation = name
            torch.manual_seed(0)
            with torch.no_grad():
                seqs = model.generate(**prompts, max_new_tokens=12, do_sample=True, top_k=0,
                                      suppress_tokens=tok.suppress_ids, pad_token_id=tok.pad_id)
                out[name] = seqs, model.model(**batch, use_cache=False).last_hidden_state
    finally:
        config._attn_implementation = packing.PACKED_ATTENTION
    assert torch.equal(out["sdpa"][0], out[packing.PACKED_ATTENTION][0])
    assert torch.equal(out["sdpa"][1], out[packing.PACKED_ATTENTION][1])


def test_pack_on_and_off_train_alike(tmp_path):
    """One step of the demo (float32, same seed, same rollouts) packed (prompts shared), --pack rows and
    --pack off: the same loss, entropy and gradient norm to float32 noise, and the step's perf metrics. --alpha 1: with the default
    0.5 a rollout sharing the expert's prefix puts z = log pi - l^E at the LeakyReLU kink, where the
    last bit of either path picks the slope (README, departures) and moves the gradient norm by ~1e-3."""
    runs = {p: run_metrics(train(tmp_path / p, "--pack", p, "--alpha", "1", steps=1))[1] for p in ("on", "rows", "off")}
    on, off, rows = runs["on"], runs["off"], runs["rows"]
    for k in ("train/entropy", "loss/ppo", "loss/guided", "loss/ratio", "loss/grad_norm"):
        assert abs(rows[k] - on[k]) <= 1e-5 * max(1.0, abs(on[k])), (k, rows[k], on[k])
    # each prompt once per micro-batch: fewer positions than one forward per row (rows), padding more
    assert on["perf/positions"] < rows["perf/positions"] < off["perf/positions"]
    assert on["perf/positions_saved"] > 0 == rows["perf/positions_saved"] > off["perf/positions_saved"]
    assert rows["perf/pad_frac"] == 0 and rows["perf/vision_encodes"] == on["perf/vision_encodes"]
    assert on["train/reward"] == off["train/reward"]                  # identical rollouts
    for k in ("train/entropy", "loss/ppo", "loss/guided", "loss/ratio", "loss/grad_norm"):
        assert abs(on[k] - off[k]) <= 1e-5 * max(1.0, abs(off[k])), (k, on[k], off[k])
    assert on["loss/ratio_first_dev"] < 1e-5
    assert on["perf/pad_frac"] == 0 < off["perf/pad_frac"]            # one process: no dummy forwards
    assert on["perf/vision_encodes"] <= 2 < off["perf/vision_encodes"]
    assert on["mem/peak_gb"] > 0 and off["mem/peak_gb"] > 0
    config = open(tmp_path / "on" / "checkpoint-1" / "config.json").read()
    assert packing.PACKED_ATTENTION not in config                       # the checkpoint loads anywhere


def test_packed_update_is_independent_of_the_number_of_ranks(tmp_path):
    """FIXED_ROLLOUT_UPDATE with a budget of 150 tokens (each prompt once per micro-batch): several micro-batches per pass,
    groups cut, uneven forward counts between the two ranks (weight-0 dummies: the only padding);
    CalibRL only."""
    script = tmp_path / "fixed_update_packed.py"
    src = FIXED_ROLLOUT_UPDATE.replace('"--micro-batch-size", "3"', '"--max-tokens-per-micro-batch", "150"')
    src = src.replace('for algo in ("calibrl", "luffy"):', 'for algo in ("calibrl",):')  # half the time
    src = src.replace("if rank == 0:\n", "result['padding'] = torch.tensor(distributed.all_sum(packing.FORWARDS['padding']))\n"
                      "if rank == 0:\n")
    assert "150" in src and "padding" in src and '("calibrl",)' in src
    script.write_text(src)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], cwd=HERE, env=CPU_ENV, check=True,
                   capture_output=True)
    torchrun(2, str(script), str(tmp_path / "two.pt"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.pop("padding") == 0 and two.pop("padding") > 0, "no dummy forward ran"
    moved = max((one[k] - two[k]).abs().max().item() for k in one)
    assert moved <= 1e-6, f"1 vs 2 ranks, packed: max |diff| = {moved:.2e}"

# -----------------------------------------------------------------------------
# InternVL3 (infra/family.py InternVL): a tiny InternVLForConditionalGeneration, transformers' -hf
# layout (data/make_demo.py), in every mode the Qwen model runs: 1-D positions, tiles, no grid

@pytest.fixture(scope="module")
def internvl(tmp_path_factory, make_demo):
    path = str(tmp_path_factory.mktemp("internvl") / "m")
    make_demo.tiny_config_model("internvl", path)
    return path


@pytest.fixture
def coin_reward(monkeypatch):
    """A random tiny model never answers right, so every advantage is 0 and nothing trains: this reward is
    a fixed coin flip of the response's text instead (the same text, the same reward: resume stays exact)."""
    import zlib
    monkeypatch.setattr(calibrl, "reward_fn", lambda response, gt: (float(zlib.crc32(response.encode()) % 2), 0.0))


def tiles_prompt(processor, sizes, text="How many squares?"):
    """One prompt encoding with random images of these (w, h) sizes."""
    from PIL import Image
    g = torch.Generator().manual_seed(len(sizes))
    images = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for w, h in sizes]
    msgs = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
    chat = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[chat], images=images or None, return_tensors="pt"))


def test_internvl_loads_with_its_processor_tokens_and_tiles(internvl):
    """load_model on an InternVL folder without torchvision: the image-only processor keeps its own
    image_seq_length (4, not the class default 256) and tiling; <img>, </img>, <IMG_CONTEXT>, <video> are
    suppressed; a response ends at <|im_end|>; one feature per <IMG_CONTEXT>, image_seq_length per tile."""
    model, proc, tok, is_vlm = calibrl.load_model(internvl, torch.float32, "cpu")
    fam = family.of(model)
    assert is_vlm and type(fam) is family.InternVL and fam.axes == 1
    assert type(proc).__name__ == "InternVLProcessor" and proc.image_seq_length == 4
    ids = [tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")]
    assert tok.suppress_ids == sorted(ids) and tok.eos_id == tok.convert_tokens_to_ids("<|im_end|>")
    one, two = tiles_prompt(proc, [(56, 56)]), tiles_prompt(proc, [(56, 56), (112, 56)])
    assert len(one["pixel_values"]) == 1 and len(two["pixel_values"]) == 1 + 3  # 2 tiles + thumbnail
    assert fam.num_features(one) == 4 and fam.num_features(two) == 16
    assert family.num_images(two) == 4                                          # tiles: the tower's unit
    assert two["input_ids"].shape[1] - one["input_ids"].shape[1] == 1 + 12 + 1 + 1  # <img>, 3 x 4, </img>, \n
    assert fam.image_features(**fam.image_inputs([one, two])).shape == (20, model.config.text_config.hidden_size)
    assert fam.blank_features(model.get_input_embeddings().weight).shape == (4, 64)
    pos, delta = fam.positions(two)
    assert torch.equal(pos, torch.arange(two["input_ids"].shape[1])[None]) and delta == 0


@pytest.mark.parametrize("algo", ["calibrl", "grpo", "luffy", "rlplus"])
def test_internvl_each_algo_trains_evaluates_and_checkpoints(algo, internvl, tmp_path, coin_reward):
    """One step of each objective on the tiny InternVL (packed, the default), evaluated before and
    after: pi_theta / pi_old = 1 on the first update and the sampler's log-probs are pi_old's, to float
    noise; each prompt's tiles encoded once a pass; the checkpoint reloads as InternVL with its processor."""
    out = train(tmp_path, "--preset", "demo", "--model", internvl, "--algo", algo, "--eval-every", "1",
                "--eval-max-prompts", "4", steps=1)
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [l["step"] for l in lines] == [0, 1, 1] and "eval/accuracy" in lines[0]
    m = lines[1]
    assert all(math.isfinite(v) for v in m.values())
    assert m["loss/ratio_first_dev"] < 1e-5 and m["rollout/logprob_gap"] < 1e-5, m
    assert m["loss/grad_norm"] > 0 and m["perf/pad_frac"] == 0
    assert m["perf/vision_encodes"] == 2  # each prompt's tiles once in the pi_old pass, once in the update
    from transformers import AutoModelForImageTextToText
    ckpt = os.path.join(out, "checkpoint-1")
    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert any(not torch.equal(v, params(internvl)[k]) for k, v in params(ckpt).items())
    assert family.load_processor(ckpt, model.config).image_seq_length == 4


def test_internvl_packed_padded_and_fused_train_alike(internvl, tmp_path, coin_reward):
    """One step packed (the default), --pack off (left-padded rows: positions from the attention mask)
    and --fused on (the Triton op, in its interpreter here): the same rollouts, loss, entropy and gradient
    norm to float32 noise; --eval-only runs too."""
    flags_ = ["--preset", "demo", "--model", internvl, "--alpha", "1"]  # --alpha 1: see test_pack_on_and_off
    runs = {name: run_metrics(train(tmp_path / name, *flags_, *more, steps=1))[1]
            for name, more in (("on", []), ("off", ["--pack", "off"]), ("fused", ["--fused", "on"]))}
    for name in ("off", "fused"):
        assert runs[name]["train/reward"] == runs["on"]["train/reward"]
        assert runs[name]["loss/ratio_first_dev"] < 1e-5 and runs[name]["rollout/logprob_gap"] < 1e-5
        for k in ("train/entropy", "loss/ppo", "loss/guided", "loss/grad_norm"):
            assert abs(runs[name][k] - runs["on"][k]) <= 1e-5 * max(1.0, abs(runs["on"][k])), (name, k)
    assert runs["off"]["perf/pad_frac"] > 0 and runs["off"]["perf/vision_encodes"] > 1
    out = calibrl.main(["--eval-only", "--model", internvl, "--preset", "demo", "--eval-data", calibrl.DEMO_VAL,
                        "--eval-max-prompts", "3",
                        "--output-dir", str(tmp_path / "e")])
    (m,) = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert m["eval/response_length"] > 0


@pytest.mark.parametrize("algo", ["calibrl", "rlplus"])
def test_internvl_packed_pi_old_and_update_equal_padded_float64(internvl, float64_throughout, algo):
    """As for Qwen (test_packed_pi_old_and_update_equal_padded_float64): pack_groups' prompts (one with two
    images of different sizes, 5 tiles and 1, one without images), --pack on (gradient
    checkpointing on) against --pack off: log-probs, entropies, loss, every gradient (the vision tower's and
    the projector's included) to 1e-10 in float64."""
    model, processor, tok, _ = calibrl.load_model(internvl, torch.float64, "cpu")
    assert len(pack_groups(processor)[1].enc["pixel_values"]) == 5 + 1   # 84 x 112: 4 tiles + a thumbnail
    packed_equals_padded(model, processor, tok, algo)


def test_internvl_packed_rows_without_images_still_run_the_vision_tower_under_torchrun(internvl, monkeypatch):
    """As for Qwen: a blank tile, times 0, through the vision tower and the projector."""
    blank_image_runs_the_tower(*calibrl.load_model(internvl, torch.float32, "cpu")[:3], monkeypatch)


def test_internvl_rollout_matches_generate(internvl):
    """The engine's tokens equal transformers' generate on InternVL: greedy (in one call and in calls of 2
    prompts), and sampled with the same seed in float64 (see test_rollout_sampled_matches_generate_same_seed)."""
    model, proc, tok, _ = calibrl.load_model(internvl, torch.float32, "cpu")
    mix = mixed_prompts(proc)
    sp = sampler(tok, n=1, greedy=True)
    ref = bench_rollout().today_generate(model, mix, sp, tok.pad_id, len(mix), "cpu")
    two = engine.call_tokens(max(lengths(mix)), 1, RT, 2)
    for budget in (10**6, two):
        assert n_same(ref, run_engine(model, tok, mix, sp, budget).responses) == len(ref), budget
    model = model.double()
    sp = sampler(tok)
    torch.manual_seed(3)
    ref = bench_rollout().today_generate(model, mix, sp, tok.pad_id, len(mix), "cpu")
    assert n_same(ref, run_engine(model, tok, mix, sp, seed=3, compact=False).responses) == len(ref)
    assert len({len(r) for r in ref}) > 1


def test_internvl_under_torchrun_equals_one_rank_and_resumes_exactly(internvl, tmp_path, coin_reward):
    """FSDP2 (the vision tower and the projector as units of their own): FIXED_ROLLOUT_UPDATE packed at a
    150-token budget (groups cut, weight-0 dummy forwards) gives the parameters of one rank, the vision
    tower's and the decoder's moved; the main loop trains and evaluates on 2 ranks (the rollout on whole
    weights); a resumed run equals an uninterrupted one."""
    script = tmp_path / "fixed_update_internvl.py"
    src = FIXED_ROLLOUT_UPDATE.replace("calibrl.DEMO_MODEL", "sys.argv[2]").replace(
        '"--micro-batch-size", "3"', '"--max-tokens-per-micro-batch", "150"').replace(
        'for algo in ("calibrl", "luffy"):', 'for algo in ("calibrl",):')
    assert src.count("sys.argv[2]") == 1 and "150" in src
    script.write_text(src)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt"), internvl], cwd=HERE, env=CPU_ENV,
                   check=True, capture_output=True)
    torchrun(2, str(script), str(tmp_path / "two.pt"), internvl)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-6
    from transformers import AutoModelForImageTextToText
    init = AutoModelForImageTextToText.from_pretrained(internvl).state_dict()  # the file keeps InternVL's own names
    moved = [k for k, v in one.items() if (v - init[k.split(":model.", 1)[1]]).abs().max() > 1e-5]
    assert any(".vision_tower." in k for k in moved) and any(".language_model." in k for k in moved), moved
    model = ["--preset", "demo", "--model", internvl]
    out = torchrun(2, "calibrl.py", *run_flags(tmp_path / "t", *model, "--eval-every", "1", "--eval-max-prompts", "3"))
    assert "world 2" in out and "step 2/2" in out
    common = [*model, "--eval-every", "1", "--eval-max-prompts", "4", "--save-every", "1"]
    straight = train(tmp_path / "a", *common, steps=2)
    train(tmp_path / "b", *common, steps=1)
    resumed = train(tmp_path / "b", "--resume", *common, steps=2)
    a, b = params(os.path.join(straight, "checkpoint-2")), params(os.path.join(resumed, "checkpoint-2"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    for k, v in run_metrics(straight)[2].items():
        if not k.startswith(WALL_CLOCK):
            assert abs(v - run_metrics(resumed)[2][k]) <= 1e-6, k

# infra/vllm_rollout.py: --rollout vllm (run in the vLLM venv: pytest -q test_calibrl.py -k vllm)

try:
    import vllm  # noqa: F401
    HAS_VLLM = True
except ImportError:
    HAS_VLLM = False
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (the vLLM venv: .ci/run)")
VLLM_ENV = {**CPU_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


@pytest.mark.skipif(HAS_VLLM, reason="checks the message when vLLM is missing")
def test_vllm_missing_is_one_line_before_the_model_loads(tmp_path):
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "o", "--rollout", "vllm", "--model", str(tmp_path / "no-such-model"), steps=1)
    msg = str(e.value)
    assert msg.startswith("error: --rollout vllm needs vLLM: pip install vllm") and "\n" not in msg, msg


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory):
    """The tiny head_dim-64 Qwen2 text LM, its generation_config.json carrying an Instruct model's
    sampling fields (repetition_penalty 1.05, top_k 1, top_p 0.001, temperature 0.1) that the
    sampler must ignore, and text rows."""
    d = tmp_path_factory.mktemp("vllm")
    bench_rollout().tiny_text_model(str(d / "m"), dict(repetition_penalty=1.05, top_k=1, top_p=0.001,
                                                       temperature=0.1, do_sample=True))
    rows = [{"prompt": f"What is {a} + {b}?", "answer": a + b,
             "solution": f"<think>{a} + {b} = {a + b}.</think><answer>{a + b}</answer>"}
            for a in range(4) for b in range(4)]
    return str(d / "m"), write_jsonl(d / "t.jsonl", rows)


@needs_vllm
def test_vllm_trains_evaluates_and_its_logprobs_are_pi_old(tmp_path, vllm_model):
    """3 steps of LUFFY (the expert row moves the weights every step) with evaluations: vLLM's
    log-prob of each sampled token equals pi_old at step 1 and, after two updates, at step 3 (the
    weight sync works), despite the folder's generation_config; the weights did move."""
    model, data = vllm_model
    flags_ = run_flags(tmp_path / "o", "--model", model, "--data", data, "--eval-data", data, "--preset", "demo",
                       "--rollout", "vllm", "--algo", "luffy", "--max-response-length", "24", "--eval-every", "2",
                       "--eval-max-prompts", "4", "--eval-samples", "2", steps=3)
    p = subprocess.run([sys.executable, "calibrl.py", *flags_], cwd=HERE, env=VLLM_ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = run_metrics(str(tmp_path / "o"))
    assert sorted(m) == [1, 2, 3]
    for step in (1, 3):
        print(f"step {step}: rollout/logprob_gap {m[step]['rollout/logprob_gap']:.2e}")
        assert m[step]["rollout/logprob_gap"] <= 1e-5, (step, m[step]["rollout/logprob_gap"])
        assert m[step]["time/weight_sync"] > 0
    lines = [json.loads(l) for l in open(tmp_path / "o" / "metrics.jsonl")]
    assert [l["step"] for l in lines if "eval/accuracy" in l] == [0, 2, 3]
    a, b = params(model), params(str(tmp_path / "o" / "checkpoint-3"))
    moved = max((a[k] - b["model." + k] if "model." + k in b else a[k] - b[k]).abs().max().item()
                for k in a if k in b or "model." + k in b)
    assert moved > 1e-4, f"the weights did not move ({moved:.1e}): the step-3 check would test nothing"


@needs_vllm
def test_vllm_two_ranks_sample_what_one_rank_samples(tmp_path, vllm_model):
    """Per-request seeds from (seed, step, global prompt index): 2 ranks (external_launcher, FSDP2, the
    sync through full_tensor) log the same non-clock metrics as 1 rank for 2 steps."""
    model, data = vllm_model
    runs = {}
    for n in (1, 2):
        f = run_flags(tmp_path / str(n), "--model", model, "--data", data, "--preset", "demo", "--rollout",
                      "vllm", "--algo", "luffy", "--max-response-length", "24", steps=2)
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else []
        p = subprocess.run([sys.executable, *cmd, "calibrl.py", *f], cwd=HERE, env=VLLM_ENV, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        runs[n] = run_metrics(str(tmp_path / str(n)))
    assert sorted(runs[2]) == [1, 2]
    for step in (1, 2):
        for k, v in runs[1][step].items():
            if not k.startswith(WALL_CLOCK):
                assert abs(v - runs[2][step][k]) <= 1e-6, (step, k, v, runs[2][step][k])


def vllm_expand(proc, tok, request):
    """What vLLM's multimodal processor makes of a request: the un-expanded ids as text, through the
    model's processor with the images (vLLM's replacement rules are the processor's own: Qwen2-VL's
    <|image_pad|> -> one per merged patch, interns1.py's <IMG_CONTEXT> -> <img> <IMG_CONTEXT> * n
    </img>) -> (1, n) ids. (vLLM's own Qwen2-VL processing needs torchvision, absent in vllm-cpu.)"""
    text = tok.decode(request["prompt_token_ids"])
    return proc(text=[text], images=request["multi_modal_data"]["image"], return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("kind", ["qwen2.5-vl", "internvl"])
def test_vllm_request_is_unexpanded_ids_and_images_and_a_length_mismatch_is_an_error(kind, request):
    """A VLM prompt goes to vLLM as its un-expanded ids (one placeholder an image, InternVL's <img> </img>
    dropped: vLLM adds them) plus the PIL images, and those expand back to exactly calibrl's encoding. A
    processor that expands differently (other image sizes; the wrap left in) is the clear length error."""
    from PIL import Image
    from infra import vllm_rollout
    path = calibrl.DEMO_MODEL if kind == "qwen2.5-vl" else request.getfixturevalue("internvl")
    model, proc, tok, is_vlm = calibrl.load_model(path, torch.float32, "cpu")
    img, wrap = model.config.image_token_id, family.of(model).image_wrap(tok)
    assert is_vlm and len(wrap) == (2 if kind == "internvl" else 0)
    exs = calibrl.load_examples(calibrl.DEMO_TRAIN, calibrl.parse_args([]), proc, tok, True, say=lambda *a: None)
    for ex in exs[:3]:
        enc = calibrl.encode_prompt(proc, ex, True, pil=True)
        assert "images" not in calibrl.encode_prompt(proc, ex, True)  # --rollout engine: no PIL images
        req = vllm_rollout.build_request(enc, img, wrap)
        ids = torch.tensor(req["prompt_token_ids"])
        n = len(ex["images"])
        assert (enc["input_ids"] == img).sum() > n  # the encoding is expanded ...
        assert (ids == img).sum() == n and not any((ids == w).any() for w in wrap)  # ... the request is not
        assert len(req["multi_modal_data"]["image"]) == n
        assert all(isinstance(i, Image.Image) for i in req["multi_modal_data"]["image"])
        again = vllm_expand(proc, tok, req)
        assert torch.equal(again, enc["input_ids"]), (again.shape, enc["input_ids"].shape)
        vllm_rollout.check_prompt_length(0, again.shape[1], enc["input_ids"].shape[1])
        # the wrap left in (InternVL), or a Qwen processor resizing to at least 4x the pixels: vLLM would
        # see another prompt than the one pi_old scores
        if kind == "internvl":
            wrong = vllm_expand(proc, tok, vllm_rollout.build_request(enc, img))
        else:
            px = [im.size[0] * im.size[1] for im in req["multi_modal_data"]["image"]]
            other = calibrl.load_model(path, torch.float32, "cpu")[1]
            other.image_processor.size = {"shortest_edge": 4 * max(px), "longest_edge": 16 * max(px)}
            assert vllm_rollout.processor_kwargs(other)["size"] == other.image_processor.size  # vLLM's copy
            wrong = other(text=[tok.decode(req["prompt_token_ids"])], images=req["multi_modal_data"]["image"],
                          return_tensors="pt")["input_ids"]
        want = enc["input_ids"].shape[1]
        assert wrong.shape[1] != want
        with pytest.raises(RuntimeError, match=f"prompt 3 is {wrong.shape[1]} tokens in vLLM but {want} in "
                                               "calibrl's encoding: the two processors differ"):
            vllm_rollout.check_prompt_length(3, wrong.shape[1], want)


VLLM_SAMPLER = r'''
"""calibrl.generate on vLLM against the engine, one model, the same prompts (argv: model, data, out)."""
import sys
import torch
import calibrl
from infra import vllm_rollout
model_path, data, out = sys.argv[1:4]
args = calibrl.parse_args(["--model", model_path, "--preset", "demo", "--max-response-length", "32",
                           "--temperature", "1.0"])
model, proc, tok, is_vlm = calibrl.load_model(model_path, torch.float32, "cpu")
model.eval()
policy = calibrl.Policy(model, args.temperature, tok.suppress_ids, False)
encs = [calibrl.encode_prompt(proc, ex, is_vlm, pil=True)
        for ex in calibrl.load_examples(data, args, proc, tok, is_vlm, say=lambda *a: None)[:8]]
res = {}
def both(name, n=1, greedy=True, key="eval"):  # the engine, then vLLM (its weights synced first)
    for args.rollout in ("engine", "vllm"):
        res[f"{name} {args.rollout}"] = calibrl.generate(policy, tok, encs, n, args, greedy, key=key).responses
policy.vllm = vllm_rollout.Engine(model_path, model, proc, tok, args, torch.float32, torch.device("cpu"))
both("greedy")
# an id made likely: its LM-head row along the mean final hidden state u, so h . w_X is 5 on average
X = res["X"] = proc.convert_tokens_to_ids("<|image_pad|>")
with torch.no_grad():
    u = torch.cat([model.model(e["input_ids"]).last_hidden_state[0] for e in encs]).mean(0)   # (H,)
    model.lm_head.weight[X] = 5 * u / u.norm() ** 2
for name, ids in (("free", []), ("suppressed", [X])):
    tok.suppress_ids = policy.suppress_ids = ids
    args.rollout = "vllm"
    for key in (1, 1, 2):  # step 1 twice (the same seeds), then step 2
        res.setdefault(f"{name} sampled", []).append(calibrl.generate(policy, tok, encs, 8, args, key=key).responses)
    both(name + " greedy")
polls = iter(range(10**9))  # a stop asked at the 4th check between vLLM's steps: the rest aborted
cut = calibrl.generate(policy, tok, encs, 8, args, interrupt=lambda: next(polls) >= 3, key=3)
res["cut"] = cut.interrupted, [len(r) for r in cut.responses], next(polls)
torch.save(res, out)
'''


@pytest.fixture(scope="module")
def vllm_sampled(vllm_model, tmp_path_factory):
    """VLLM_SAMPLER's results on the tiny model: greedy tokens of the engine and of vLLM, then with one id
    made likely, sampled (8 prompts x 8 x 32 tokens, T = 1) and greedy tokens, that id free or suppressed."""
    d = tmp_path_factory.mktemp("vllm_sampler")
    (d / "sampler.py").write_text(VLLM_SAMPLER)
    p = subprocess.run([sys.executable, str(d / "sampler.py"), *vllm_model, str(d / "out.pt")], cwd=HERE,
                       env=VLLM_ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return torch.load(d / "out.pt")


@needs_vllm
def test_vllm_greedy_tokens_are_the_engines_and_a_seed_gives_its_rollout(vllm_sampled):
    """vLLM's greedy tokens equal the engine's, token for token (fp32 on the CPU: the argmax never fell
    within float noise of a tie here); the same step samples the same tokens, another step others."""
    r = vllm_sampled
    for name in ("greedy", "free greedy", "suppressed greedy"):
        eng, vl = r[name + " engine"], r[name + " vllm"]
        same = sum(torch.equal(a, b) for a, b in zip(eng, vl))
        print(f"{name}: {same}/{len(eng)} responses identical, {sum(map(len, eng))} tokens")
        assert same == len(eng) == 8, [(a.tolist(), b.tolist()) for a, b in zip(eng, vl) if not torch.equal(a, b)]
    assert len(set(torch.cat(r["greedy engine"]).tolist())) > 10  # not one token repeated
    first, again, other = r["free sampled"]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert sum(torch.equal(a, b) for a, b in zip(first, other)) == 0


@needs_vllm
def test_vllm_never_samples_a_suppressed_id_that_it_samples_when_free(vllm_sampled):
    """The SuppressIds logits processor: an id given ~10% of the tokens (and every greedy argmax) by its
    LM-head row is never sampled once it is in tok.suppress_ids, greedy included."""
    r, X = vllm_sampled, vllm_sampled["X"]
    free, supp = torch.cat(r["free sampled"][0]), torch.cat(r["suppressed sampled"][0])
    print(f"id {X}: {(free == X).float().mean():.1%} of {len(free)} tokens free, "
          f"{int((supp == X).sum())} of {len(supp)} suppressed")
    assert (free == X).float().mean() > 0.05 and (torch.cat(r["free greedy vllm"]) == X).all()
    assert (supp == X).sum() == 0 and (torch.cat(r["suppressed greedy vllm"]) == X).sum() == 0


@needs_vllm
def test_vllm_a_stop_between_steps_aborts_the_rest_of_the_rollout(vllm_sampled):
    """interrupt() is asked between vLLM's engine steps: asked to stop at the 4th, the rollout comes back
    interrupted after 3 steps, with at most 3 tokens in any response (of 32) and the rest aborted."""
    interrupted, lengths, polls = vllm_sampled["cut"]
    print(f"interrupted {interrupted}, {polls} checks, response lengths {sorted(set(lengths))}")
    assert interrupted and polls == 4 and len(lengths) == 64 and max(lengths) <= 3


def vllm_flags(out, model, data, *more, steps):
    return run_flags(out, "--model", model, "--data", data, "--preset", "demo", "--rollout", "vllm", "--algo",
                     "luffy", "--max-response-length", "24", *more, steps=steps)


def vllm_run(argv, timeout=300):
    p = subprocess.run([sys.executable, "calibrl.py", *argv], cwd=HERE, env=VLLM_ENV, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


@needs_vllm
def test_vllm_resume_is_exact(tmp_path, vllm_model):
    """4 steps straight against 2 + --resume to 4 (three processes, three vLLM engines): the checkpoints'
    weights to 1e-6 and every non-clock metric of steps 3 and 4 (the request seeds come from the step)."""
    straight, cut = tmp_path / "a", tmp_path / "b"
    vllm_run(vllm_flags(straight, *vllm_model, "--save-every", "2", steps=4))
    vllm_run(vllm_flags(cut, *vllm_model, "--save-every", "2", steps=2))
    vllm_run(vllm_flags(cut, *vllm_model, "--save-every", "2", "--resume", steps=4))
    a, b = params(str(straight / "checkpoint-4")), params(str(cut / "checkpoint-4"))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    ma, mb = run_metrics(str(straight)), run_metrics(str(cut))
    worst = max(abs(v - mb[s][k]) for s in (3, 4) for k, v in ma[s].items() if not k.startswith(WALL_CLOCK))
    print(f"resume: weights max |diff| {diff:.1e}, metrics of steps 3-4 max |diff| {worst:.1e}")
    assert diff <= 1e-6, diff
    assert sorted(mb) == [1, 2, 3, 4]
    for step in (3, 4):
        for k, v in ma[step].items():
            if not k.startswith(WALL_CLOCK):
                assert abs(v - mb[step][k]) <= 1e-6, (step, k, v, mb[step][k])


@needs_vllm
def test_vllm_sigterm_in_a_rollout_checkpoints_the_steps_start_and_exits_0(tmp_path, vllm_model):
    """A stop in the middle of step 2's vLLM rollout (32 responses of up to 400 tokens at temperature 2: a
    rollout of seconds) aborts its requests (the test above), writes checkpoint-1 (the state before step 2)
    and exits 0 within torchrun's 30 s grace; --resume then runs step 2."""
    import signal
    import time
    argv = vllm_flags(tmp_path, *vllm_model, "--group-size", "8", "--temperature", "2", "--max-response-length",
                      "400", steps=3)
    log = open(tmp_path.parent / "sigterm.log", "w+")  # a file: vLLM's logging would fill a pipe and block
    p = subprocess.Popen([sys.executable, "calibrl.py", *argv], cwd=HERE, env=VLLM_ENV, stdout=log,
                         stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    try:
        with deadline(240):
            while not (metrics.exists() and '"step": 1,' in metrics.read_text()):
                time.sleep(0.1)
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)                 # step 2's rollout has begun
        t0 = time.time()
        p.wait(timeout=120)
    finally:
        p.kill()
    log.seek(0)
    out = log.read()
    waited, rollout_s = time.time() - t0, run_metrics(str(tmp_path))[1]["time/rollout"]
    print(f"exit {p.returncode} {waited:.1f} s after the signal; step 1's rollout took {rollout_s:.1f} s")
    assert p.returncode == 0, out[-3000:]
    assert "stopped by signal in step 2" in out and "checkpoint-1" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert [s for s, _ in checkpoints.checkpoints(str(tmp_path))] == [1]
    assert sorted(run_metrics(str(tmp_path))) == [1]
    assert waited < 30, "not within torchrun's grace before its SIGKILL"
    vllm_run([*argv[:argv.index("--steps") + 1], "2", *argv[argv.index("--steps") + 2:], "--resume"])
    assert sorted(run_metrics(str(tmp_path))) == [1, 2]


@needs_vllm
def test_vllm_temperature_above_2_is_one_line_before_the_model_loads(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --rollout vllm: --temperature 3.0 > 2, vLLM's largest"):
        train(tmp_path / "o", "--rollout", "vllm", "--temperature", "3", "--model", str(tmp_path / "none"), steps=1)
