"""Build the CalibRL CPU demo: a visual counting task and a tiny, warm-started Qwen2.5-VL.

What it writes (all deterministic, seeded):
  data/demo/train.jsonl, data/demo/val.jsonl   rows {"prompt", "images", "answer", "solution"}
  data/demo/images/*.png                        56x56 images, paths relative to the jsonl files
  data/tiny-qwen2.5-vl/                         a real Qwen2_5_VLForConditionalGeneration (~0.2M
                                                parameters) in save_pretrained layout, with a
                                                locally trained byte-level BPE tokenizer holding
                                                Qwen's special tokens, Qwen2-VL's chat template
                                                and a PIL image processor (no torchvision needed)

The task: a 56x56 image is a 2x2 grid of 28x28 cells (one visual token per cell after Qwen's
14-px patches and 2x2 merge); 1-4 cells hold a coloured square. The question asks for the number
of squares plus a number given in the text, e.g. solution
"<think>I count 2 squares. 2 + 3 = 5.</think><answer>5</answer>".

The saved weights are a warm start, right some of the time and wrong some of the time: supervised
cross-entropy on the expert solutions (response tokens only) of the first half of the train split,
first for the whole model until it is nearly perfect, then, with a freshly initialised vision tower,
for the vision tower alone until sampled accuracy on a probe of other train problems passes ~0.35.
The format, copying and arithmetic stay sharp; most errors are wrong counts (reading the image),
which is what RL has to fix.

The prompt (the instruction included), its encoding, the trainer's batch layout and the reward
come from calibrl.py / infra/, so the warm start sees exactly what the trainer will.

Run:  python data/make_demo.py            (a few minutes on 2 CPU cores)
      python data/make_demo.py --out DIR  (the same into DIR/demo and DIR/tiny-qwen2.5-vl)
Also used by tests: tiny_config_model(kind, out_dir).
"""
import io
import json
import math
import os
import random
import sys
import time

import torch
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoTokenizer, GenerationConfig, GotOcr2ImageProcessorPil, InternVLConfig,
                          InternVLForConditionalGeneration, InternVLProcessor, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2Config,
                          Qwen2ForCausalLM, Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          Qwen2VLImageProcessorPil, Qwen2VLProcessor)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import calibrl  # noqa: E402  (the trainer: prompt, encoding, batch layout, reward)
from infra import dataset, family  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_DIR = os.path.join(HERE, "demo")
MODEL_DIR = os.path.join(HERE, "tiny-qwen2.5-vl")
SEED, N_TRAIN, N_VAL = 1234, 2000, 200


# Qwen2-VL's special tokens (same names and order as the real vocabulary's added tokens).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL / Qwen2.5-VL's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
# InternVL3's layout: the processor expands each <IMG_CONTEXT> into <img>, image_seq_length <IMG_CONTEXT> per tile,
# </img>; the demo's ChatML otherwise.
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}
INTERNVL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n").replace(
    "<|vision_start|><|video_pad|><|vision_end|>", "<video>\n")
# Text-only ChatML template for the text test model; accepts string or list-of-parts content.
TEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ----------------------------------------------------------------------------- prompt format
def example(row, base_dir):
    """A demo row -> the trainer's example: chat messages with the instruction, image paths."""
    messages = calibrl.with_instruction([{"role": "user", "content": dataset.to_parts(row["prompt"])}])
    return dict(messages=messages, images=[{"path": os.path.join(base_dir, p)} for p in row["images"]])


def encode(proc, rows, base_dir):
    """Demo rows -> their prompt encodings, as the trainer makes them."""
    return [calibrl.encode_prompt(proc, example(r, base_dir), is_vlm=True) for r in rows]


# ----------------------------------------------------------------------------- processor
class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without a video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without a video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVL's processor without a video processor (which needs torchvision); image_seq_length named, so that it
    is saved and reloaded (infra/family.load_processor does the same for any model folder)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)


def save_processor(proc, path):
    """save_pretrained, but record the stock class name (Qwen2_5_VLProcessor / Qwen2VLProcessor) and add the
    legacy preprocessor_config.json (which AutoVideoProcessor falls back to, as for the released Qwen checkpoints),
    so that AutoProcessor on an install with torchvision treats the directory like a real Qwen checkpoint."""
    proc.save_pretrained(path)
    proc.image_processor.save_pretrained(path)
    stock = type(proc).__mro__[1].__name__
    for name in ("processor_config.json", "tokenizer_config.json"):
        with open(os.path.join(path, name)) as f:
            cfg = json.load(f)
        cfg["processor_class"] = stock
        for key in ("is_local", "local_files_only"):  # machine-specific load flags, not config
            cfg.pop(key, None)
        with open(os.path.join(path, name), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")


# ----------------------------------------------------------------------------- task
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "orange": (240, 150, 30)}
CELLS = [(0, 0), (28, 0), (0, 28), (28, 28)]  # (x, y) of the four 28x28 cells


def make_problem(rng):
    """One problem: (drawing spec, question, answer, solution)."""
    count, add = rng.randint(1, 4), rng.randint(1, 5)
    squares = []
    for cx, cy in sorted(rng.sample(CELLS, count)):
        side = rng.randint(14, 20)
        x, y = cx + rng.randint(2, 26 - side), cy + rng.randint(2, 26 - side)
        squares.append((x, y, side, rng.choice(sorted(COLORS))))
    question = f"How many squares are in the image? Add {add} to that number."
    answer = str(count + add)
    s = "square" if count == 1 else "squares"
    solution = f"<think>I count {count} {s}. {count} + {add} = {answer}.</think><answer>{answer}</answer>"
    return squares, question, answer, solution


def draw(squares):
    img = Image.new("RGB", (56, 56), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for x, y, side, color in squares:
        d.rectangle([x, y, x + side - 1, y + side - 1], fill=COLORS[color])
    return img


def generate_splits():
    """Deterministic problems for both splits (no files written)."""
    rng = random.Random(SEED)
    return {name: [make_problem(rng) for _ in range(n)] for name, n in (("train", N_TRAIN), ("val", N_VAL))}


def write_atomic(path, data):
    """Write bytes via a temporary file + rename, so a concurrent reader never sees a partial file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_splits(splits):
    os.makedirs(os.path.join(DEMO_DIR, "images"), exist_ok=True)
    rows = {}
    for name, problems in splits.items():
        rows[name] = []
        for i, (squares, question, answer, solution) in enumerate(problems):
            rel = f"images/{name}_{i:04d}.png"
            buf = io.BytesIO()
            draw(squares).save(buf, format="PNG", optimize=True)
            write_atomic(os.path.join(DEMO_DIR, rel), buf.getvalue())
            rows[name].append({"prompt": "<image>" + question, "images": [rel], "answer": answer, "solution": solution})
        lines = "".join(json.dumps(r) + "\n" for r in rows[name])
        write_atomic(os.path.join(DEMO_DIR, f"{name}.jsonl"), lines.encode())
    return rows


def save_model_dir(model, proc, path):
    """save_pretrained into a temporary directory, then move the files in one by one (each atomically)."""
    tmp = f"{path}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    save_processor(proc, tmp)
    os.makedirs(path, exist_ok=True)
    for name in sorted(os.listdir(tmp)):
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
    os.rmdir(tmp)


# ----------------------------------------------------------------------------- tokenizer + models
def train_tokenizer(splits, vocab_size=600):
    """Byte-level BPE (Qwen2's pre-tokenizer: digits split one by one) trained on the demo texts."""
    texts = [CHAT_TEMPLATE, TEXT_CHAT_TEMPLATE, calibrl.INSTRUCTION, "You are a helpful assistant.", "system user assistant"]
    texts += [q + " " + s for problems in splits.values() for _, q, _, s in problems]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    hf = Qwen2Tokenizer(vocab=bpe["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                        unk_token=None)
    hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    assert [hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return hf


def token_ids(tok):
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])


def text_config_dict(tok, hidden=64, layers=2):
    t = token_ids(tok)
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=t["bos_token_id"], eos_token_id=t["eos_token_id"], pad_token_id=t["pad_token_id"])


def generation_config(tok):
    t = token_ids(tok)
    return GenerationConfig(bos_token_id=t["bos_token_id"], pad_token_id=t["pad_token_id"],
                            eos_token_id=[t["eos_token_id"], t["pad_token_id"]])


def tiny_qwen2_5_vl(tok):
    t = token_ids(tok)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=text_config_dict(tok), vision_config=vision, **{
        k: t[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")})
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config = generation_config(tok)
    return model


def make_image_processor():
    # One 56x56 demo image -> a 4x4 patch grid -> 4 visual tokens.
    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)


def tiny_config_model(kind, out_dir):
    """Randomly initialised tiny test model sharing the demo tokenizer, saved (with its processor) to out_dir.
    kind "qwen2_vl": Qwen2VLForConditionalGeneration + image-only processor (same image processor and chat
    template as the demo model); kind "text": Qwen2ForCausalLM + tokenizer with a text-only ChatML template;
    kind "internvl": InternVLForConditionalGeneration (transformers' InternVL3 -hf layout: a 2-layer InternViT of width
    32, 56 px tiles of 4 <IMG_CONTEXT> features, a 2-layer Qwen2 of width 64; ~0.16M parameters) with the demo
    tokenizer plus <img>, </img>, <IMG_CONTEXT>, <video> and an image-only InternVL processor;
    kind "internvl3-2b": the same at InternVL3-2B's sizes (random, bf16), for the GPU check (--random-internvl3-2b DIR);
    kind "qwen2.5-vl-3b": Qwen2.5-VL-3B's configuration (3.75B parameters, bf16, no download) with the demo's
    tokenizer and processor, for the GPU check (python data/make_demo.py --random-3b DIR).
    Returns (model, processor_or_tokenizer)."""
    torch.manual_seed(0)
    tok = train_tokenizer(generate_splits())
    t = token_ids(tok)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = Qwen2VLConfig(text_config=text_config_dict(tok), vision_config=vision, **{
            k: t[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")})
        model = Qwen2VLForConditionalGeneration(cfg)
        proc = ImageOnlyQwen2VLProcessor(image_processor=make_image_processor(), tokenizer=tok,
                                         chat_template=CHAT_TEMPLATE)
    elif kind == "qwen2.5-vl-3b":  # Qwen2.5-VL-3B-Instruct's sizes (its config.json), random weights
        text = dict(text_config_dict(tok), vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                    num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **{
            k: t[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")})
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialise where it is fast
            model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)
        proc = ImageOnlyQwen2_5_VLProcessor(image_processor=make_image_processor(), tokenizer=tok,
                                            chat_template=CHAT_TEMPLATE)
    elif kind in ("internvl", "internvl3-2b"):
        # the demo tokenizer plus InternVL's image-structure tokens, as the -hf checkpoints' tokenizers carry them
        tok.save_pretrained(out_dir)
        tok = AutoTokenizer.from_pretrained(out_dir, extra_special_tokens=INTERNVL_TOKENS)
        text = dict(text_config_dict(tok), rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        # one 56 px tile -> 4x4 patches -> pixel shuffle (0.5) -> 2x2 = 4 <IMG_CONTEXT> features; up to 4 tiles and a
        # thumbnail for a larger image
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56,
                      patch_size=14)
        tile, seq = 56, 4
        if kind == "internvl3-2b":  # InternVL3-2B's sizes: InternViT-300M + Qwen2.5-1.5B, 448 px tiles of 256 tokens
            text.update(vocab_size=151674, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
            vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                          image_size=448, patch_size=14)
            tile, seq = 448, 256
        cfg = InternVLConfig(text_config=dict(text, model_type="qwen2"), vision_config=vision, image_seq_length=seq,
                             image_token_id=tok.context_image_token_id, downsample_ratio=0.5,
                             vision_feature_layer=-1, vision_feature_select_strategy="default",
                             tie_word_embeddings=kind == "internvl")  # InternVL3-2B: an untied head, 2.1B in all
        with torch.device("cuda" if kind == "internvl3-2b" and torch.cuda.is_available() else "cpu"):
            model = InternVLForConditionalGeneration(cfg)
        if kind == "internvl3-2b":
            model = model.to(torch.bfloat16)
        image_processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True,
                                                   min_patches=1, max_patches=4 if tile == 56 else 12,
                                                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        proc = ImageOnlyInternVLProcessor(image_processor=image_processor, tokenizer=tok, image_seq_length=seq,
                                          chat_template=INTERNVL_CHAT_TEMPLATE)
    elif kind == "text":
        cfg = text_config_dict(tok)
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))
        tok.chat_template = TEXT_CHAT_TEMPLATE
        proc = tok
    else:
        raise ValueError(f"unknown kind {kind!r}")
    model.generation_config = generation_config(tok)
    model.save_pretrained(out_dir)
    if kind == "text":
        proc.save_pretrained(out_dir)
    else:
        save_processor(proc, out_dir)
    return model, proc


# ----------------------------------------------------------------------------- warm start
def check_processor(proc, row):
    """One demo image -> 16 patches (grid 1x4x4) -> 4 <|image_pad|> tokens inside vision_start/end."""
    inp = encode(proc, [row], DEMO_DIR)[0]
    ids, tok = inp["input_ids"][0].tolist(), proc.tokenizer
    pad, start = tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|vision_start|>")
    assert inp["image_grid_thw"].tolist() == [[1, 4, 4]] and tuple(inp["pixel_values"].shape) == (16, 1176)
    assert ids.count(pad) == 4 and ids[ids.index(start) + 1:ids.index(start) + 5] == [pad] * 4
    assert inp["mm_token_type_ids"][0].tolist() == [int(i == pad) for i in ids]


def sft_batch(model, proc, rows, base_dir):
    """The trainer's layout (calibrl.collate): left-padded prompts, then the response (solution tokens
    + <|im_end|>) right-padded; labels only on the response."""
    tok = proc.tokenizer
    im_end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    resp = [torch.tensor(tok(r["solution"], add_special_tokens=False).input_ids + [im_end]) for r in rows]
    inputs, L = calibrl.collate(family.of(model), encode(proc, rows, base_dir), resp, pad, "cpu")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, :L] = -100
    return inputs, labels


def suppress_ids(tok):
    return [tok.convert_tokens_to_ids(t) for t in VISION_TOKENS]


@torch.no_grad()
def evaluate(model, proc, rows, base_dir, k=4, greedy=False, batch=16, max_new_tokens=40):
    """Mean accuracy and format of sampled (T=1, k per problem) or greedy responses, scored by the
    trainer's reward."""
    model.eval()
    tok = proc.tokenizer
    scores = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        inputs, L = calibrl.collate(family.of(model), encode(proc, chunk, base_dir), None, tok.pad_token_id,
                                    "cpu")
        kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                                       num_return_sequences=k)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                             suppress_tokens=suppress_ids(tok), **kw)
        reps = 1 if greedy else k
        for j, seq in enumerate(out[:, L:]):
            scores.append(calibrl.reward_fn(tok.decode(seq, skip_special_tokens=True), chunk[j // reps]["answer"]))
    model.train()
    return sum(a for a, _ in scores) / len(scores), sum(f for _, f in scores) / len(scores)


def sft_step(model, opt, proc, rows, step, base_dir, batch=16):
    start = ((step - 1) * batch) % len(rows)
    inputs, labels = sft_batch(model, proc, rows[start:start + batch], base_dir)
    logits = model(**inputs).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    return loss.item()


def warm_start(model, tok, proc, train_rows, base_dir, steps1=500, lr1=3e-3, lr2=3e-4, max_steps2=300, target=0.35):
    """Two-phase SFT on the first half of the train split (the rest of it stays unseen by the warm start).
    Phase 1 trains the whole model to convergence (format, copying, arithmetic and counting). Phase 2 swaps in a
    freshly initialised vision tower and trains only it, stopping once sampled accuracy on a probe of other train
    problems reaches `target`: the language model stays sharp, so the remaining errors mostly come from reading
    the image (wrong counts), which is what RL then has to fix."""
    sft_rows, probe = train_rows[:N_TRAIN // 2], train_rows[N_TRAIN // 2:N_TRAIN // 2 + 96]
    model.train()
    t0 = time.time()
    opt = torch.optim.AdamW(model.parameters(), lr=lr1, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps1)))
    for step in range(1, steps1 + 1):
        loss = sft_step(model, opt, proc, sft_rows, step, base_dir)
        sched.step()
        if step % 100 == 0:
            print(f"phase 1 step {step:4d}  loss {loss:.4f}  ({time.time() - t0:.0f}s)")
    acc, fmt = evaluate(model, proc, probe, base_dir)
    print(f"phase 1 done: probe acc {acc:.3f}  format {fmt:.3f}")
    torch.manual_seed(SEED + 1)
    model.model.visual.load_state_dict(tiny_qwen2_5_vl(tok).model.visual.state_dict())
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.visual."))
    opt = torch.optim.AdamW(model.model.visual.parameters(), lr=lr2, weight_decay=0.0)
    for step in range(0, max_steps2 + 1):
        if step > 0:
            loss = sft_step(model, opt, proc, sft_rows, steps1 + step, base_dir)
        if step % 5 == 0:
            acc, fmt = evaluate(model, proc, probe, base_dir)
            print(f"phase 2 step {step:4d}  probe acc {acc:.3f}  format {fmt:.3f}  ({time.time() - t0:.0f}s)")
            if acc >= target:
                break
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return steps1, step


def main():
    t_start = time.time()
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    splits = generate_splits()
    rows = write_splits(splits)
    tok = train_tokenizer(splits)
    proc = ImageOnlyQwen2_5_VLProcessor(image_processor=make_image_processor(), tokenizer=tok,
                                        chat_template=CHAT_TEMPLATE)
    model = tiny_qwen2_5_vl(tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tok)}  params {n_params}  data written in {time.time() - t_start:.1f}s")
    steps = warm_start(model, tok, proc, rows["train"], DEMO_DIR)
    save_model_dir(model, proc, MODEL_DIR)
    proc = family.load_processor(MODEL_DIR, AutoConfig.from_pretrained(MODEL_DIR))  # the saved folder loads
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(MODEL_DIR, dtype=torch.float32)
    check_processor(proc, rows["val"][0])
    torch.manual_seed(SEED)
    acc, fmt = evaluate(model, proc, rows["val"], DEMO_DIR, k=4)
    gacc, gfmt = evaluate(model, proc, rows["val"], DEMO_DIR, greedy=True)
    inp, _ = calibrl.collate(family.of(model), encode(proc, rows["val"][:4], DEMO_DIR), None,
                            proc.tokenizer.pad_token_id, "cpu")
    t0 = time.time()
    model.generate(**inp, max_new_tokens=40, do_sample=True, top_k=0, num_return_sequences=8,
                   suppress_tokens=suppress_ids(proc.tokenizer))
    print(f"generate, 4 prompts x 8 samples, <= 40 new tokens: {time.time() - t0:.2f}s")
    print(f"warm start: {steps} SFT steps (phase 1, phase 2); val eval/accuracy {acc:.3f} format {fmt:.3f} (k=4, T=1); "
          f"greedy accuracy {gacc:.3f} format {gfmt:.3f}; total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--random-3b"]:  # the GPU check's model: python data/make_demo.py --random-3b DIR
        tiny_config_model("qwen2.5-vl-3b", sys.argv[2])
    elif sys.argv[1:2] == ["--random-internvl3-2b"]:  # the GPU check's InternVL3 model
        tiny_config_model("internvl3-2b", sys.argv[2])
    else:
        if sys.argv[1:2] == ["--out"]:  # build elsewhere (e.g. to compare with the shipped files)
            DEMO_DIR, MODEL_DIR = os.path.join(sys.argv[2], "demo"), os.path.join(sys.argv[2], "tiny-qwen2.5-vl")
        main()
