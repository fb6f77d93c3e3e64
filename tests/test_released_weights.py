"""The `paper` preset is the released model, parameter for parameter.

- The video DiT against diffusers' CosmosTransformer3DModel (a test dependency, installed by the
  README's test command): a small Cosmos-Predict2.5-shaped model with random weights is converted
  with video_dit_state_from_cosmos and must give the same output, and the same hidden
  state after an intermediate block (the feature the action DiT reads), on the same inputs.
- The action DiT against the released head's published config (its code is not installable):
  every parameter's shape and the total.
- The `paper` preset's counts against the release's, on the meta device.
No weights are downloaded: every model here has random weights.
"""
import copy
import dataclasses
import importlib.util
import types

import pytest
import torch

import dit4dit as d
from bridges.cosmos import cosmos_names, cosmos_video_config, video_dit_state_from_cosmos

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers (a test dependency: pip install -r "
                                                              "requirements.txt) is not installed")

# Cosmos-Predict2.5's options at a size a CPU runs in milliseconds: adaLN-LoRA, the cross-attention
# projection, the padding-mask channel, NTK rotary scaling on all three axes (t too, so every axis
# is exercised), no learned absolute positions; 3 blocks, the feature read after block 1.
SMALL_COSMOS = dict(in_channels=4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=3,
                    mlp_ratio=4.0, text_embed_dim=24, adaln_lora_dim=8, max_size=(16, 32, 32), patch_size=(1, 2, 2),
                    rope_scale=(2.0, 3.0, 3.0), concat_padding_mask=True, extra_pos_embed_type=None,
                    use_crossattn_projection=True, crossattn_proj_in_channels=40, encoder_hidden_states_channels=24)
FEATURE_BLOCK = 1
# Cosmos-Predict2.5-2B as diffusers' conversion script configures it (scripts/convert_cosmos_to_diffusers.py).
PREDICT25_2B = dict(in_channels=16 + 1, out_channels=16, num_attention_heads=16, attention_head_dim=128,
                    num_layers=28, mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 240, 240),
                    patch_size=(1, 2, 2), rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=True,
                    extra_pos_embed_type=None, use_crossattn_projection=True, crossattn_proj_in_channels=100352,
                    encoder_hidden_states_channels=1024)


def small_config(**overrides):
    return d.make_config("tiny", **{**cosmos_video_config(SMALL_COSMOS), "text_encoder": "embeddings",
                                    "extract_layer": FEATURE_BLOCK, **overrides})


class _Float64Casts:
    """While active, float64 tensors ignore `.float()` and `.to(torch.float32)`. diffusers' Cosmos
    computes the RMSNorm statistics, the timestep sinusoid and the rotary product in float32
    whatever the model's dtype; in float64 that caps agreement at float32 rounding (~1e-7). Only
    these casts change (no arithmetic is replaced), so the float64 comparison can be exact."""

    def __enter__(self):
        self.float, self.to = torch.Tensor.float, torch.Tensor.to
        orig_float, orig_to = self.float, self.to

        def float_(t, *args, **kwargs):
            return t if t.dtype == torch.float64 else orig_float(t, *args, **kwargs)

        def to(t, *args, **kwargs):
            to_float32 = (args[:1] and args[0] is torch.float32) or kwargs.get("dtype") is torch.float32
            return t if t.dtype == torch.float64 and to_float32 and len(args) <= 1 else orig_to(t, *args, **kwargs)

        torch.Tensor.float, torch.Tensor.to = float_, to
        return self

    def __exit__(self, *exc):
        torch.Tensor.float, torch.Tensor.to = self.float, self.to


@pytest.fixture(scope="module")
def cosmos():
    """(diffusers model in float64 with random weights everywhere, inputs, its float64 output and
    block-FEATURE_BLOCK hidden state, its float32 output)."""
    if not HAS_DIFFUSERS:
        pytest.skip("diffusers is not installed")
    from diffusers import CosmosTransformer3DModel
    from diffusers.models.transformers import transformer_cosmos

    if getattr(transformer_cosmos, "transforms", None) is None:
        # Without torchvision, diffusers cannot resize the padding mask; it is given at the
        # latent size here, where the nearest-neighbour resize is the identity.
        def resize(mask, size, interpolation=None):
            assert list(mask.shape[-2:]) == list(size), "the padding mask must be given at the latent size"
            return mask

        transformer_cosmos.transforms = types.SimpleNamespace(
            functional=types.SimpleNamespace(resize=resize),
            InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))
    torch.manual_seed(0)
    model = CosmosTransformer3DModel(**SMALL_COSMOS).double().eval()
    with torch.no_grad():  # random values everywhere, norm gains and zero-initialized layers included
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (1.0 if p.ndim == 1 else 0.5 / p.shape[-1] ** 0.5) + (p.ndim == 1))
    g = torch.Generator().manual_seed(1)
    B, C, T, H, W = 2, 4, 3, 8, 8
    x = torch.randn(B, C, T, H, W, generator=g, dtype=torch.float64)
    tau = torch.rand(B, T, generator=g, dtype=torch.float64)
    tau[:, 0] = d.COND_TAU  # frame 0 is the conditioning frame
    text = torch.randn(B, 5, SMALL_COSMOS["crossattn_proj_in_channels"], generator=g, dtype=torch.float64)
    padding = (torch.rand(1, 1, H, W, generator=g) < 0.3).double()  # nonzero, so its weights are checked
    cond = torch.zeros(B, 1, T, H, W, dtype=torch.float64)
    cond[:, :, 0] = 1

    def run(dtype):
        m = copy.deepcopy(model).to(dtype)
        seen = []
        m.transformer_blocks[FEATURE_BLOCK].register_forward_hook(lambda module, inputs, out: seen.append(out))
        with torch.no_grad():
            out = m(x.to(dtype), tau.to(dtype)[:, None, :, None, None], text.to(dtype), condition_mask=cond.to(dtype),
                    padding_mask=padding.to(dtype), return_dict=False)[0]
        return out, seen[0]

    with _Float64Casts():
        out64, feature64 = run(torch.float64)
    out32, feature32 = run(torch.float32)
    return types.SimpleNamespace(model=model, inputs=(x, tau, text, padding), out=out64, feature=feature64,
                                 out32=out32, feature32=feature32)


def ours(state, config=None, dtype=torch.float64, strict=True):
    torch.manual_seed(1)
    video_dit = d.VideoDiT(config or small_config()).to(dtype).eval()
    video_dit.load_state_dict(state, strict=strict)
    return video_dit


def errors(video_dit, cosmos):
    """(max |output difference|, max |feature difference|) on the fixture's inputs."""
    dtype = next(video_dit.parameters()).dtype
    x, tau, text, padding = (t.to(dtype) for t in cosmos.inputs)
    ref_out, ref_feature = (cosmos.out, cosmos.feature) if dtype == torch.float64 else (cosmos.out32, cosmos.feature32)
    with torch.no_grad():
        out = video_dit(x, tau, text, padding_mask=padding)
        feature = video_dit(x, tau, text, stop_after=FEATURE_BLOCK, padding_mask=padding)
    return (out - ref_out).abs().max().item(), (feature - ref_feature).abs().max().item()


def converted(cosmos, config=None):
    return video_dit_state_from_cosmos(cosmos.model.state_dict(), cosmos.model.config, config or small_config())


# --- the video DiT against diffusers ---------------------------------------------------------------

@needs_diffusers
def test_converted_cosmos_matches_diffusers_in_float64_and_float32(cosmos):
    assert cosmos.out.abs().max() > 0.1 and cosmos.feature.abs().max() > 0.1  # nothing trivially zero
    out_err, feature_err = errors(ours(converted(cosmos)), cosmos)
    assert out_err < 1e-10 and feature_err < 1e-10, (out_err, feature_err)
    state32 = {k: v.float() for k, v in converted(cosmos).items()}
    out_err, feature_err = errors(ours(state32, dtype=torch.float32), cosmos)
    assert out_err < 1e-5 and feature_err < 1e-5, (out_err, feature_err)


def _perturbations(state):
    """(name, perturbed state or None when the model refuses it) for every mapped tensor: dropped
    (the model keeps its own initial value), transposed (square weights; others cannot load), and
    swapped with another tensor of its shape."""
    by_shape = {}
    for key, tensor in state.items():
        by_shape.setdefault(tuple(tensor.shape), []).append(key)
    for key, tensor in state.items():
        yield f"drop {key}", {k: v for k, v in state.items() if k != key}
        if tensor.ndim == 2:
            yield f"transpose {key}", ({**state, key: tensor.T} if tensor.shape[0] == tensor.shape[1] else None)
        partners = [k for k in by_shape[tuple(tensor.shape)] if k != key and not torch.equal(state[k], tensor)]
        if partners:
            yield f"swap {key} <-> {partners[0]}", {**state, key: state[partners[0]], partners[0]: tensor}


@needs_diffusers
def test_parity_fails_if_any_mapped_tensor_is_dropped_transposed_or_swapped(cosmos):
    state = converted(cosmos)
    assert set(state) == set(d.VideoDiT(small_config()).state_dict())  # every weight is mapped
    seen = {"drop": 0, "transpose": 0, "swap": 0}
    for name, perturbed in _perturbations(state):
        seen[name.split()[0]] += 1
        if perturbed is None:  # a non-square weight transposed does not fit its layer
            with pytest.raises(RuntimeError, match="size mismatch"):
                ours({**state, name.split()[1]: state[name.split()[1]].T})
            continue
        err = max(errors(ours(perturbed, strict=False), cosmos))
        assert err > 1e-6, f"{name}: parity still holds ({err:.2e})"
    assert seen["drop"] == len(state) and seen["transpose"] > 20 and seen["swap"] > 20, seen
    # the one layout change: Cosmos's output rows (p, p, C) read as ours (C, p, p) break parity
    raw = {**state, "final_linear.weight": cosmos.model.state_dict()["proj_out.weight"]}
    assert errors(ours(raw), cosmos)[0] > 1e-3


@needs_diffusers
@pytest.mark.parametrize("switch", [dict(rope_pairs="interleaved"), dict(rope_scale=(1.0, 1.0, 1.0)),
                                    dict(video_qk_norm_eps=1e-6)], ids=lambda s: next(iter(s)))
def test_each_cosmos_switch_is_needed(cosmos, switch):
    """Put back our default for one Cosmos switch: the same weights no longer give Cosmos's output."""
    config = small_config(**switch)
    state = video_dit_state_from_cosmos(cosmos.model.state_dict(), cosmos.model.config, small_config())
    assert max(errors(ours(state, config), cosmos)) > 1e-9


@needs_diffusers
def test_converter_errors_name_the_key_or_field(cosmos):
    sd, cc, cfg = dict(cosmos.model.state_dict()), dict(cosmos.model.config), small_config()
    with pytest.raises(ValueError, match=r"missing \['transformer_blocks.1.attn1.to_k.weight'\]"):
        video_dit_state_from_cosmos({k: v for k, v in sd.items() if k != "transformer_blocks.1.attn1.to_k.weight"},
                                      cc, cfg)
    with pytest.raises(ValueError, match=r"unexpected \['learnable_pos_embed.pos_emb_t'\]"):
        video_dit_state_from_cosmos({**sd, "learnable_pos_embed.pos_emb_t": torch.zeros(3)}, cc, cfg)
    with pytest.raises(ValueError, match=r"transformer_blocks.0.ff.net.2.weight has shape \(128, 32\), but "
                                         r"blocks.0.mlp.fc2.weight"):
        video_dit_state_from_cosmos({**sd, "transformer_blocks.0.ff.net.2.weight": sd[
            "transformer_blocks.0.ff.net.2.weight"].T}, cc, cfg)
    with pytest.raises(ValueError, match="config field video_depth=2 does not match the Cosmos model"):
        video_dit_state_from_cosmos(sd, cc, small_config(video_depth=2, extract_layer=0))
    with pytest.raises(ValueError, match="config field rope_pairs='interleaved'"):
        video_dit_state_from_cosmos(sd, cc, small_config(rope_pairs="interleaved"))
    with pytest.raises(ValueError, match="cosmos config: missing key 'rope_scale'"):
        video_dit_state_from_cosmos(sd, {k: v for k, v in cc.items() if k != "rope_scale"}, cfg)
    with pytest.raises(ValueError, match="extra_pos_embed_type='learnable'"):
        cosmos_video_config({**cc, "extra_pos_embed_type": "learnable"})
    with pytest.raises(ValueError, match="in_channels=4 must be out_channels"):
        cosmos_video_config({**cc, "in_channels": 4})


# --- the paper preset's counts, and the action DiT against the release's published config -------

RELEASE = dict(video=2_059_174_912, action=163_276_320)  # Cosmos-Predict2.5-2B with crossattn_proj; the head


def count(module):
    return sum(p.numel() for p in module.parameters())


def paper_model():
    class LatentStub(d.PixelTokenizer):  # a 16-channel VAE stands behind the paper preset
        channels = 16
        spatial_factor = 8

    with torch.device("meta"):
        return d.DiT4DiT(d.make_config("paper"), tokenizer=LatentStub())


def test_paper_preset_counts_equal_the_release():
    model = paper_model()
    assert count(model.video_dit) == RELEASE["video"]
    assert count(model.action_dit) == RELEASE["action"]
    assert count(model) == RELEASE["video"] + RELEASE["action"]  # 2 222.5 M, nothing else trainable
    # and the preset is what the converter asks of Cosmos-Predict2.5-2B's config
    assert cosmos_video_config(PREDICT25_2B).items() <= dataclasses.asdict(model.config).items()


@needs_diffusers
def test_paper_video_dit_has_the_shapes_of_diffusers_predict25_2b():
    from diffusers import CosmosTransformer3DModel

    with torch.device("meta"):
        theirs = CosmosTransformer3DModel(**PREDICT25_2B).state_dict()
        mine = d.VideoDiT(d.make_config("paper")).state_dict()
    names = cosmos_names(d.make_config("paper"))
    assert set(names) == set(mine) and set(names.values()) == set(theirs)
    assert all(mine[k].shape == theirs[v].shape for k, v in names.items())
    assert sum(t.numel() for t in theirs.values()) == RELEASE["video"]


def release_head_shapes(cfg):
    """Our ActionDiT's parameter names -> (the released head's name, its shape), from the release's
    published config (config/robocasa/dit4dit_robocasa_gr1.yaml: action_model_type DiT-B = 12
    heads x 64, hidden_size 2560, max_seq_len 1024, action_dim 32, state_dim 64; DiT num_layers
    16, interleaved self-attention, cross_attention_dim 2048, output_dim 2560; diffusers'
    FeedForward inner width 4 x 768) and the shapes its modules give."""
    D, Hd, A, P, ctx = 768, 2560, 32, 64, 2048
    shapes = {
        "state_encoder.0": ("state_encoder.layer1", (Hd, P)), "state_encoder.2": ("state_encoder.layer2", (D, Hd)),
        "action_in": ("action_encoder.W1", (D, A)), "action_mix": ("action_encoder.W2", (D, 2 * D)),
        "action_out": ("action_encoder.W3", (D, D)),
        "t_embed.fc1": ("model.timestep_encoder.timestep_embedder.linear_1", (D, 256)),
        "t_embed.fc2": ("model.timestep_encoder.timestep_embedder.linear_2", (D, D)),
        "final_mod": ("model.proj_out_1", (2 * D, D)), "proj_out": ("model.proj_out_2", (Hd, D)),
        "decoder.0": ("action_decoder.layer1", (Hd, Hd)), "decoder.2": ("action_decoder.layer2", (A, Hd)),
    }
    for i in range(16):
        kv_in = ctx if i % 2 == 0 else D  # even blocks cross-attend to the video features
        block = {"mod": ("norm1.linear", (2 * D, D)), "attn.q": ("attn1.to_q", (D, D)),
                 "attn.k": ("attn1.to_k", (D, kv_in)), "attn.v": ("attn1.to_v", (D, kv_in)),
                 "attn.out": ("attn1.to_out.0", (D, D)), "mlp.fc1": ("ff.net.0.proj", (4 * D, D)),
                 "mlp.fc2": ("ff.net.2", (D, 4 * D))}
        shapes.update({f"blocks.{i}.{k}": (f"model.transformer_blocks.{i}.{n}", s) for k, (n, s) in block.items()})
    out = {"pos_embed": ("position_embedding.weight", (1024, D))}
    for ours, (theirs, shape) in shapes.items():  # every Linear of the head has a bias
        out[f"{ours}.weight"] = (f"{theirs}.weight", shape)
        out[f"{ours}.bias"] = (f"{theirs}.bias", shape[:1])
    return out


def test_paper_action_dit_has_the_released_heads_shapes():
    cfg = d.make_config("paper")
    with torch.device("meta"):
        head = d.ActionDiT(cfg)
    expected = release_head_shapes(cfg)
    got = {k: tuple(p.shape) for k, p in head.named_parameters()}
    assert set(got) == set(expected)
    wrong = {k: (got[k], expected[k]) for k in got if got[k] != expected[k][1]}
    assert not wrong, wrong
    assert sum(torch.Size(s).numel() for _, s in expected.values()) == RELEASE["action"]
    # the release drops 0.2 of the attention output twice and in the MLP, and its timestep
    # sinusoid divides by 127 (diffusers' downscale_freq_shift=1)
    assert cfg.action_dropout == 0.2 and head.t_embed.shift == 1


# --- the release's switches at a size that trains in milliseconds ----------------------------------

def test_release_switches_build_start_at_zero_and_train():
    """Every switch the paper preset turns on, at tiny scale: a fresh model predicts zero velocity
    (adaLN-Zero holds with Cosmos's time path), the loss trains both DiTs, and the early exit gives
    the block's output inside the full forward."""
    from bench.model import trained_like  # random values in the zero-initialized layers

    switches = {k: v for k, v in d.PRESETS["paper"].items() if k in (
        "video_time_embed", "rope_pairs", "rope_scale", "video_qk_norm_eps", "video_padding_mask", "abs_pos_embed",
        "video_time_scale", "action_time_shift", "action_dropout")}
    cfg = d.make_config("tiny", **switches, text_encoder="embeddings", text_dim=40, text_proj_dim=16,
                        adaln_lora_rank=4, video_depth=3, extract_layer=1, action_hidden_dim=80, action_max_len=10)
    torch.manual_seed(0)
    model = d.DiT4DiT(cfg)
    g = torch.Generator().manual_seed(0)
    B, T, H = 3, 1 + cfg.num_future_frames, cfg.image_size
    x, text = torch.randn(B, 3, T, H, H, generator=g), torch.randn(B, 6, cfg.text_dim, generator=g)
    assert torch.equal(model.video_dit(x, torch.rand(B, T, generator=g), text), torch.zeros_like(x))
    trained_like(model)
    batch = dict(video=x.clamp(-1, 1), state=torch.randn(B, cfg.state_dim, generator=g), text=text,
                 actions=torch.rand(B, cfg.action_horizon, cfg.action_dim, generator=g) * 2 - 1)
    model.config = dataclasses.replace(cfg, detach_features=False)  # the paper's gradient path: the
    # action loss reaches the video DiT too
    losses = model.loss(batch, generator=torch.Generator().manual_seed(1))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    for part in (model.video_dit, model.action_dit):
        assert all(p.grad is not None for p in part.parameters())
    captured = []
    hook = model.video_dit.blocks[1].register_forward_hook(lambda m, i, o: captured.append(o))
    tau = torch.rand(B, T, generator=g)
    with torch.no_grad():
        model.video_dit(x, tau, text)
        h = model.video_dit(x, tau, text, stop_after=1)
    hook.remove()
    torch.testing.assert_close(h, captured[0], rtol=0, atol=0)
