"""Executable specification of dit4dit.py. Runs on the `tiny` preset in seconds."""
import dataclasses
import os

import numpy as np
import pytest
import torch

import dit4dit as d
import kernels
from bench.model import trained_like  # random values in the zero-initialized layers
from oracle import release_predict_action, unfused_qk_norm_rope
from bridges import checkpoint
from bridges.files import atomic_write, remove_stale_temp_files
from bridges.frames import frames_to_video, video_to_frames
from bridges.normalizer import Normalizer


# The paper's choices where the toy departs from them (`tiny` carries the toy's switches).
PAPER_SWITCHES = dict(video_prediction="velocity", video_text_adaln=False, action_text=False,
                      feature_frames="all", detach_features=None, action_noise_scale=1.0)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return d.DiT4DiT(d.make_config("tiny", **overrides))


def tiny_batch(cfg, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    H = cfg.image_size
    # like a rendered scene: smooth frames (constant 4x4 pixel blocks) and a future that mostly
    # repeats the current frame, with one block changing per frame
    coarse = torch.rand(B, 3, 1, H // 4, H // 4, generator=g).repeat(1, 1, 1 + cfg.num_future_frames, 1, 1) * 2 - 1
    for t in range(1, 1 + cfg.num_future_frames):
        coarse[:, :, t, t % (H // 4), t % (H // 4)] = 1.0
    return dict(video=coarse.repeat_interleave(4, dim=3).repeat_interleave(4, dim=4),
                state=torch.randn(B, cfg.state_dim, generator=g),
                actions=torch.rand(B, cfg.action_horizon, cfg.action_dim, generator=g) * 2 - 1,
                instruction=["push the red block onto the blue pad", "reach the green ball", "push blue"][:B])


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- shapes and initialization ----------------------------------------------------------------

def test_public_shapes_on_tiny():
    model = tiny_model(**PAPER_SWITCHES)  # features of every frame
    cfg = model.config
    batch = tiny_batch(cfg)
    B, H = 3, cfg.image_size
    out = model.loss(batch)
    assert set(out) == {"loss", "video_loss", "action_loss"}
    assert all(v.shape == () and torch.isfinite(v) for v in out.values())
    obs = batch["video"][:, :, 0]
    text = model.encode_text(batch["instruction"])
    assert text.shape == (B, cfg.text_max_len, cfg.text_dim)
    h = model.extract_features(obs, batch["instruction"])
    p = cfg.patch_size
    assert h.shape == (B, (1 + cfg.num_future_frames) * (H // p) ** 2, cfg.video_width)
    acts = model.predict_action(obs, batch["state"], batch["instruction"], generator=gen(0))
    assert acts.shape == (B, cfg.action_horizon, cfg.action_dim) and acts.abs().max() <= 1
    video = model.imagine_video(obs, batch["instruction"], generator=gen(0))
    assert video.shape == batch["video"].shape and video.abs().max() <= 1
    assert torch.equal(video[:, :, 0], obs)  # the conditioning frame stays clean


def test_frames_video_conversion_round_trip():
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 3, 8, 8, 3), dtype=np.uint8)
    video = frames_to_video(frames)
    assert video.shape == (2, 3, 3, 8, 8) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert np.array_equal(video_to_frames(video), frames)
    with pytest.raises(ValueError, match="frames"):
        frames_to_video(frames.astype(np.float32))


def test_fresh_model_predicts_zero_velocity_in_both_dits():
    model = tiny_model()
    cfg = model.config
    B, H = 2, cfg.image_size
    x = torch.randn(B, 3, 1 + cfg.num_future_frames, H, H)
    tau = torch.rand(B, 1 + cfg.num_future_frames)
    text = torch.randn(B, 5, cfg.text_dim)
    assert torch.equal(model.video_dit(x, tau, text), torch.zeros_like(x))
    h = torch.randn(B, 7, cfg.video_width)
    a = torch.randn(B, cfg.action_horizon, cfg.action_dim)
    v = model.action_dit(a, torch.rand(B), torch.randn(B, cfg.state_dim), h=h)
    assert torch.equal(v, torch.zeros_like(a))


def test_adaln_lora_variant_is_also_zero_at_init():
    model = tiny_model(adaln_lora_rank=4)
    cfg = model.config
    x = torch.randn(2, 3, 3, 16, 16)
    assert torch.equal(model.video_dit(x, torch.rand(2, 3), torch.randn(2, 4, cfg.text_dim)), torch.zeros_like(x))


def test_modulate_per_frame_groups():
    x, shift, scale = torch.randn(2, 12, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    y = d.modulate(x, shift, scale)
    for g in range(3):
        tokens = slice(4 * g, 4 * g + 4)
        ref = torch.nn.functional.layer_norm(x[:, tokens], (8,), eps=1e-6) * (1 + scale[:, g:g + 1]) + shift[:, g:g + 1]
        torch.testing.assert_close(y[:, tokens], ref, rtol=1e-5, atol=1e-5)


def _unfused_video_block_forward(self, x, c, shared, text, rope):
    """VideoBlock.forward as written before residual_modulate: three separate gated residuals."""
    shift, scale, gate = self.mod_self(c, shared)
    x = x + d.per_frame(gate, self.self_attn(d.modulate(x, shift, scale), rope=rope))
    shift, scale, gate = self.mod_cross(c, shared)
    x = x + d.per_frame(gate, self.cross_attn(d.modulate(x, shift, scale), context=text))
    shift, scale, gate = self.mod_mlp(c, shared)
    return x + d.per_frame(gate, self.mlp(d.modulate(x, shift, scale)))


def _video_dit_output_and_grads(model):
    """A function that runs model.video_dit forward and backward on fixed inputs and returns its
    output and the gradients of the input, the text and every video-DiT parameter."""
    cfg = model.config
    x = torch.randn(2, 3, 1 + cfg.num_future_frames, cfg.image_size, cfg.image_size, generator=gen(3))
    tau = torch.rand(2, 1 + cfg.num_future_frames, generator=gen(4))
    text = torch.randn(2, 5, cfg.text_dim, generator=gen(5))
    grad_out = torch.randn(x.shape, generator=gen(6))

    def run():
        model.zero_grad()
        inputs = [x.clone().requires_grad_(), text.clone().requires_grad_()]
        out = model.video_dit(inputs[0], tau, inputs[1])
        out.backward(grad_out)
        return [out] + [t.grad for t in inputs] + [p.grad for p in model.video_dit.parameters()]
    return run


@pytest.mark.parametrize("backend", ["0"] + (["1"] if kernels.available() else []))
def test_video_block_with_residual_modulate_equals_unfused(backend, monkeypatch):
    """The video DiT with its blocks' fused residual_modulate gives the output and the gradients
    (input, text, every parameter) of the unfused blocks, per frame (G = T = 3) and with every
    gate non-zero; on the PyTorch path and, when built, on the kernels."""
    before = d.backend()
    d.select_backend(backend)
    try:
        model = trained_like(tiny_model(video_depth=2, **PAPER_SWITCHES))
        assert all(block.mod_cross.proj.weight.abs().min() > 0 for block in model.video_dit.blocks)
        output_and_grads = _video_dit_output_and_grads(model)
        fused = output_and_grads()
        monkeypatch.setattr(d.VideoBlock, "forward", _unfused_video_block_forward)
        unfused = output_and_grads()
    finally:
        d.select_backend("1" if before == "kernels" else "0")
    assert fused[0].abs().max() > 0.1  # the blocks do something
    for i, (a, b) in enumerate(zip(fused, unfused)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"tensor {i}: {m}")


def _unfused_qk_norm_rope(x, norm, rot):
    """dit4dit.qk_norm_rope as Attention computed it before the fusion: the RMSNorm module, then
    the rotation by rope_3d's tables (tests/oracle.py's unfused sequence)."""
    return unfused_qk_norm_rope(x, norm.weight, rot, norm.eps)


@pytest.mark.parametrize("pairs", ["interleaved", "half"])
@pytest.mark.parametrize("backend", ["0"] + (["1"] if kernels.available() else []))
def test_self_attention_with_qk_norm_rope_equals_unfused(backend, pairs, monkeypatch):
    """The video DiT whose self-attention calls the fused qk_norm_rope gives the output and the
    gradients (input, text, every parameter, the q/k RMSNorm gains among them) of the unfused
    RMSNorm + rotation, for both pair layouts; bit for bit on the PyTorch path (trained results
    do not change), to float32 rounding on the kernels."""
    before = d.backend()
    d.select_backend(backend)
    try:
        model = trained_like(tiny_model(video_depth=2, rope_pairs=pairs, **PAPER_SWITCHES))
        for block in model.video_dit.blocks:  # gains away from 1, so a wrong gain gradient shows
            for norm in (block.self_attn.q_norm, block.self_attn.k_norm):
                norm.weight.data = 1 + 0.3 * torch.randn(norm.weight.shape, generator=gen(7))
        output_and_grads = _video_dit_output_and_grads(model)
        fused = output_and_grads()
        monkeypatch.setattr(d, "qk_norm_rope", _unfused_qk_norm_rope)
        unfused = output_and_grads()
    finally:
        d.select_backend("1" if before == "kernels" else "0")
    assert fused[0].abs().max() > 0.1
    gains = [p.grad for block in model.video_dit.blocks for p in block.self_attn.q_norm.parameters()]
    assert all(g is not None and g.abs().max() > 0 for g in gains)
    for i, (a, b) in enumerate(zip(fused, unfused)):
        if backend == "0":
            assert torch.equal(a, b), f"tensor {i}: the PyTorch path changed"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"tensor {i}: {m}")


def test_attention_matches_explicit_softmax():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
    torch.testing.assert_close(d.attention(q, k, v), ref, rtol=1e-5, atol=1e-5)


# --- paper scale --------------------------------------------------------------------------------

def test_paper_preset_parameter_counts_on_meta_device():
    cfg = d.make_config("paper")
    assert cfg.adaln_lora_rank > 0 and cfg.extract_layer == 17 and cfg.video_depth == 28

    class LatentStub(d.PixelTokenizer):  # a 16-channel VAE stands behind the paper preset
        channels = 16
        spatial_factor = 8

    with torch.device("meta"):
        model = d.DiT4DiT(cfg, tokenizer=LatentStub())
    count = lambda m: sum(p.numel() for p in m.parameters())
    video, action, total = count(model.video_dit), count(model.action_dit), count(model)
    # the release: Cosmos-Predict2.5-2B with its crossattn_proj, and the released action head
    # (exact counts and shapes: tests/test_released_weights.py)
    assert abs(video / 2059.2e6 - 1) < 0.005, video
    assert abs(action / 163.3e6 - 1) < 0.005, action
    assert abs(total / 2222.5e6 - 1) < 0.005, total


# --- extraction, caching, gradients -------------------------------------------------------------

def test_absolute_positions_make_tokens_of_a_uniform_frame_distinguishable():
    # The action DiT cross-attends to h without positions, so the toy presets add fixed sin-cos
    # positions to the patch tokens: tokens of a uniform frame then differ by position, while with
    # rotary positions only (abs_pos_embed=False, as in Cosmos) they enter the blocks all equal.
    pos = d.sincos_2d(4, 5, 32, torch.device("cpu"))
    assert pos.shape == (20, 32) and (torch.cdist(pos, pos) + torch.eye(20)).min() > 1e-3
    for on in (True, False):
        model = tiny_model(abs_pos_embed=on)
        entering = []
        hook = model.video_dit.blocks[0].register_forward_pre_hook(lambda mod, args: entering.append(args[0]))
        model.extract_features(torch.zeros(1, 3, 16, 16), ["reach"], generator=gen(0))
        hook.remove()
        frame0 = entering[0][0, :16]  # the 4 x 4 tokens of the conditioning frame
        spread = (frame0 - frame0.mean(0)).abs().max().item()
        assert (spread > 1e-3) == on, (on, spread)


def test_early_exit_equals_block_output_inside_full_forward():
    model = tiny_model(**PAPER_SWITCHES, video_depth=3, extract_layer=1)
    trained_like(model)
    cfg = model.config
    batch = tiny_batch(cfg)
    obs = batch["video"][:, :, 0]
    h = model.extract_features(obs, batch["instruction"], generator=gen(5))
    # the same pass through all blocks, capturing block extract_layer with a hook
    captured = {}
    hook = model.video_dit.blocks[cfg.extract_layer].register_forward_hook(
        lambda mod, inp, out: captured.setdefault("h", out))
    noise = torch.randn(3, 3, cfg.num_future_frames, 16, 16, generator=gen(5))
    x = torch.cat([obs[:, :, None], noise], dim=2)
    tau = torch.full((3, x.shape[2]), cfg.tau_f)
    tau[:, 0] = d.COND_TAU
    full = model.video_dit(x, tau, model.encode_text(batch["instruction"]))
    hook.remove()
    assert full.shape == x.shape
    torch.testing.assert_close(h, captured["h"], rtol=1e-5, atol=1e-6)
    # and the later blocks matter: the last block's output differs
    assert not torch.allclose(h, model.video_dit(x, tau, model.encode_text(batch["instruction"]), stop_after=2))


def test_predict_action_cached_kv_equals_uncached():
    model = tiny_model(**PAPER_SWITCHES)
    trained_like(model)
    model.eval()
    cfg = model.config
    batch = tiny_batch(cfg)
    obs, state = batch["video"][:, :, 0], batch["state"]
    cached = model.predict_action(obs, state, batch["instruction"], generator=gen(3))
    # uncached: the same draws, K/V of h recomputed inside every Euler step
    g = gen(3)
    with torch.no_grad():
        h = model.extract_features(obs, batch["instruction"], generator=g)
        a = torch.randn(3, cfg.action_horizon, cfg.action_dim, generator=g)
        a = d.euler_sample(lambda x, tau: model.action_dit(x, tau, state, h=h), a, cfg.num_action_steps)
    torch.testing.assert_close(cached, a.clamp(-1, 1), rtol=1e-5, atol=1e-6)
    assert cached.abs().max() > 0


@pytest.mark.parametrize("action_text", [False, True])
def test_predict_action_precomputed_schedule_equals_naive(action_text):
    """predict_action computes the time embeddings, the modulations and the state token of its
    fixed Euler schedule once (ActionDiT.step_inputs, batched over the steps): the actions equal
    the release's path, which recomputes all of it (and K/V) at every step, and each step's
    precomputed inputs give the velocity that forward computes from scratch at that step's time."""
    model = trained_like(tiny_model(action_text=action_text)).eval()
    cfg = model.config
    batch = tiny_batch(cfg)
    obs, state = batch["video"][:, :, 0], batch["state"]
    fast = model.predict_action(obs, state, batch["instruction"], generator=gen(3))
    with torch.inference_mode():
        slow = release_predict_action(model, obs, state, batch["instruction"], gen(3))
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
        assert fast.abs().max() > 0
        h = model.extract_features(obs, batch["instruction"], generator=gen(4))
        context, cond = model.action_context(h, model.encode_text(batch["instruction"]))
        taus = d.euler_times(cfg.num_action_steps, 3)
        pre = model.action_dit.step_inputs(taus, state, cond)
        a = torch.randn(3, cfg.action_horizon, cfg.action_dim, generator=gen(5))
        outs = [model.action_dit(a, tau, state, h=context, cond=cond) for tau in taus]
        for i, tau in enumerate(taus):
            torch.testing.assert_close(model.action_dit(a, tau, state, h=context, pre=pre[i]), outs[i],
                                       rtol=1e-5, atol=1e-6)
        assert not torch.allclose(outs[0], outs[-1])  # the steps differ, so a wrong step index would show


def test_action_noise_scale_sets_the_samplers_starting_noise():
    """predict_action starts the Euler integration at action_noise_scale times a standard draw:
    at 0 from the noise's mean (the toy preset), at 1 from the draw itself (the paper)."""
    assert d.make_config("toy").action_noise_scale == 0 and d.make_config("paper").action_noise_scale == 1
    model = trained_like(tiny_model(**PAPER_SWITCHES)).eval()
    batch = tiny_batch(model.config)
    obs, state = batch["video"][:, :, 0], batch["state"]
    K, A = model.config.action_horizon, model.config.action_dim
    for scale in (0.0, 0.5, 1.0):
        model.config = dataclasses.replace(model.config, action_noise_scale=scale)
        acts = model.predict_action(obs, state, batch["instruction"], generator=gen(3))
        g = gen(3)  # the same stream: the extraction noise first, then the action noise
        with torch.inference_mode():
            h = model.extract_features(obs, batch["instruction"], generator=g)
            start = scale * torch.randn(3, K, A, generator=g)
            a = d.euler_sample(lambda x, tau: model.action_dit(x, tau, state, h=h), start, model.config.num_action_steps)
        torch.testing.assert_close(acts, a.clamp(-1, 1), rtol=1e-5, atol=1e-6)
        if scale == 0:
            zero_start = acts
    assert not torch.allclose(zero_start, acts, atol=1e-3)  # the scale reaches the actions


@pytest.mark.parametrize("detach", [True, False])
def test_detach_features_controls_gradient_into_video_dit(detach):
    model = tiny_model(detach_features=detach)
    trained_like(model)
    batch = tiny_batch(model.config)
    model.loss(batch, generator=gen(0))["action_loss"].backward()
    grads = [p.grad for p in model.video_dit.parameters()]
    nonzero = any(g is not None and g.abs().sum() > 0 for g in grads)
    assert nonzero == (not detach)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.action_dit.parameters())


def test_training_after_inference_mode_prediction():
    model = tiny_model()
    batch = tiny_batch(model.config)
    with torch.inference_mode():
        model.predict_action(batch["video"][:, :, 0], batch["state"], batch["instruction"])
    model.loss(batch)["loss"].backward()  # the rotary cache built above must not be an inference tensor


def test_action_only_has_no_video_loss_and_trains_video_dit_through_features():
    model = tiny_model(action_only=True)
    assert model.config.detach_features is False
    trained_like(model)
    out = model.loss(tiny_batch(model.config), generator=gen(0))
    assert out["video_loss"].item() == 0.0 and torch.equal(out["loss"], out["action_loss"])
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.video_dit.parameters())


def test_action_only_and_detach_features_have_one_rule():
    assert d.make_config("tiny", detach_features=None).detach_features is True  # unset: the release's
    assert d.make_config("tiny", action_only=True, detach_features=False).detach_features is False
    with pytest.raises(ValueError, match="action_only.*detach_features"):
        d.make_config("tiny", action_only=True, detach_features=True)


# --- losses -------------------------------------------------------------------------------------

def test_video_loss_ignores_conditioning_frame_target():
    model = tiny_model()
    trained_like(model)
    cfg = model.config
    batch = tiny_batch(cfg)
    latents = batch["video"]
    text = model.encode_text(batch["instruction"])
    tau_v = torch.tensor([0.2, 0.5, 0.9])
    noise = torch.randn(latents.shape, generator=gen(0))
    other = noise.clone()
    other[:, :, 0] += 3.0  # changes only the conditioning frame's target eps - x0
    base = model.video_flow_loss(latents, text, tau_v, noise)
    torch.testing.assert_close(model.video_flow_loss(latents, text, tau_v, other), base)
    other[:, :, 1] += 3.0  # a future frame's noise does count
    assert not torch.allclose(model.video_flow_loss(latents, text, tau_v, other), base)


def test_action_loss_ignores_masked_dims():
    model = tiny_model(action_dim=3)
    trained_like(model)
    cfg = model.config
    batch = tiny_batch(cfg)
    B, R = 3, cfg.repeat
    h = torch.randn(B, 10, cfg.video_width)
    mask = torch.tensor([1.0, 1.0, 0.0]).expand(B, cfg.action_horizon, 3)
    # at tau = 1 the input x_tau = eps does not depend on the actions: only the target does
    tau_a = torch.ones(B * R)
    noise = torch.randn(B * R, cfg.action_horizon, 3, generator=gen(0))
    base = model.action_flow_loss(h, batch["state"], batch["actions"], mask, tau_a, noise)
    changed = batch["actions"].clone()
    changed[..., 2] = 5.0
    torch.testing.assert_close(model.action_flow_loss(h, batch["state"], changed, mask, tau_a, noise), base)
    changed[..., 1] = 5.0
    assert not torch.allclose(model.action_flow_loss(h, batch["state"], changed, mask, tau_a, noise), base)
    # the batch path accepts a (A,) mask too
    batch["action_mask"] = torch.tensor([True, True, False])
    assert torch.isfinite(model.loss(batch)["action_loss"])


def test_action_loss_does_not_score_padded_steps():
    """A (B, K, A) mask leaves steps past an episode's end out of the loss: changing the actions
    on masked steps changes nothing, changing one real step does (this failed while the mask was
    per action dimension only and every padded 'hold' step was trained toward)."""
    cfg = d.make_config("tiny", action_dim=2)
    model = d.DiT4DiT(cfg)
    B, K, R = 2, cfg.action_horizon, cfg.repeat
    h = torch.randn(B, 10, cfg.video_width)
    state, actions = torch.randn(B, cfg.state_dim), torch.rand(B, K, 2) * 2 - 1
    mask = torch.ones(B, K, 2)
    mask[0, 2:] = 0  # sample 0: its episode ended after 2 steps
    tau_a, noise = torch.ones(B * R), torch.randn(B * R, K, 2, generator=gen(1))
    base = model.action_flow_loss(h, state, actions, mask, tau_a, noise)
    changed = actions.clone()
    changed[0, 2:] = 0.0  # what the padded steps hold does not matter
    torch.testing.assert_close(model.action_flow_loss(h, state, changed, mask, tau_a, noise), base)
    changed[0, 1] = 0.9
    assert not torch.allclose(model.action_flow_loss(h, state, changed, mask, tau_a, noise), base)


def test_euler_sampler_recovers_x0_from_exact_straight_line_velocity():
    x0 = torch.randn(4, 5)
    eps = torch.randn(4, 5)
    for steps in (1, 4, 10):
        out = d.euler_sample(lambda x, tau: (x - x0) / tau[:, None], eps.clone(), steps)
        torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)


def test_action_time_sampler_mean():
    tau = d.sample_action_time(200_000, generator=gen(0))
    assert abs(tau.mean().item() - 0.6 / 0.999) < 0.005
    assert tau.min() >= 0 and tau.max() <= 1 / 0.999 + 1e-6
    assert (tau > 0.5).float().mean() > 0.6  # more weight on noisy samples


def test_overfit_one_batch_halves_both_losses():
    model = tiny_model(seed=0, **PAPER_SWITCHES)
    batch = tiny_batch(model.config, B=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def evaluate():
        with torch.no_grad():
            outs = [model.loss(batch, generator=gen(100 + i)) for i in range(4)]
        return [sum(o[k].item() for o in outs) / 4 for k in ("video_loss", "action_loss")]

    v0, a0 = evaluate()
    g = gen(0)
    for _ in range(250):
        opt.zero_grad()
        model.loss(batch, generator=g)["loss"].backward()
        opt.step()
    v1, a1 = evaluate()
    assert v1 < 0.5 * v0 and a1 < 0.5 * a0, (v0, v1, a0, a1)


# --- bad input ----------------------------------------------------------------------------------

def model_and_good_inputs():
    """A tiny model, a valid batch, and its first frames, states and instructions."""
    model = tiny_model()
    good = tiny_batch(model.config)
    return model, model.config, good, good["video"][:, :, 0], good["state"], good["instruction"]


def test_bad_inputs_raise_value_error_naming_the_argument():
    model, cfg, good, obs, state, text = model_and_good_inputs()

    def bad(**changes):
        return {**good, **changes}

    nan_video = good["video"].clone()
    nan_video[0, 0, 0, 0, 0] = float("nan")
    cases = [
        ("video", lambda: model.loss(bad(video=good["video"][:, :, :2]))),  # wrong number of frames
        ("video", lambda: model.loss(bad(video=good["video"].to(torch.int64)))),  # wrong dtype
        ("video", lambda: model.loss(bad(video=nan_video))),  # NaN
        ("video", lambda: model.loss(bad(video=good["video"][..., :14, :14]))),  # not a multiple of the patch
        ("state", lambda: model.loss(bad(state=state[:, :2]))),
        ("actions", lambda: model.loss(bad(actions=good["actions"][:, :2]))),
        ("action_mask", lambda: model.loss(bad(action_mask=torch.ones(5)))),
        ("instruction", lambda: model.loss(bad(instruction=text[:2]))),
        ("batch", lambda: model.loss({"video": good["video"]})),
        ("obs", lambda: model.extract_features(obs[..., :15, :15], text)),
        ("obs", lambda: model.extract_features(obs[0], text)),
        ("instruction", lambda: model.extract_features(obs, torch.randn(3, 4, cfg.text_dim + 1))),
        ("state", lambda: model.predict_action(obs, state.double()[:, :1], text)),
        ("state", lambda: model.predict_action(obs, torch.full_like(state, float("nan")), text)),
        ("obs", lambda: model.predict_action(obs.numpy(), state, text)),
        ("obs", lambda: model.imagine_video(obs[:, :2], text)),
        ("extract_layer", lambda: d.make_config("tiny", extract_layer=2)),
        ("extract_layer", lambda: d.make_config("tiny", extract_layer=-1)),
        ("patch_size", lambda: d.make_config("tiny", patch_size=5)),
        ("preset", lambda: d.make_config("huge")),
        ("unknown config field", lambda: d.make_config("tiny", widht=3)),
        ("config", lambda: d.DiT4DiT({"image_size": 16})),
        ("tokenizer", lambda: d.DiT4DiT(d.make_config("paper", video_depth=1, extract_layer=0))),
        ("DIT4DIT_KERNELS", lambda: d.select_backend("yes")),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=name):
            call()



def test_inputs_are_checked_for_dtype_range_mask_and_empty_batch():
    model, cfg, good, obs, state, text = model_and_good_inputs()

    def loss(**changes):
        return model.loss({**good, **changes})

    cases = [
        ("video: expected float32 like the model, got float64", lambda: loss(video=good["video"].double())),
        ("state: expected float32 like the model, got bfloat16", lambda: loss(state=state.bfloat16())),
        ("actions: expected float32 like the model, got float64", lambda: loss(actions=good["actions"].double())),
        (r"video: .*\[-1, 1\].*255", lambda: loss(video=(good["video"] + 1) * 127.5)),  # a 0..255 input
        ("action_mask: .*NaN", lambda: loss(action_mask=torch.tensor([1.0, float("nan")]))),
        (r"action_mask: .*\[0, 1\]", lambda: loss(action_mask=torch.tensor([1.0, 2.0]))),
        ("video: empty batch", lambda: loss(video=good["video"][:0], state=state[:0], actions=good["actions"][:0],
                                            instruction=[])),
        ("obs: expected float32 like the model, got float64", lambda: model.predict_action(obs.double(), state, text)),
        (r"obs: .*\[-1, 1\]", lambda: model.predict_action((obs + 1) * 127.5, state, text)),
        ("obs: empty batch", lambda: model.predict_action(obs[:0], state[:0], [])),
        ("instruction: expected float32", lambda: tiny_model(text_encoder="embeddings").predict_action(
            obs, state, torch.randn(3, 4, cfg.text_dim, dtype=torch.float64))),
    ]
    for size in (12, 32):  # the model was configured for 16x16 frames
        small = torch.zeros(3, 3, size, size)
        cases.append((f"obs: frames are {size}x{size} pixels.*image_size=16", lambda s=small: model.predict_action(s, state, text)))
        cases.append((f"obs: frames are {size}x{size}", lambda s=small: model.imagine_video(s, text)))
        video = torch.zeros(3, 3, 1 + cfg.num_future_frames, size, size)
        cases.append((f"video: frames are {size}x{size}", lambda v=video: loss(video=v)))
    for message, call in cases:
        with pytest.raises(ValueError, match=message):
            call()
    # the boundaries of the accepted ranges still pass
    assert torch.isfinite(loss(video=good["video"].clamp(-1, 1).sign(), action_mask=torch.tensor([1.0, 0.0]))["loss"])


def test_config_fields_are_type_and_range_checked_from_the_dataclass():
    # every field is checked from its own annotation: a value of the wrong type is refused
    for f in dataclasses.fields(d.DiT4DiTConfig):
        with pytest.raises(ValueError, match=f"^config field {f.name}="):
            d.make_config("tiny", **{f.name: object()})
    bad = [
        ("extract_layer", 1.0), ("extract_layer", True), ("extract_layer", "0"), ("extract_layer", 2),
        ("abs_pos_embed", "no"), ("abs_pos_embed", 1), ("rope_theta", 0), ("rope_theta", -1.0),
        ("rope_theta", float("inf")), ("video_loss_weight", float("nan")), ("video_loss_weight", -0.5),
        ("tau_f", 0.0), ("tau_f", 1.5), ("action_dropout", 1.0), ("image_size", True), ("image_size", 16.0),
        ("repeat", 0), ("repeat", 2.0), ("detach_features", "yes"), ("action_only", 0), ("text_encoder", 3),
        ("adaln_lora_rank", -1), ("num_action_steps", None), ("video_time_embed", "cosmos"),  # needs LoRA
        ("video_time_embed", "dit"), ("rope_pairs", "pairs"), ("rope_scale", (1.0, 3.0)), ("rope_scale", [1, 0, 1]),
        ("rope_scale", "1,3,3"), ("video_qk_norm_eps", 0.0), ("video_padding_mask", 1), ("text_proj_dim", -1),
        ("action_hidden_dim", 2560.0), ("action_max_len", 2), ("action_time_shift", 2),
        ("action_noise_scale", -0.1), ("action_noise_scale", float("nan")),
    ]
    for name, value in bad:
        with pytest.raises(ValueError, match=f"^config field {name}=") as err:
            d.make_config("tiny", **{name: value})
        assert "\n" not in str(err.value)
    cfg = d.make_config("tiny", video_loss_weight=0, tau_f=1.0, rope_theta=500, action_dropout=0.5)
    assert cfg.video_loss_weight == 0 and cfg.rope_theta == 500  # an int is a fine float
    assert d.make_config("tiny", rope_scale=[1, 3, 3]).rope_scale == (1, 3, 3)  # a config read back from JSON
    with pytest.raises(dataclasses.FrozenInstanceError):  # checked once, at construction: then frozen
        cfg.extract_layer = 0.0


def test_embeddings_config_rejects_strings_and_takes_tensors():
    model = tiny_model(text_encoder="embeddings")
    assert model.text_encoder is None
    cfg = model.config
    batch = tiny_batch(cfg)
    with pytest.raises(ValueError, match="instruction"):
        model.loss(batch)
    del batch["instruction"]
    batch["text"] = torch.randn(3, 6, cfg.text_dim)
    assert torch.isfinite(model.loss(batch)["loss"])


def test_select_backend_torch_and_back():
    before = d.backend()
    try:
        assert d.select_backend("0") == "torch"
        assert d.select_backend("auto") in ("torch", "kernels")
    finally:
        d.select_backend("1" if before == "kernels" else "0")


def test_backend_1_fails_loudly_when_extension_is_missing(monkeypatch):
    try:
        import kernels

        monkeypatch.setattr(kernels, "available", lambda: False)
    except ImportError:
        pass  # not importable at all: the error path is the same
    before = d.backend()
    with pytest.raises(RuntimeError, match="DIT4DIT_KERNELS=1"):
        d.select_backend("1")
    assert d.backend() == before


# --- normalizer and checkpoints -----------------------------------------------------------------

def test_normalizer_round_trip():
    x = np.random.default_rng(0).normal(size=(50, 7, 4)).astype(np.float32) * [1, 10, 0.1, 0]
    norm = Normalizer.fit(x)
    y = norm.normalize(x)
    assert isinstance(y, np.ndarray) and y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
    assert np.allclose(y[..., 3], 0)  # a constant dim maps to 0
    assert np.allclose(norm.unnormalize(y), x, atol=1e-5)
    t = torch.from_numpy(x)
    torch.testing.assert_close(norm.unnormalize(norm.normalize(t)), t, atol=1e-5, rtol=1e-5)
    again = Normalizer.from_state_dict(norm.state_dict())
    assert np.allclose(again.normalize(x), y)
    with pytest.raises(ValueError, match="normalizer"):
        Normalizer.from_state_dict({"low": torch.zeros(3)})


def tiny_normalizers(cfg):
    """(state, action) normalizers of the sizes a checkpoint of cfg must hold."""
    return (Normalizer(-torch.ones(cfg.state_dim), torch.ones(cfg.state_dim)),
            Normalizer(torch.zeros(cfg.action_dim), torch.arange(1.0, cfg.action_dim + 1)))


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    path = tmp_path / "ckpt.pt"
    state_norm, action_norm = tiny_normalizers(model.config)
    checkpoint.save_checkpoint(path, model, state_norm, action_norm, step=7)
    payload = checkpoint.load_checkpoint(path)
    assert payload["step"] == 7 and len(payload["sha256"]) == 64
    other, state_back, action_back = checkpoint.model_from_checkpoint(payload)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    x = np.arange(6.0).reshape(3, 2)
    assert np.allclose(action_back.normalize(x), action_norm.normalize(x))
    assert torch.equal(state_back.low, state_norm.low)
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    model = tiny_model()
    norms = tiny_normalizers(model.config)
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, model, *norms, step=1)
    with pytest.raises(Exception):
        checkpoint.save_checkpoint(path, model, *norms, step=2, bad=lambda: None)  # cannot be pickled mid-write
    assert checkpoint.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_write_temp_file_is_named_per_process_and_stale_ones_are_removed(tmp_path):
    seen = []
    atomic_write(tmp_path / "log.jsonl", lambda f: seen.append(os.listdir(tmp_path)) or f.write("x"), mode="w")
    assert seen == [[f".log.jsonl.tmp{os.getpid()}"]]  # two writers of one file never share a temp file
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    stale = [f".checkpoint.pt.tmp{dead_pid}", f".train_log.jsonl.tmp{dead_pid}"]
    alive = f".checkpoint.pt.tmp{os.getppid()}"  # some other process still writing
    for name in [*stale, alive, "notes.tmp1"]:
        (tmp_path / name).write_text("partial")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(str(tmp_path / n) for n in stale)
    assert sorted(os.listdir(tmp_path)) == sorted([alive, "log.jsonl", "notes.tmp1"])


def test_load_checkpoint_errors_name_the_file(tmp_path, damaged_copies):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        checkpoint.load_checkpoint(missing)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        checkpoint.load_checkpoint(tmp_path)
    path = tmp_path / "ckpt.pt"
    model = tiny_model()
    checkpoint.save_checkpoint(path, model, *tiny_normalizers(model.config))
    for damaged in damaged_copies(path):  # truncated.pt, garbage.pt
        with pytest.raises(ValueError, match=damaged.name):
            checkpoint.load_checkpoint(damaged)
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(ValueError, match="list.pt"):
        checkpoint.load_checkpoint(listed)
    partial = tmp_path / "partial.pt"
    torch.save({"model": {}, "step": 1}, partial)
    with pytest.raises(ValueError, match="partial.pt.*missing keys"):
        checkpoint.load_checkpoint(partial)


def test_checkpoint_content_hash_refuses_flipped_bytes(tmp_path, flipped_copy):
    path = tmp_path / "ckpt.pt"
    model = trained_like(tiny_model())
    checkpoint.save_checkpoint(path, model, *tiny_normalizers(model.config), step=3)
    flipped = flipped_copy(path)
    torch.load(flipped, weights_only=True)  # torch itself reads the damaged file without complaint
    with pytest.raises(ValueError, match="flipped.pt.*sha256"):
        checkpoint.load_checkpoint(flipped)


def test_checkpoint_contents_are_checked_with_one_error_naming_the_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    model = tiny_model()
    checkpoint.save_checkpoint(path, model, *tiny_normalizers(model.config), step=3)
    good = checkpoint.load_checkpoint(path)

    def variant(name, change):
        payload = {k: v for k, v in good.items() if k != "sha256"}
        payload = {**payload, "config": dict(payload["config"]), "model": dict(payload["model"])}
        change(payload)
        payload["sha256"] = checkpoint.checkpoint_sha256(payload)  # a well-formed file: only the content is wrong
        torch.save(payload, tmp_path / name)
        return tmp_path / name

    cases = [
        ("field.pt: .*unknown config field.*widht", variant("field.pt", lambda p: p["config"].update(widht=3))),
        ("type.pt: config field extract_layer=", variant("type.pt", lambda p: p["config"].update(extract_layer=0.5))),
        ("norm.pt: state_normalizer has 7 entries but config.state_dim=3",
         variant("norm.pt", lambda p: p.update(state_normalizer={"low": torch.zeros(7), "high": torch.ones(7)}))),
        ("anorm.pt: action_normalizer", variant("anorm.pt", lambda p: p.update(action_normalizer={"low": 1}))),
        ("weights.pt: .*weights do not fit.*missing.*final_linear",
         variant("weights.pt", lambda p: p["model"].pop("video_dit.final_linear.weight"))),
        ("shape.pt: .*weights do not fit.*patch_embed",
         variant("shape.pt", lambda p: p["model"].update({"video_dit.patch_embed.weight": torch.zeros(2, 2)}))),
        ("cfgtype.pt: config", variant("cfgtype.pt", lambda p: p.update(config=[1, 2]))),
    ]
    for message, file in cases:
        with pytest.raises(ValueError, match=message) as err:
            checkpoint.load_checkpoint(file)
        assert "\n" not in str(err.value)
    unhashed = variant("unhashed.pt", lambda p: None)
    payload = torch.load(unhashed, weights_only=True)
    del payload["sha256"]
    torch.save(payload, unhashed)
    with pytest.raises(ValueError, match=r"unhashed.pt: missing keys \['sha256'\]"):
        checkpoint.load_checkpoint(unhashed)


def test_video_time_embedding_tells_noise_levels_apart():
    """The toy presets embed 1000 * tau: the video DiT's time input at tau = 0.995 and 0.5 must
    differ (it did not when tau itself was embedded with a max period of 10 000: cosine 0.99).
    The paper preset keeps Cosmos-Predict2.5's sigma in [0, 1]."""
    seen = []
    for preset, scale in (("tiny", 1000.0), ("toy", 1000.0)):
        cfg = d.make_config(preset)
        assert cfg.video_time_scale == scale
        model = d.DiT4DiT(cfg)
        hook = model.video_dit.t_embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
        cond = torch.zeros(1, 3, 1, cfg.image_size, cfg.image_size)
        text = model.encode_text(["move to the red pad"])
        for tau in (0.995, 0.5):
            model.video_forward(cond, model.future_noise(cond), torch.tensor([tau]), text)
        hook.remove()
        torch.testing.assert_close(seen[-2][0, 1:], torch.full((cfg.num_future_frames,), 995.0))
        a, b = (d.timestep_embedding(t[0, 1], 256) for t in seen[-2:])
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) < 0.5
    assert d.make_config("paper").video_time_scale == 1.0


@pytest.mark.parametrize("switches", [PAPER_SWITCHES, d.TOY_SWITCHES], ids=["paper", "toy"])
def test_toy_switches_train_and_match_the_release_path(switches):
    """The paper's choices and every toy departure build, train (finite losses, gradients into
    both DiTs) and keep predict_action equal to the release's path (tests/oracle.py)."""
    model = tiny_model(**{**switches, "detach_features": False})
    trained_like(model)
    batch = tiny_batch(model.config)
    losses = model.loss(batch, generator=gen(0))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    for part in (model.video_dit, model.action_dit):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    model.eval()
    obs, state = batch["video"][:, :, 0], batch["state"]
    fast = model.predict_action(obs, state, batch["instruction"], generator=gen(3))
    with torch.inference_mode():
        slow = release_predict_action(model, obs, state, batch["instruction"], gen(3))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_conditioning_frame_features_and_direct_text_path():
    cfg = d.make_config("tiny", feature_frames="conditioning", action_text=True)
    model = trained_like(d.DiT4DiT(cfg)).eval()
    batch = tiny_batch(cfg)
    obs, state = batch["video"][:, :, 0], batch["state"]
    h = model.extract_features(obs, batch["instruction"], generator=gen(1))
    assert h.shape == (3, (cfg.image_size // cfg.patch_size) ** 2, cfg.video_width)  # one frame's tokens
    # the instruction reaches the action DiT even when the video DiT's cross-attention is cut
    for block in model.video_dit.blocks:
        torch.nn.init.zeros_(block.cross_attn.out.weight)
    a = model.predict_action(obs, state, ["move to the red pad"] * 3, generator=gen(2))
    b = model.predict_action(obs, state, ["move to the blue pad"] * 3, generator=gen(2))
    assert (a - b).abs().max() > 1e-3


def test_x0_residual_fresh_model_imagines_the_conditioning_frame():
    """x0_residual: a fresh model (zero final layer) predicts x0 = the conditioning frame, so the
    Euler sampler lands exactly on a still scene; the default velocity model lands on zeros."""
    model = tiny_model(video_prediction="x0_residual")
    obs = tiny_batch(model.config)["video"][:, :, 0]
    video = model.imagine_video(obs, ["move to the red pad"] * 3, generator=gen(0))
    for t in range(1, video.shape[2]):
        torch.testing.assert_close(video[:, :, t], obs, rtol=1e-4, atol=1e-4)
