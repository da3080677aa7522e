"""Tests for calibrl.py: the spec's test vectors, gradients, reward rules, data and end-to-end runs.

    python -m pytest -q test_calibrl.py          # ~N minutes on 2 CPU cores
"""
import json
import math
import os

import pytest
import torch

import calibrl
from calibrl import group_advantages, policy_loss, reward_fn

D = torch.float64

def close(a, b, tol, what=""):
    a, b = torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D)
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"{what}: max |diff| = {diff:.3e} > {tol:.1e}\n got {a}\n want {b}"

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
    acc = r >= 1.0  # passed <=> accuracy 1, never r > 0.1 in float32
    assert acc.tolist() == [True] * 3 + [False] * 7
    assert (torch.tensor([0.1], dtype=torch.float32).double() > 0.1).item()  # the trap the spec warns about

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
])
def test_reward_rules(response, gt, want):
    assert reward_fn(response, gt) == want

# -----------------------------------------------------------------------------
# Configuration and data

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
    assert [calibrl.open_image(r).size for r in exs[0]["images"]] == [(28, 28), (28, 28)]
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
    assert calibrl.open_image(exs[0]["images"][0]).size == (28, 28)

def test_prompt_stream_cycles_and_reshuffles():
    s = calibrl.PromptStream(5, seed=0)
    first = s.take(3) + s.take(3) + s.take(4)   # 10 = two epochs of 5
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:]) == list(range(5))
    assert first[:5] != first[5:]
    assert calibrl.PromptStream(5, 0).take(12)[:10] == first   # deterministic; small data is reused

# -----------------------------------------------------------------------------
# End to end on the tiny model (in-process: an interpreter start costs ~7 s)

E2E = ["--steps", "2", "--prompts-per-step", "4", "--mini-batch-prompts", "2", "--group-size", "4",
       "--micro-batch-size", "6", "--eval-every", "0"]

@pytest.mark.parametrize("algo", ["calibrl", "grpo", "luffy", "rlplus"])
def test_two_steps_each_algo(algo, tmp_path):
    out = calibrl.main(E2E + ["--algo", algo, "--output-dir", str(tmp_path)])
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [l["step"] for l in lines] == [1, 2]
    for l in lines:
        assert all(math.isfinite(v) for v in l.values())
        assert l["loss/ratio_first_dev"] < 1e-5   # pi_theta / pi_old == 1 on the first update
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(os.path.join(out, "checkpoint-2"))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert calibrl.load_processor(os.path.join(out, "checkpoint-2"), model.config).image_processor is not None

# -----------------------------------------------------------------------------
# Distributed (torchrun, FSDP2 on gloo), resume and signals

import subprocess
import sys

import safetensors.torch

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"}

def torchrun(n, *argv, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *argv]
    p = subprocess.run(cmd, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout

def params(ckpt):
    return safetensors.torch.load_file(os.path.join(ckpt, "model.safetensors"))

def test_torchrun_two_ranks_trains_and_checkpoints(tmp_path):
    out = torchrun(2, "calibrl.py", *E2E, "--eval-every", "1", "--eval-max-prompts", "4", "--output-dir", str(tmp_path))
    assert "world 2" in out and "step    2" in out
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
out = sys.argv[1]
rank, world, device = calibrl.setup_distributed()
result = {}
for algo in ("calibrl", "luffy"):
    args = calibrl.parse_args(["--algo", algo, "--group-size", "4", "--prompts-per-step", "4", "--mini-batch-prompts", "2",
                               "--micro-batch-size", "3", "--lr", "1e-4"])
    args.fused_on = False
    model, proc, tok, is_vlm = calibrl.load_model(calibrl.DEMO_MODEL, torch.float32, device)
    policy = calibrl.Policy(model)
    if torch.distributed.is_initialized():
        calibrl.shard(policy, torch.float32, device)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    data = calibrl.load_examples(calibrl.DEMO_TRAIN, args, proc, tok, is_vlm)[:4]
    mine = list(range(4))[rank::world]                  # main()'s strided shard
    encs = [calibrl.encode_prompt(proc, data[p], is_vlm) for p in mine]
    rows = []
    for local, p in enumerate(mine):                    # responses depend on the global prompt only
        g = torch.Generator().manual_seed(p)
        sol, ans = data[p]["solution"], data[p]["answer"]
        texts = [sol, "<think>no</think><answer>%d</answer>" % (int(ans) + 1), "<think>x", sol]
        for j in range(4):
            ids = tok(texts[int(torch.randint(0, 4, (1,), generator=g))], add_special_tokens=False)["input_ids"]
            rows.append(dict(prompt=local, resp=torch.tensor(ids + [tok.eos_id]), expert=False))
        rows.append(dict(prompt=local, resp=torch.tensor(tok(sol, add_special_tokens=False)["input_ids"] + [tok.eos_id]), expert=True))
    for r in rows:
        r["acc"], r["fmt"] = calibrl.reward_fn(tok.decode(r["resp"], skip_special_tokens=True), data[mine[r["prompt"]]]["answer"])
        r["reward"] = r["acc"] + 0.1 * r["fmt"]
    calibrl.score_rows(policy, encs, rows, args, device, tok.pad_id, rows[0])
    calibrl.update(policy, opt, sched, encs, calibrl.attach_advantages(rows, args), args, device, tok.pad_id, world)
    for n, p in policy.named_parameters():
        result[algo + ":" + n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
if rank == 0:
    torch.save(result, out)
'''

def test_update_is_independent_of_the_number_of_ranks(tmp_path):
    script = tmp_path / "fixed_update.py"
    script.write_text(FIXED_ROLLOUT_UPDATE)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], cwd=HERE, env=ENV, check=True, capture_output=True)
    torchrun(2, str(script), str(tmp_path / "two.pt"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    init = params(calibrl.DEMO_MODEL)
    moved = max((one[k] - two[k]).abs().max().item() for k in one)
    assert moved <= 1e-5, f"1 vs 2 ranks: max |diff| = {moved:.2e}"
    assert any((v - init[k.split(":model.", 1)[1]]).abs().max() > 1e-5 for k, v in one.items()
               if k.split(":model.", 1)[1] in init), "the update changed nothing"

def run_metrics(d):
    return {l["step"]: l for l in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if "train/reward" in l}

def test_resume_is_exact(tmp_path):
    common = E2E[2:] + ["--eval-every", "1", "--eval-max-prompts", "4", "--save-every", "2"]
    straight = calibrl.main(["--steps", "4", "--output-dir", str(tmp_path / "a")] + common)
    calibrl.main(["--steps", "2", "--output-dir", str(tmp_path / "b")] + common)
    resumed = calibrl.main(["--steps", "4", "--resume", "--output-dir", str(tmp_path / "b")] + common)
    a, b = params(os.path.join(straight, "checkpoint-4")), params(os.path.join(resumed, "checkpoint-4"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ma, mb = run_metrics(straight), run_metrics(resumed)
    assert sorted(mb) == [1, 2, 3, 4]
    for step in (3, 4):
        for k, v in ma[step].items():
            if not k.startswith(("time/", "perf/")):
                assert abs(v - mb[step][k]) <= 1e-6, (step, k, v, mb[step][k])

def test_refuses_another_runs_output_dir(tmp_path):
    calibrl.main(E2E[:1] + ["1"] + E2E[2:] + ["--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--resume"):
        calibrl.main(E2E + ["--output-dir", str(tmp_path)])

def test_sigterm_checkpoints_and_resumes(tmp_path):
    import signal
    import time
    argv = [sys.executable, "calibrl.py"] + E2E[2:] + ["--steps", "200", "--output-dir", str(tmp_path)]
    p = subprocess.Popen(argv, cwd=HERE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)        # lands in the middle of step 2 or so
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    assert "stopped by signal" in out and "Traceback" not in out
    (step, ckpt), = calibrl.checkpoints(str(tmp_path))
    assert step < 200
    calibrl.main(E2E[2:] + ["--steps", str(step + 1), "--resume", "--output-dir", str(tmp_path)])
    assert sorted(run_metrics(str(tmp_path))) == list(range(1, step + 2))
