"""
infra/family.py -- what the machinery must know about a model family, in one place.

The rollout engine, packing and FSDP2 sharding ask a model the same questions: the positions of a
prompt, the image inputs of some prompts, how many features an image yields and which tokens
receive them, which module is the vision tower, which ids are image structure (never sampled).
Each family answers them in one class below, so that a second family is one new class here, not
`if` branches across the engine and packing. of(model) picks the class.

  Text      a text-only causal LM: positions 0 .. n-1, no images
  QwenVL    Qwen2-VL / Qwen2.5-VL: 3-axis M-RoPE positions (image tokens get 2-D grid positions,
            get_rope_index), images as pixel_values (patches, C) + image_grid_thw (images, 3),
            one feature per merged spatial_merge_size^2 patch, the vision tower `visual`
  InternVL  InternVL3 (transformers' -hf layout, InternVLForConditionalGeneration): 1-D positions,
            images as pixel_values (tiles, 3, S, S), one row per 448 px tile (up to max_patches
            tiles and a thumbnail), image_seq_length features per tile (the <IMG_CONTEXT> tokens),
            the vision modules `vision_tower` and `multi_modal_projector`

Also here: load_processor, a model folder's processor (without torchvision: Qwen2-VL's and
InternVL's need it only for their video processors).
Shapes: n prompt tokens, A rotary axes, b rows, q positions a row, F image features, H hidden size.
"""
import torch


def load_processor(path, config):
    """The processor of a model folder; the tokenizer alone for a text-only LM."""
    import transformers
    from transformers import AutoProcessor, AutoTokenizer
    if not hasattr(config, "vision_config"):
        return AutoTokenizer.from_pretrained(path)
    try:
        proc = AutoProcessor.from_pretrained(path)
        if hasattr(proc, "image_processor"):
            return proc
    except (ImportError, ValueError, OSError, AttributeError):
        pass
    # Without torchvision, the VLM processors fail on their video processor. The same class with an
    # __init__ that takes no video processor handles images identically. That __init__ must name
    # the base's other parameters: from_pretrained passes, and save_pretrained writes, only the
    # named ones (InternVL's image_seq_length would silently revert to 256 behind a bare **kw), so
    # it is written out from the base's signature. It keeps the base class's name, so a saved
    # folder loads as the real one where torchvision is installed.
    import inspect
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    base = getattr(transformers, PROCESSOR_MAPPING_NAMES[config.model_type])
    params = [p for p in list(inspect.signature(base.__init__).parameters.values())[1:]
              if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "video_processor"]
    names = [p.name for p in params]
    scope = {"base": base, "defaults": {p.name: p.default for p in params}}
    exec(f"def __init__(self, {', '.join(f'{n}=defaults[{n!r}]' for n in names)}, **kw):\n"
         f"    base.__init__(self, {', '.join(f'{n}={n}' for n in names)}, **kw)", scope)
    return type(base.__name__, (base,), {"__init__": scope["__init__"]}).from_pretrained(path)


def num_images(enc):
    """Images in one prompt encoding, as perf/vision_encodes counts them: Qwen's images, InternVL's
    tiles (the vision tower's unit: an image is up to max_patches tiles and a thumbnail)."""
    if enc.get("image_grid_thw") is not None:
        return len(enc["image_grid_thw"])
    return len(enc["pixel_values"]) if enc.get("pixel_values") is not None else 0


class Text:
    """A text-only causal LM (and the answers every family shares)."""
    axes = 1                                  # A: one rotary axis
    image_token_id = None                     # the token an image feature replaces

    def __init__(self, model):
        self.model, self.config = model, model.config

    def vision_ids(self, tok):
        """Image-structure ids (tok: the tokenizer): never sampled, excluded from every log-prob
        (departure 11)."""
        return []

    def image_wrap(self, tok):
        """(start, end) ids the processor puts around each image's placeholder run, or () (Qwen:
        <|vision_start|> is the chat template's, not the processor's)."""
        return ()

    def positions(self, enc):
        """One unpadded prompt -> (pos (A, n) long, delta int): the k-th generated token has
        position n + k + delta on every axis (transformers' rope_deltas)."""
        return torch.arange(enc["input_ids"].shape[1])[None], 0

    def position_ids(self, pos):
        """pos (A, b, q) -> the decoder forward's position_ids: (b, q) for one axis."""
        return pos[0]

    def num_features(self, enc):
        """Image features the prompt's images yield (= its image tokens)."""
        return 0

    def image_inputs(self, encs):
        """The images of these prompt encodings, in order, as the model's forward takes them."""
        return {}

    def text_decoder(self):
        """The decoder that takes inputs_embeds."""
        return self.model.model

    def is_vision_tower(self, name):
        """Whether the module of this name is the vision tower (its own FSDP2 unit)."""
        return False


class QwenVL(Text):
    """Qwen2-VL and Qwen2.5-VL (transformers' classes; the checkpoints' processors)."""
    axes = 3                                  # M-RoPE: temporal, height, width

    def __init__(self, model):
        super().__init__(model)
        self.image_token_id = self.config.image_token_id
        self.merge = self.config.vision_config.spatial_merge_size

    def vision_ids(self, tok):
        names = ("image_token_id", "video_token_id", "vision_start_token_id",
                 "vision_end_token_id", "vision_token_id")
        return sorted({i for i in (getattr(self.config, k, None) for k in names)
                       if isinstance(i, int)})

    def positions(self, enc):
        ids = enc["input_ids"]                                                   # (1, n)
        mm = enc.get("mm_token_type_ids")
        mm = torch.zeros_like(ids) if mm is None else mm
        pos, delta = self.model.model.get_rope_index(
            ids, mm_token_type_ids=mm, image_grid_thw=enc.get("image_grid_thw"),
            attention_mask=enc.get("attention_mask"))                           # (3, 1, n), (1, 1)
        return pos[:, 0], int(delta.reshape(-1)[0])

    def position_ids(self, pos):
        return pos                                                               # (3, b, q)

    def num_features(self, enc):
        grid = enc.get("image_grid_thw")                                         # (images, 3)
        return int((grid.prod(-1) // self.merge ** 2).sum()) if grid is not None else 0

    def image_inputs(self, encs):
        encs = [e for e in encs if e.get("pixel_values") is not None]
        if not encs:
            return {}
        return dict(pixel_values=torch.cat([e["pixel_values"] for e in encs]),   # (patches, C)
                    image_grid_thw=torch.cat([e["image_grid_thw"] for e in encs]))  # (images, 3)

    def image_features(self, pixel_values, image_grid_thw):
        """image_inputs -> (F, H) merged image features in image order (one vision pass)."""
        out = self.model.model.get_image_features(pixel_values, image_grid_thw)
        feats = getattr(out, "pooler_output", out)  # 5.x: pooler_output holds one per image
        return torch.cat(feats) if isinstance(feats, (list, tuple)) else feats

    def blank_features(self, like):
        """The features of a blank image of one merged patch (1, H), for a rank without images
        under torchrun: its vision tower must still run (FSDP's gathers pair up across ranks)."""
        vc, m = self.config.vision_config, self.merge
        C = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        return self.image_features(like.new_zeros(m * m, C),
                                   torch.tensor([[1, m, m]], device=like.device))

    def text_decoder(self):
        return self.model.model.language_model

    def is_vision_tower(self, name):
        return name.endswith("visual")


class InternVL(Text):
    """InternVL3 in transformers' -hf layout (OpenGVLab/InternVL3-{1,2,8}B-hf): InternViT, pixel
    shuffle and an MLP projector before a Qwen2.5 decoder with 1-D RoPE."""

    def __init__(self, model):
        super().__init__(model)
        self.image_token_id = self.config.image_token_id                       # <IMG_CONTEXT>
        self.layer = self.config.vision_feature_layer
        self.strategy = self.config.vision_feature_select_strategy

    def vision_ids(self, tok):
        # <img> and </img> around each image's <IMG_CONTEXT> run, and the video placeholder: the
        # tokenizer knows them (the processor reads them there), the config only <IMG_CONTEXT>
        names = ("start_image_token", "end_image_token", "context_image_token", "video_token")
        ids = {tok.convert_tokens_to_ids(t) for t in (getattr(tok, k, None) for k in names) if t}
        return sorted({self.image_token_id} | {i for i in ids if isinstance(i, int)
                                               and i != tok.unk_token_id})

    def image_wrap(self, tok):
        """<img> and </img>, which the tokenizer names (the processor reads them there)."""
        names = [getattr(tok, k, None) for k in ("start_image_token", "end_image_token")]
        return tuple(tok.convert_tokens_to_ids(t) for t in names) if all(names) else ()

    def num_features(self, enc):
        return int((enc["input_ids"] == self.image_token_id).sum())  # the processor's expansion

    def image_inputs(self, encs):
        tiles = [e["pixel_values"] for e in encs if e.get("pixel_values") is not None]
        return dict(pixel_values=torch.cat(tiles)) if tiles else {}              # (tiles, 3, S, S)

    def image_features(self, pixel_values):
        """(tiles, 3, S, S) -> (F, H): image_seq_length features per tile, in tile order."""
        out = self.model.model.get_image_features(pixel_values, vision_feature_layer=self.layer,
                                                  vision_feature_select_strategy=self.strategy)
        feats = getattr(out, "pooler_output", out)                               # (tiles, k, H)
        return feats.reshape(-1, feats.shape[-1])

    def blank_features(self, like):
        """The features of one blank tile, (image_seq_length, H) (see QwenVL.blank_features)."""
        vc = self.config.vision_config
        h, w = vc.image_size
        return self.image_features(like.new_zeros(1, vc.num_channels, h, w))

    def text_decoder(self):
        return self.model.model.language_model

    def is_vision_tower(self, name):
        return name.endswith(("vision_tower", "multi_modal_projector"))


def of(model):
    """The family block of a transformers model (unwrapped: FSDP2 keeps the class)."""
    if not hasattr(model.config, "vision_config"):
        return Text(model)
    if hasattr(model.model, "get_rope_index"):
        return QwenVL(model)
    if model.config.model_type == "internvl":
        return InternVL(model)
    raise NotImplementedError(f"{type(model).__name__}: no model-family block in infra/family.py "
                              "(there: Qwen2-VL / Qwen2.5-VL, InternVL3 and text-only LMs)")
