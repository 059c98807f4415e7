"""open_clip's CLIP layout written out by hand from its documented architecture (open_clip cannot be imported
here): state-dict names and shapes, a reference forward, and a hub-style folder of random weights."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def expected_open_clip_shapes(embed, v_width, v_layers, patch, image_size, t_width, t_layers, context, vocab):
    """open_clip's CLIP state-dict layout (its `VisionTransformer` and `TextTransformer`, `nn.MultiheadAttention`
    with packed in_proj, `x @ proj` projections), written out from its documented architecture."""
    def blocks(prefix, width, layers):
        shapes = {}
        for i in range(layers):
            b = f"{prefix}.{i}"
            shapes.update({f"{b}.ln_1.weight": (width,), f"{b}.ln_1.bias": (width,),
                           f"{b}.attn.in_proj_weight": (3 * width, width), f"{b}.attn.in_proj_bias": (3 * width,),
                           f"{b}.attn.out_proj.weight": (width, width), f"{b}.attn.out_proj.bias": (width,),
                           f"{b}.ln_2.weight": (width,), f"{b}.ln_2.bias": (width,),
                           f"{b}.mlp.c_fc.weight": (4 * width, width), f"{b}.mlp.c_fc.bias": (4 * width,),
                           f"{b}.mlp.c_proj.weight": (width, 4 * width), f"{b}.mlp.c_proj.bias": (width,)})
        return shapes
    grid = image_size // patch
    shapes = {"logit_scale": (), "visual.class_embedding": (v_width,),
              "visual.positional_embedding": (grid * grid + 1, v_width), "visual.proj": (v_width, embed),
              "visual.conv1.weight": (v_width, 3, patch, patch),
              "visual.ln_pre.weight": (v_width,), "visual.ln_pre.bias": (v_width,),
              "visual.ln_post.weight": (v_width,), "visual.ln_post.bias": (v_width,),
              "token_embedding.weight": (vocab, t_width), "positional_embedding": (context, t_width),
              "ln_final.weight": (t_width,), "ln_final.bias": (t_width,), "text_projection": (t_width, embed)}
    shapes.update(blocks("visual.transformer.resblocks", v_width, v_layers))
    shapes.update(blocks("transformer.resblocks", t_width, t_layers))
    return shapes



def open_clip_reference(sd, cfg, images, tokens):
    """open_clip's CLIP forward, written from its layout with torch.nn.MultiheadAttention (independent of ours);
    `quick_gelu` in the config switches the activation to x·σ(1.702x) as open_clip's does."""
    def act(x):
        return x * torch.sigmoid(1.702 * x) if cfg.get("quick_gelu") else F.gelu(x)
    def resblocks(x, prefix, layers, heads, causal):
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1) if causal else None
        for i in range(layers):
            p = lambda n, i=i: sd[f"{prefix}.{i}.{n}"]  # noqa: E731
            width = x.shape[-1]
            attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
            attn.load_state_dict({"in_proj_weight": p("attn.in_proj_weight"),
                                  "in_proj_bias": p("attn.in_proj_bias"),
                                  "out_proj.weight": p("attn.out_proj.weight"),
                                  "out_proj.bias": p("attn.out_proj.bias")})
            h = F.layer_norm(x, (width,), p("ln_1.weight"), p("ln_1.bias"))
            x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
            h = F.layer_norm(x, (width,), p("ln_2.weight"), p("ln_2.bias"))
            x = x + F.linear(act(F.linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"))),
                             p("mlp.c_proj.weight"), p("mlp.c_proj.bias"))
        return x
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    x = F.conv2d(images, sd["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (v["width"],), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = resblocks(x, "visual.transformer.resblocks", v["layers"], v["width"] // v["head_width"], causal=False)
    x = F.layer_norm(x, (v["width"],), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    image = x[:, 0] @ sd["visual.proj"]
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    x = resblocks(x, "transformer.resblocks", t["layers"], t["heads"], causal=True)
    x = F.layer_norm(x, (t["width"],), sd["ln_final.weight"], sd["ln_final.bias"])
    text = x[torch.arange(len(x)), tokens.argmax(-1)] @ sd["text_projection"]
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def open_clip_folder(path: Path, model_cfg: dict, seed: int = 0, **extra) -> dict[str, torch.Tensor]:
    """A hub-style folder (`open_clip_config.json` + `open_clip_model.safetensors`) of random weights in the
    layout of `model_cfg` (ViT, head width 16); returns the weights. Norm gains and biases are random too,
    so no mapping can hide behind ones and zeros."""
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    shapes = expected_open_clip_shapes(model_cfg["embed_dim"], v["width"], v["layers"], v["patch_size"],
                                       v["image_size"], t["width"], t["layers"], t["context_length"], t["vocab_size"])
    g = torch.Generator().manual_seed(seed)
    weights = {k: 0.2 * torch.randn(s, generator=g) for k, s in shapes.items()}
    for k in weights:
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
            weights[k] += 1.0
    weights["logit_scale"] = torch.tensor(2.5)
    weights.update(extra)
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "open_clip_model.safetensors"))
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    return weights
