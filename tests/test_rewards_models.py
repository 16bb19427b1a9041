"""Model rewards (CLIPScore, PickScore, aesthetic, HPSv2, ImageReward) on tiny random checkpoints
written in the published layouts and loaded through the real loaders.

The HPSv2 and ImageReward key mappings are checked against independent re-implementations of
open_clip's and BLIP's forward passes written here from the published model code.
"""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("transformers")

from diffalign import rewards  # noqa: E402
from diffalign.rewards import testing as T  # noqa: E402
from diffalign.rewards.clip_common import embedding, preprocess  # noqa: E402
from diffalign.rewards.hps import openclip_to_hf  # noqa: E402
from diffalign.worlds import shapes as W  # noqa: E402

BUILDERS = {"clipscore": T.save_tiny_clip, "pickscore": T.save_tiny_clip, "aesthetic": T.save_tiny_aesthetic,
            "hpsv2": T.save_tiny_hps, "imagereward": T.save_tiny_imagereward}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_models")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def loaded(dirs):
    return {name: rewards.get(name, path=d) for name, d in dirs.items()}


@pytest.fixture(scope="module")
def batch():
    prompts = W.sample_prompts(6, seed=5)
    images, _ = W.render_batch(prompts, seed=2)
    return prompts, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@pytest.mark.parametrize("name", list(BUILDERS))
def test_scores_are_finite_and_batch_order_independent(name, loaded, batch):
    r = loaded[name]
    prompts, x = batch
    assert r.name == name and r.differentiable
    s = r(x, prompts)
    assert s.shape == (6,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.allclose(r(x[perm], [prompts[i] for i in perm]), s[perm], atol=1e-5)
    assert torch.allclose(r(x[2:3], prompts[2:3]), s[2:3], atol=1e-5)  # alone == in a batch
    assert s.std() > 0  # the tiny random models still tell images apart


@pytest.mark.parametrize("name", list(BUILDERS))
def test_gradient_matches_finite_differences(name, dirs, loaded, batch):
    # clipscore without the clamp: max(cos, 0) has no gradient where a random model's cos < 0
    r = rewards.get("clipscore", path=dirs[name], clamp=False) if name == "clipscore" else loaded[name]
    prompts, x = batch
    x = (x[:2] * 0.8 + 0.1).clone().requires_grad_(True)
    r(x, prompts[:2]).sum().backward()
    g = x.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    v = torch.randn_like(x)
    v = v / v.norm()
    h = 2e-3
    with torch.no_grad():
        fd = (r(x + h * v, prompts[:2]).sum() - r(x - h * v, prompts[:2]).sum()) / (2 * h)
    assert float((g * v).sum()) == pytest.approx(float(fd), rel=0.05, abs=1e-3 * float(g.norm()))


def test_clipscore_formula_and_pickscore_scale(dirs, batch):
    prompts, x = batch
    cs = rewards.get("clipscore", path=dirs["clipscore"], clamp=False, scale=1.0)
    cos = cs(x, prompts)
    assert (cos.abs() <= 1 + 1e-5).all()
    clamped = rewards.get("clipscore", path=dirs["clipscore"])(x, prompts)
    assert torch.allclose(clamped, 100 * cos.clamp(min=0), atol=1e-4)
    ps = rewards.get("pickscore", path=dirs["pickscore"])
    assert torch.allclose(ps(x, prompts), ps.model.logit_scale.exp() * cos, atol=1e-4)
    # the same cosine, computed the plain transformers way (PIL-free inputs): reference check
    tok = cs.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        t = embedding(cs.model.get_text_features(**tok))
        i = embedding(cs.model.get_image_features(pixel_values=preprocess(x, 32)))
    assert torch.allclose(F.cosine_similarity(t, i), cos, atol=1e-5)


def test_aesthetic_is_the_head_on_normalised_embeddings(dirs, batch):
    prompts, x = batch
    r = rewards.get("aesthetic", path=dirs["aesthetic"])
    emb = F.normalize(embedding(r.model.get_image_features(pixel_values=preprocess(x, 32))), dim=-1)
    sd = torch.load(dirs["aesthetic"] / "sac+logos+ava1-l14-linearMSE.pth")
    h = emb
    for i in (0, 2, 4, 6, 7):  # no activations in the published head
        h = F.linear(h, sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"])
    assert torch.allclose(r(x, prompts), h.squeeze(-1), atol=1e-5)
    assert torch.allclose(r(x, ["x"] * 6), r(x, prompts))  # prompt-independent
    # explicit clip_path / head_path work too
    r2 = rewards.get("aesthetic", clip_path=dirs["aesthetic"] / "clip-vit-large-patch14",
                     head_path=dirs["aesthetic"] / "sac+logos+ava1-l14-linearMSE.pth")
    assert torch.allclose(r2(x, prompts), r(x, prompts))


# ----------------------------------------------------------- independent reference: open_clip
def _oc_block(x, s, p, heads, mask=None):
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), s[p + "ln_1.weight"], s[p + "ln_1.bias"])
    a, _ = F.multi_head_attention_forward(
        h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), d, heads, s[p + "attn.in_proj_weight"],
        s[p + "attn.in_proj_bias"], None, None, False, 0.0, s[p + "attn.out_proj.weight"],
        s[p + "attn.out_proj.bias"], training=False, need_weights=False, attn_mask=mask)
    x = x + a.transpose(0, 1)
    h = F.layer_norm(x, (d,), s[p + "ln_2.weight"], s[p + "ln_2.bias"])
    return x + F.linear(F.gelu(F.linear(h, s[p + "mlp.c_fc.weight"], s[p + "mlp.c_fc.bias"])),
                        s[p + "mlp.c_proj.weight"], s[p + "mlp.c_proj.bias"])


def openclip_reference_score(s, cfg, pixels, ids):
    """open_clip ``CLIP.encode_image`` / ``encode_text`` (ViT, argmax-EOT pooling) -> cosine."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + s["visual.positional_embedding"]
    x = F.layer_norm(x, (v["width"],), s["visual.ln_pre.weight"], s["visual.ln_pre.bias"])
    for i in range(v["layers"]):
        x = _oc_block(x, s, f"visual.transformer.resblocks.{i}.", v["width"] // v["head_width"])
    img = F.layer_norm(x[:, 0], (v["width"],), s["visual.ln_post.weight"], s["visual.ln_post.bias"]) @ s["visual.proj"]
    n = ids.shape[1]
    y = s["token_embedding.weight"][ids] + s["positional_embedding"][:n]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(t["layers"]):
        y = _oc_block(y, s, f"transformer.resblocks.{i}.", t["heads"], mask)
    y = F.layer_norm(y, (t["width"],), s["ln_final.weight"], s["ln_final.bias"])
    txt = y[torch.arange(len(ids)), ids.argmax(-1)] @ s["text_projection"]
    return F.cosine_similarity(img, txt)


def test_hps_matches_an_open_clip_reference(dirs, loaded, batch):
    prompts, x = batch
    r = loaded["hpsv2"]
    s = torch.load(dirs["hpsv2"] / "HPS_v2.1_compressed.pt")["state_dict"]
    cfg = json.loads((dirs["hpsv2"] / "open_clip_config.json").read_text())["model_cfg"]
    tok = r.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = tok["input_ids"] * tok["attention_mask"]  # open_clip's tokenizer pads with 0
    with torch.no_grad():
        ref = openclip_reference_score(s, cfg, preprocess(x, 32, mode="pad"), ids)
    assert torch.allclose(r(x, prompts), ref, atol=1e-5)


def test_hps_pad_preprocessing_and_key_mapping():
    x = torch.rand(1, 3, 16, 32)
    out = preprocess(x, 32, mean=(0, 0, 0), std=(1, 1, 1), mode="pad")
    assert out.shape == (1, 3, 32, 32)
    assert (out[..., :8, :] == 0).all() and (out[..., 24:, :] == 0).all()  # letterboxed in black
    crop = preprocess(x, 32, mean=(0, 0, 0), std=(1, 1, 1), mode="crop")
    assert crop.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="unexpected open_clip keys"):
        openclip_to_hf({"visual.trunk.stem.0.weight": torch.zeros(1)})
    mapped = openclip_to_hf({"module.transformer.resblocks.0.attn.in_proj_weight": torch.arange(6.0).view(6, 1)})
    assert mapped["text_model.encoder.layers.0.self_attn.k_proj.weight"].flatten().tolist() == [2.0, 3.0]


def test_preprocess_matches_pil_bicubic():
    """crop mode = the CLIP processors' PIL bicubic resize of the shorter side + centre crop."""
    rng = np.random.default_rng(0)
    img = np.array(Image.fromarray(rng.integers(0, 256, (10, 15, 3), dtype=np.uint8)).resize((30, 20), Image.BILINEAR))
    ref = np.array(Image.fromarray(img).resize((12, 8), Image.BICUBIC), np.float32)[:, 2:10] / 255
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    ours = preprocess(x, 8, mean=(0, 0, 0), std=(1, 1, 1), mode="crop")[0].permute(1, 2, 0).numpy()
    assert ours.shape == (8, 8, 3)
    assert np.abs(ours.clip(0, 1) - ref).max() < 3 / 255  # PIL rounds to uint8 between its two passes


# ---------------------------------------------------------------- independent reference: BLIP
def _ln(x, s, p, eps):
    return F.layer_norm(x, (x.shape[-1],), s[p + ".weight"], s[p + ".bias"], eps)


def _attn(q_in, kv_in, s, p, heads, mask=None):
    b, n, d = q_in.shape
    q = F.linear(q_in, s[p + ".query.weight"], s[p + ".query.bias"]).view(b, n, heads, -1).transpose(1, 2)
    k = F.linear(kv_in, s[p + ".key.weight"], s[p + ".key.bias"]).view(b, kv_in.shape[1], heads, -1).transpose(1, 2)
    v = F.linear(kv_in, s[p + ".value.weight"], s[p + ".value.bias"]).view(b, kv_in.shape[1], heads, -1).transpose(1, 2)
    a = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        a = a + (1.0 - mask[:, None, None, :].float()) * -1e4
    return (a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


def imagereward_reference(s, med, pixels, ids, mask):
    """BLIP ``vit.py`` VisionTransformer + ``med.py`` BertModel (multimodal) + ImageReward MLP."""
    pw = s["blip.visual_encoder.patch_embed.proj.weight"]
    x = F.conv2d(pixels, pw, s["blip.visual_encoder.patch_embed.proj.bias"], stride=pw.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([s["blip.visual_encoder.cls_token"].expand(x.shape[0], -1, -1), x], 1)
    x = x + s["blip.visual_encoder.pos_embed"][:, : x.shape[1]]
    vw = x.shape[-1]
    for i in range(2):
        p = f"blip.visual_encoder.blocks.{i}"
        h = _ln(x, s, p + ".norm1", 1e-6)
        b, n, _ = h.shape
        qkv = F.linear(h, s[p + ".attn.qkv.weight"], s[p + ".attn.qkv.bias"]).reshape(b, n, 3, vw // 64, 64).permute(2, 0, 3, 1, 4)
        a = ((qkv[0] @ qkv[1].transpose(-2, -1)) * 64**-0.5).softmax(-1) @ qkv[2]
        x = x + F.linear(a.transpose(1, 2).reshape(b, n, vw), s[p + ".attn.proj.weight"], s[p + ".attn.proj.bias"])
        h = _ln(x, s, p + ".norm2", 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, s[p + ".mlp.fc1.weight"], s[p + ".mlp.fc1.bias"])),
                         s[p + ".mlp.fc2.weight"], s[p + ".mlp.fc2.bias"])
    img = _ln(x, s, "blip.visual_encoder.norm", 1e-6)
    t, eps, heads = "blip.text_encoder", med["layer_norm_eps"], med["num_attention_heads"]
    y = s[f"{t}.embeddings.word_embeddings.weight"][ids] + s[f"{t}.embeddings.position_embeddings.weight"][: ids.shape[1]]
    y = _ln(y, s, f"{t}.embeddings.LayerNorm", eps)
    for i in range(med["num_hidden_layers"]):
        p = f"{t}.encoder.layer.{i}"
        for att, kv, m in (("attention", None, mask), ("crossattention", img, None)):
            a = _attn(y, y if kv is None else kv, s, f"{p}.{att}.self", heads, m)
            y = _ln(F.linear(a, s[f"{p}.{att}.output.dense.weight"], s[f"{p}.{att}.output.dense.bias"]) + y,
                    s, f"{p}.{att}.output.LayerNorm", eps)
        h = F.gelu(F.linear(y, s[f"{p}.intermediate.dense.weight"], s[f"{p}.intermediate.dense.bias"]))
        y = _ln(F.linear(h, s[f"{p}.output.dense.weight"], s[f"{p}.output.dense.bias"]) + y, s, f"{p}.output.LayerNorm", eps)
    h = y[:, 0]
    for i in (0, 2, 4, 6, 7):
        h = F.linear(h, s[f"mlp.layers.{i}.weight"], s[f"mlp.layers.{i}.bias"])
    return (h.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_matches_a_blip_reference(dirs, loaded, batch):
    prompts, x = batch
    r = loaded["imagereward"]
    s = torch.load(dirs["imagereward"] / "ImageReward.pt")
    med = json.loads((dirs["imagereward"] / "med_config.json").read_text())
    tok = r.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tok["input_ids"].shape[1] == 35 and (tok["input_ids"][:, 0] == r.tokenizer.cls_token_id).all()
    with torch.no_grad():
        ref = imagereward_reference(s, med, preprocess(x, 32), tok["input_ids"], tok["attention_mask"])
    assert torch.allclose(r(x, prompts), ref, atol=1e-4)
    assert not torch.allclose(r(x, prompts), r(x, prompts[::-1]))  # the prompt matters


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", list(BUILDERS))
def test_missing_directory_names_the_path_and_files(name, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*expected"):
        rewards.get(name, path=missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        rewards.get(name, path=empty)


@pytest.mark.parametrize("name,victim", [("clipscore", "model.safetensors"), ("pickscore", "config.json"),
                                         ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth"),
                                         ("hpsv2", "HPS_v2.1_compressed.pt"), ("imagereward", "ImageReward.pt")])
def test_corrupt_checkpoint_names_the_path(name, victim, dirs, tmp_path):
    d = tmp_path / name
    shutil.copytree(dirs[name], d)
    (d / victim).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=str(d)):
        rewards.get(name, path=d)


def test_mismatched_configs_are_explained(dirs, tmp_path):
    d = tmp_path / "hps"
    shutil.copytree(dirs["hpsv2"], d)
    cfg = json.loads((d / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["layers"] = 3
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="open_clip_config.json"):
        rewards.get("hpsv2", path=d)
    d2 = tmp_path / "ir"
    shutil.copytree(dirs["imagereward"], d2)
    med = json.loads((d2 / "med_config.json").read_text())
    med["num_hidden_layers"] = 3
    (d2 / "med_config.json").write_text(json.dumps(med))
    with pytest.raises(ValueError, match="med_config.json"):
        rewards.get("imagereward", path=d2)
    (d2 / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        rewards.get("imagereward", path=d2)


def test_embedding_accepts_transformers_4_and_5_outputs():
    t = torch.randn(2, 4)
    assert embedding(t) is t  # 4.x: a tensor
    assert embedding(SimpleNamespace(pooler_output=t)) is t  # 5.x: BaseModelOutputWithPooling
    assert embedding((t, None)) is t
    with pytest.raises(TypeError):
        embedding(SimpleNamespace(last_hidden_state=None))
