"""
infra/data.py -- the data: .parquet or .jsonl rows -> examples {messages, images, answer,
solution}, every row checked before the first step, and the order a run takes them in.

Bad input gets one report before anything runs: the file, each bad row (numbered from 1, in file
order) and its field, then exit 1 (or, with --skip-bad-rows, the rest). Apart from calibrl.py
because a reader of the algorithm needs only the schema (README, "Data"); the checks are here.
A row's prompt length is checked against the rollout budget (engine.too_long) at this point, so
a prompt that cannot fit a rollout call fails now, not hours into a run.
"""
import io
import json
import os

import torch

from infra import engine

class BadRow(Exception):
    """A row problem: (field, reason)."""


def read_rows(path):
    """-> [(row number from 1, in file order; row dict or BadRow)]. A file that cannot be read at
    all ends the run with one message; a line that is not JSON (or not UTF-8) is one bad row."""
    where = f"data file {path}"
    if os.path.isdir(path):
        raise SystemExit(f"error: {where}: is a folder (give a .parquet or .jsonl file)")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {where}: not found")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".parquet", ".jsonl", ".json"):
        raise SystemExit(f"error: {where}: unknown format '{ext}' (use .parquet or .jsonl: one "
                         "JSON object per line)")
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq
            rows = list(enumerate(pq.read_table(path).to_pylist(), 1))
        else:
            with open(path, "rb") as f:
                rows = [(n, _json_row(line)) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {where}: unreadable ({type(e).__name__}: {e})")
    if not rows:
        raise SystemExit(f"error: {where}: no rows")
    return rows


def _json_row(line):
    """One line of a .jsonl file (bytes) -> the row, or a BadRow saying why not."""
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return BadRow("json", f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
    except json.JSONDecodeError as e:
        return BadRow("json", f"invalid JSON ({e.msg} at column {e.colno})")


def to_parts(text):
    """'<image>What is x?' -> [{'type': 'image'}, {'type': 'text', 'text': 'What is x?'}]"""
    parts = []
    for i, piece in enumerate(text.split("<image>")):
        if i > 0:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def parse_row(row, args, base_dir):
    """A row of the schema (README) -> {messages, images, answer, solution}; raises BadRow.
    messages are chat messages whose content is a list of parts, one {'type': 'image'} per image."""
    if not isinstance(row, dict):
        raise BadRow("row", "not a JSON object")
    prompt, images = row.get("prompt"), row.get("images")
    if images is None:
        images = []
    if not isinstance(images, (list, tuple)):
        raise BadRow("images", f"not a list ({type(images).__name__})")
    if not prompt:
        raise BadRow("prompt", "missing or empty")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    chat = isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt)
    if not chat:
        raise BadRow("prompt", "neither a string nor a list of chat messages {role, content}")
    messages = [_message(m, k) for k, m in enumerate(prompt)]
    if not any(m["role"] == "user" for m in messages):
        raise BadRow("prompt", "no user message (the question goes in one)")
    placeholders = sum(p.get("type") == "image" for m in messages for p in m["content"])
    if placeholders and placeholders != len(images):
        raise BadRow("prompt", f"{placeholders} <image> placeholders for {len(images)} images")
    if images and not placeholders:  # images without placeholders go before the first user text
        user = next(m for m in messages if m["role"] == "user")
        user["content"] = [{"type": "image"} for _ in images] + user["content"]
    refs = []
    for k, im in enumerate(images):
        if isinstance(im, dict) and im.get("bytes") is not None:
            refs.append({"bytes": im["bytes"]})
        elif isinstance(im, (str, dict)) and (im if isinstance(im, str) else im.get("path")):
            refs.append({"path": os.path.join(base_dir, im if isinstance(im, str) else im["path"])})
        else:
            raise BadRow(f"images[{k}]", "neither a path nor a {bytes} / {path} dict")
    key = args.answer_key
    answer = row.get(key)
    if key is None:  # verl's field wins over `answer`: the official reward reads only it
        verl = row.get("reward_model")
        answer = verl.get("ground_truth") if isinstance(verl, dict) else None
        key = "reward_model.ground_truth"
        if answer is None:
            answer, key = row.get("answer"), "answer"
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise BadRow(key, "missing or empty (neither reward_model.ground_truth nor answer)")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise BadRow(key, f"wrong type ({type(answer).__name__}; a string or a number)")
    solution = row.get(args.solution_key)
    if isinstance(solution, (list, tuple)):
        solution = solution[0] if solution else None
    if isinstance(solution, dict):
        solution = solution.get("content")
    if solution is not None and not isinstance(solution, str):
        raise BadRow(args.solution_key, f"neither a string, a list nor a message "
                                        f"({type(solution).__name__})")
    if isinstance(row.get("pass_ratio"), (int, float)) and row["pass_ratio"] <= 0:
        solution = None  # the official data format: no expert for this row
    return dict(messages=messages, images=refs, answer=str(answer), solution=solution or None)


ROLES = ("system", "user", "assistant")


def _message(m, k):
    """A chat message of a row -> {role, content: [parts]}; raises BadRow naming what is wrong."""
    role, content = m.get("role", "user"), m["content"]
    if role not in ROLES:
        raise BadRow("prompt", f"message {k + 1}: unknown role {role!r} "
                               f"(one of {', '.join(ROLES)})")
    if isinstance(content, str):
        return {"role": role, "content": to_parts(content)}
    parts = isinstance(content, list) and all(isinstance(p, dict) and "type" in p for p in content)
    if not parts:
        what = type(content).__name__ if not isinstance(content, list) else "a list of non-parts"
        raise BadRow("prompt", f"message {k + 1}: content of the wrong type ({what}; a string or a "
                               "list of parts {type: text | image})")
    return {"role": role, "content": list(content)}


def open_image(ref):
    from PIL import Image
    im = Image.open(io.BytesIO(ref["bytes"]) if ref.get("bytes") is not None else ref["path"])
    return im.convert("RGB")


def read_examples(path, args, tok, is_vlm, prepare, say=print, train=True):
    """Read and check every row before the first step. prepare(example) finishes the prompt (the
    caller's prompt builder) and returns its length in tokens. With bad rows: one message naming the
    file, each row and field, then exit 1 (nothing has run yet); with --skip-bad-rows, the rest.
    The expert's rules (a solution under LUFFY / RL-PLUS, its length) apply to training rows
    only."""
    base, good, bad, no_expert = os.path.dirname(os.path.abspath(path)), [], [], 0
    for n, row in read_rows(path):
        try:
            if isinstance(row, BadRow):
                raise row
            if not train and isinstance(row, dict):  # validation rows have no expert
                row = {**row, args.solution_key: None}
            ex = parse_row(row, args, base)
            if ex["images"] and not is_vlm:
                raise BadRow("images", "the model is text-only and takes no images")
            for k, ref in enumerate(ex["images"]):
                try:
                    open_image(ref)
                except Exception as e:
                    why = f"cannot be read as an image ({type(e).__name__}: {e})"
                    raise BadRow(f"images[{k}]", why[:200])
            try:  # the processor refuses some images (an aspect ratio over 200, say)
                n_prompt = prepare(ex)
            except (ValueError, TypeError, KeyError) as e:
                why = f"the processor refuses it ({type(e).__name__}: {str(e).splitlines()[0]})"
                raise BadRow("images" if ex["images"] else "prompt", why[:200])
            if n_prompt > args.max_prompt_length:
                raise BadRow("prompt", f"{n_prompt} tokens > --max-prompt-length "
                                       f"{args.max_prompt_length}")
            k = args.group_size if train else max(args.eval_samples, 1)  # samples per prompt
            if engine.too_long([n_prompt], k, args.max_response_length, args.rollout_max_tokens):
                need = engine.call_tokens(n_prompt, k, args.max_response_length)
                raise BadRow("prompt", f"{n_prompt} tokens need {need} KV positions with {k} "
                             f"samples of --max-response-length {args.max_response_length} > "
                             f"--rollout-max-tokens {args.rollout_max_tokens}")
            if train and ex["solution"] is None and args.algo in ("luffy", "rlplus"):
                raise BadRow(args.solution_key, f"missing: --algo {args.algo} needs an expert "
                                                "solution")
            if ex["solution"] is not None:
                ids = tok(ex["solution"], add_special_tokens=False)["input_ids"]
                if len(ids) + 1 > args.max_response_length:  # + the end-of-turn token
                    limit = args.max_response_length
                    raise BadRow(args.solution_key, f"{len(ids) + 1} tokens > "
                                                    f"--max-response-length {limit}")
            no_expert += ex["solution"] is None
            good.append(ex)
        except BadRow as e:
            bad.append(f"row {n}, field '{e.args[0]}': {e.args[1]}")
    if bad and not args.skip_bad_rows:
        more = f"\n  ... and {len(bad) - 20} more bad rows" if len(bad) > 20 else ""
        raise SystemExit(f"error: data file {path} has {len(bad)} bad rows (fix them, or pass "
                         "--skip-bad-rows to train on the rest):\n  " + "\n  ".join(bad[:20])
                         + more)
    if bad:
        say(f"warning: {path}: skipped {len(bad)} bad rows of {len(bad) + len(good)}:\n  "
            + "\n  ".join(bad[:20]))
    if not good:
        raise SystemExit(f"error: data file {path}: no usable rows")
    if train and no_expert and args.algo == "calibrl":  # spec decision 3: l^E = 0 for these prompts
        say(f"warning: {path}: {no_expert} of {len(good)} rows have no expert solution "
            "(l^E = 0 for them)")
    return good


class PromptStream:
    """Epochs over the data, reshuffled with the seed each epoch or in file order (shuffle=False,
    the official run). A step never spans two epochs: an epoch's last partial batch is dropped,
    like verl's drop_last, so one epoch is n // k steps. State: (epoch, pos)."""
    def __init__(self, n, seed, shuffle=True):
        self.n, self.seed, self.shuffle, self.epoch, self.pos = n, seed, shuffle, 0, 0

    def take(self, k):
        if self.pos + k > self.n:  # what is left of this epoch is short of a step
            self.epoch, self.pos = self.epoch + 1, 0
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        self.pos += k
        return order[self.pos - k:self.pos].tolist()
