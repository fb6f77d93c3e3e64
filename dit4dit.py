"""DiT4DiT: a video diffusion transformer whose hidden states drive an action diffusion transformer.

Ma et al., "DiT4DiT: Jointly Modeling Video Dynamics and Actions for Generalizable Robot
Control", arXiv 2603.10448 (2026). This module is a compact reference of the whole model.

The method in four lines:
  1. A video DiT (Cosmos-Predict2.5 style) learns to predict future frames from the current
     frame and an instruction by flow matching (the video loss).
  2. For control, a *separate* forward of the same video DiT starts from pure noise at a fixed
     timestep tau_f and stops after block `extract_layer`; that block's tokens h are the
     visual features (no frames are ever decoded during control).
  3. An action DiT (GR00T-N1.5 style flow-matching head) cross-attends to h and denoises an
     action chunk (the action loss).
  4. Both are trained together: L = L_action + lambda * L_video, with three independent
     timesteps: tau_v (video), tau_f (extraction, fixed), tau_a (action).

Dimension letters (used in every shape comment):
  B batch, C channels (latent), T frames (latent), H W height and width, h w patches along
  H and W, p patch size, N tokens, D transformer width, nh heads, hd head dim, S text tokens,
  K action horizon (chunk), A action dim, P state dim, G modulation groups, R repeat factor.

Flow-matching convention (both branches): tau in [0, 1], tau = 0 is data, tau = 1 is noise;
  x_tau = (1 - tau) * x0 + tau * eps,   target velocity v* = eps - x0,
  sampling integrates Euler steps from tau = 1 down to 0: x <- x - dtau * v_hat.

Reading order: the config and its presets; building blocks; the blocks of both DiTs; the
tokenizer and text interfaces; VideoDiT; ActionDiT; the joint DiT4DiT (one video call for every
use, the dual flow-matching loss beside the feature extraction, then inference). What is not the
method lives elsewhere: bridges/ (input checks, checkpoints, frames, normalizer, datasets, the
released weights), suites/ (simulated benchmarks), eval_sim.py, train_toy.py. Section numbers
(§3.x) refer to docs/design.md.

Kernels: `modulate`, `residual_modulate`, `qk_norm_rope` and `attention` run the fused C++/CUDA
ops of the `kernels` package when it is built, and otherwise the pure-PyTorch reference bodies of
kernels/reference.py (kernels/dispatch.py: `select_backend`, environment variable
DIT4DIT_KERNELS=auto|0|1 read at import; `backend()` says which is active).
"""
import dataclasses
import math
import types
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

# The fused ops (C++/CUDA when built, else the PyTorch references), behind one switch:
from bridges.inputs import check_batch, check_frames, check_tensor, check_text, model_dtype
from kernels.dispatch import (attention, backend, modulate, qk_norm_rope,  # noqa: F401
                              residual_modulate, select_backend)

COND_TAU = 1e-4  # timestep given to the (clean) conditioning frame, as in Cosmos-Predict2.5
X0_MIN_TAU = 0.05  # with x0_residual prediction, v = (x_tau - x0_hat) / max(tau, X0_MIN_TAU)


# ----------------------------------------------------------------------------------------------
# Configuration: one dataclass, checked from its own annotations and field rules at construction
# (frozen afterwards, so a config once made stays valid), and the named presets.

def _rule(default, test, allowed):
    """A config field whose value must pass `test`; `allowed` says so in the error message."""
    return field(default=default, metadata={"rule": (test, allowed)})


def _at_least(low, default):
    return _rule(default, lambda v: v >= low, f">= {low}")


def _between(low, high, default, closed="[)"):
    """A number in the interval from low to high; closed says which ends belong to it."""
    def test(v):
        above = v >= low if closed[0] == "[" else v > low
        return above and (v <= high if closed[1] == "]" else v < high)
    return _rule(default, test, f"in {closed[0]}{low}, {high}{closed[1]}")


@dataclass(frozen=True)
class DiT4DiTConfig:
    # data
    image_size: int = 64            # H = W of frames in pixels
    num_future_frames: int = 2      # F: future frames predicted after the current one
    action_horizon: int = 8         # K: actions per chunk
    action_dim: int = 2             # A (zero-padded to this; a mask marks real dims)
    state_dim: int = 4              # P: proprioceptive state
    # tokenizer and text
    latent_channels: int = 3        # C of the tokenizer's latents (3: pixels; 16: Wan2.1 VAE)
    text_encoder: Literal["bytes", "embeddings"] = "bytes"  # trainable byte-level encoder, or the
                                    # caller gives (B, S, text_dim) features
    text_dim: int = 64              # D_text: width of the text features the model is given
    text_proj_dim: int = _at_least(0, 0)  # 0: the video cross-attention reads the text features;
                                    # d > 0: through a trainable Linear(text_dim -> d) + GELU first
                                    # (Cosmos-Predict2.5's crossattn_proj: 100 352 -> 1024)
    text_depth: int = _at_least(0, 1)  # transformer layers of the byte-level text encoder
    text_max_len: int = 48          # bytes per instruction (truncated / padded)
    # video DiT (Cosmos-Predict2.5 style)
    patch_size: int = 8             # p: patch (1, p, p) on latents
    video_width: int = 96           # D_video
    video_depth: int = 4            # blocks
    video_heads: int = 4            # nh (hd = D_video / nh, at least 6 for the 3D rotary split)
    video_mlp_dim: int = 256        # MLP hidden width
    adaln_lora_rank: int = _at_least(0, 0)  # 0: per-block adaLN projection; r > 0: adaLN-LoRA of
                                    # rank r (paper: 256)
    video_time_embed: Literal["mlp", "cosmos"] = "mlp"  # "mlp": 256-d sinusoid -> MLP -> SiLU feeds
                                    # the modulations; "cosmos" (needs adaln_lora_rank > 0): D-wide
                                    # sinusoid -> RMSNorm -> SiLU, and the LoRA's shared term is
                                    # Linear -> SiLU -> Linear(D -> 3D) of the sinusoid
    rope_theta: float = _rule(10000.0, lambda v: v > 0, "> 0")  # rotary base (0: every angle NaN)
    rope_pairs: Literal["interleaved", "half"] = "interleaved"  # rotary channel pairs (2i, 2i+1),
                                    # or (i, i + hd/2) as Cosmos pairs them
    rope_scale: tuple = _rule((1.0, 1.0, 1.0), lambda v: len(v) == 3 and all(
        _has_type(s, float) and s > 0 for s in v), "three finite numbers > 0 (t, h, w)")
                                    # NTK-aware rotary scaling per axis (t, h, w)
                                    # (Cosmos-Predict2.5: (1, 3, 3))
    video_qk_norm_eps: float = _between(0, 1, 1e-6, "()")  # eps of the q/k RMSNorms (Cosmos: 1e-5)
    video_padding_mask: bool = False  # a padding-mask input channel after the condition mask
                                    # (Cosmos: 16 latent + 1 condition-mask + 1 padding-mask)
    video_time_scale: float = _rule(1000.0, lambda v: v > 0, "> 0")  # the video DiT embeds
                                    # time_scale * tau (Cosmos-Predict2.5: 1, see VideoDiT.forward)
    video_prediction: Literal["velocity", "x0_residual"] = "velocity"  # the video DiT's output:
                                    # the velocity (Cosmos), or the clean latents minus the
                                    # conditioning frame; loss and sampler stay in velocity space
    video_text_adaln: bool = False  # the pooled instruction joins the video DiT's adaLN input, as a
                                    # class label does in DiT (toy departure; Cosmos: cross-attn)
    abs_pos_embed: bool = True      # add fixed 2D sin-cos positions to the patch tokens (toy
                                    # departure, see VideoDiT.forward); False: rotary only (Cosmos)
    # action DiT (GR00T-N1.5 style)
    action_width: int = 128         # D_action
    action_depth: int = 4           # blocks (even: cross-attn to h, odd: self-attn)
    action_heads: int = 4
    action_mlp_dim: int = 256
    action_dropout: float = _between(0, 1, 0.0)  # dropout in the action DiT blocks
    action_hidden_dim: int = _at_least(0, 0)  # width of the state encoder, output projection and
                                    # decoder (0: action_width; the release: 2560)
    action_max_len: int = _at_least(0, 0)  # rows of the learned position table of the action
                                    # tokens, the first K used (0: K rows; the release: 1024)
    action_time_shift: Literal[0, 1] = 0  # the action timestep sinusoid divides by 128 - shift
                                    # (the release: 1, diffusers' downscale_freq_shift)
    action_text: bool = False       # the instruction also reaches the action DiT directly: its
                                    # tokens join h as cross-attention context and its mean joins
                                    # the timestep conditioning (toy departure; the paper: only
                                    # through the video DiT's features)
    # the method (§3.4-3.8)
    extract_layer: int = _at_least(0, 1)  # 0-based block whose output is the feature h (paper:
                                    # 17 of 28)
    tau_f: float = _between(0, 1, 0.995, "(]")  # timestep of the extraction pass (released: the
                                    # sampler's first step)
    feature_frames: Literal["all", "conditioning"] = "all"  # tokens of h the action DiT reads: all
                                    # frames (paper) or the conditioning frame's (toy departure: at
                                    # tau_f the future frames' tokens are mostly one noise draw)
    detach_features: bool | None = None  # True: extraction under no_grad (release); False: L_action
                                    # also trains the video DiT through h (paper); None: True unless
                                    # action_only
    action_only: bool = False       # ablation: no video loss; implies detach_features=False
    repeat: int = 4                 # R: action-noise draws per sample, sharing h and state
    video_loss_weight: float = _at_least(0, 1.0)  # lambda in L = L_action + lambda * L_video
    num_action_steps: int = 4       # Euler steps of the action sampler (4: tau = 1, .75, .5, .25)
    action_noise_scale: float = _at_least(0, 1.0)  # std of the action sampler's starting noise: 1
                                    # samples the learned distribution (paper); 0 starts at the
                                    # noise's mean, a deterministic chunk given h (toy departure)
    num_video_steps: int = 10       # Euler steps of imagine_video (visualization only)

    def __post_init__(self):
        if isinstance(self.rope_scale, list):  # a config read back from JSON
            object.__setattr__(self, "rope_scale", tuple(self.rope_scale))
        # The action-only baseline keeps the architecture and lets the action loss train the video
        # DiT through h (docs/design.md §6): it implies detach_features=False, contradicts True.
        if self.detach_features is None:
            object.__setattr__(self, "detach_features", not self.action_only)
        _check_config(self)


def _has_type(value, kind):
    """int: an int, not a bool; float: a finite number (an int is fine, a bool is not)."""
    if kind is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _field_ok(value, kind, rule):
    """(ok, what the field allows) from the field's annotation and rule. Unruled ints are >= 1."""
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        return (any(type(value) is type(c) and value == c for c in choices),
                " or ".join(map(repr, choices)))
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # bool | None: resolved by now
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if rule is None:
        rule = ((lambda v: v >= 1), ">= 1") if kind is int else ((lambda v: True), "")
    test, allowed = rule
    name = {int: "an int", float: "a finite number", bool: "True or False"}.get(kind, kind.__name__)
    ok = _has_type(value, kind) and test(value)
    return ok, f"{name} {allowed}".strip() if kind in (int, float) else (allowed or name)


def _check_config(cfg):
    """Every field's type and range from DiT4DiTConfig's annotations and rules, then the rules
    between fields. ValueError "config field NAME=VALUE (TYPE): must be ..." naming the first."""
    kinds = typing.get_type_hints(DiT4DiTConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        ok, allowed = _field_ok(value, kinds[f.name], f.metadata.get("rule"))
        if not ok:
            raise ValueError(f"config field {f.name}={value!r} ({type(value).__name__}): "
                             f"must be {allowed}")
    if cfg.action_only and cfg.detach_features:
        raise ValueError("action_only=True (train_toy.py --action-only) trains the video DiT "
                         "through the features: it cannot be combined with detach_features=True "
                         "(--detach-features)")
    if cfg.extract_layer >= cfg.video_depth:
        raise ValueError(f"config field extract_layer={cfg.extract_layer} is out of range for "
                         f"video_depth={cfg.video_depth} (0 .. {cfg.video_depth - 1})")
    for name in ("video", "action"):
        width, heads = getattr(cfg, f"{name}_width"), getattr(cfg, f"{name}_heads")
        if width % heads:
            raise ValueError(f"{name}_width={width} is not divisible by {name}_heads={heads}")
    hd = cfg.video_width // cfg.video_heads
    if hd < 6 or hd % 2:
        raise ValueError(f"video head dim {hd} must be even and >= 6 (3D rotary split)")
    if cfg.rope_scale != (1, 1, 1) and hd < 12:
        raise ValueError(f"config field rope_scale={cfg.rope_scale}: NTK scaling needs >= 4 rotary "
                         f"channels per axis, a video head dim >= 12 (got {hd})")
    if cfg.video_time_embed == "cosmos" and cfg.adaln_lora_rank == 0:
        raise ValueError("config field video_time_embed='cosmos' needs adaln_lora_rank > 0 "
                         "(Cosmos's shared modulation term is the LoRA's)")
    if cfg.action_max_len and cfg.action_max_len < cfg.action_horizon:
        raise ValueError(f"config field action_max_len={cfg.action_max_len} is below "
                         f"action_horizon={cfg.action_horizon} (the position table needs a row "
                         f"per action token)")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size={cfg.image_size} is not a multiple of "
                         f"patch_size={cfg.patch_size}")
    if cfg.text_encoder == "bytes" and cfg.text_dim % max(1, cfg.text_dim // 32):
        raise ValueError(f"text_dim={cfg.text_dim} is not divisible by the byte text encoder's "
                         f"{cfg.text_dim // 32} heads (text_dim // 32)")


def _check_model_parts(config, tokenizer):
    if not isinstance(config, DiT4DiTConfig):
        raise ValueError(f"config: expected a DiT4DiTConfig, got {type(config).__name__}")
    if getattr(tokenizer, "channels", None) != config.latent_channels:
        raise ValueError(f"tokenizer: gives {getattr(tokenizer, 'channels', None)} latent channels "
                         f"but config.latent_channels={config.latent_channels} (a VAE tokenizer "
                         f"is needed?)")
    f = getattr(tokenizer, "spatial_factor", 1) * config.patch_size
    if config.image_size % f:
        raise ValueError(f"image_size={config.image_size} is not a multiple of the patch in "
                         f"pixels ({f} = tokenizer spatial factor x patch_size)")


# Presets: the fields each named configuration sets; the others keep DiT4DiTConfig's defaults.

# The toy's departures from the paper (README, "Where this reference departs"): what made the
# policy learn the toy suite from scratch in minutes. detach_features=False is the paper's path.
TOY_SWITCHES = dict(video_prediction="x0_residual", video_text_adaln=True, action_text=True,
                    feature_frames="conditioning", detach_features=False, action_noise_scale=0.0)

PRESETS = {
    # The main job: CPU training in minutes on the toy suite (64x64 RGB; A and P are set from the
    # data). Sized by compute: patch 16 gives 16 tokens a frame (a batch of 32 is 32 x 3 x 16 =
    # 1536 video tokens); x0_residual prediction makes such large pixel patches learnable (see
    # video_forward). extract_layer 1 is the second of four blocks (the paper: ~60% depth).
    # repeat 2 (release: 4): R action-noise draws per sample cost a quarter of a CPU step at 4.
    "toy": dict(patch_size=16, repeat=2, **TOY_SWITCHES),
    # The toy's switches at test size: a forward takes milliseconds.
    "tiny": dict(image_size=16, num_future_frames=2, action_horizon=4, action_dim=2, state_dim=3,
                 text_dim=16, text_depth=1, text_max_len=16, patch_size=4,
                 video_width=64, video_depth=2, video_heads=4, video_mlp_dim=128,
                 action_width=32, action_depth=2, action_heads=2, action_mlp_dim=64,
                 extract_layer=0, repeat=2, num_video_steps=4, **TOY_SWITCHES),
    # The published model (§3.9) with RoboCasa-GR1 data: chunk 16 with 8 future frames (LIBERO
    # would be chunk 8 with 4 frames). A and P are GR00T's padded maxima. The video DiT is
    # Cosmos-Predict2.5-2B parameter for parameter (bridges/cosmos.py converts its weights) and
    # the action DiT has the released head's shapes. Latents come from a Wan2.1 VAE (16 channels,
    # 8x spatial) and text from a frozen LM (Qwen2.5-VL-7B's 28 layers x 3584, standardized and
    # stacked: 100 352-d features), both outside this module: pass tokenizer= and embeddings.
    "paper": dict(image_size=256, num_future_frames=8, action_horizon=16, action_dim=32,
                  state_dim=64, latent_channels=16, text_encoder="embeddings", text_dim=100352,
                  text_proj_dim=1024, patch_size=2, video_width=2048, video_depth=28,
                  video_heads=16, video_mlp_dim=8192, adaln_lora_rank=256,
                  video_time_embed="cosmos", rope_pairs="half", rope_scale=(1.0, 3.0, 3.0),
                  video_qk_norm_eps=1e-5, video_padding_mask=True, abs_pos_embed=False,
                  video_time_scale=1.0, action_width=768, action_depth=16, action_heads=12,
                  action_mlp_dim=3072, action_dropout=0.2, action_hidden_dim=2560,
                  action_max_len=1024, action_time_shift=1, extract_layer=17, tau_f=0.995,
                  repeat=4, num_action_steps=4, num_video_steps=35),
}


def make_config(preset, **overrides):
    """The DiT4DiTConfig of PRESETS[preset] with fields replaced; ValueError names an unknown
    preset or field (or a contradiction, see DiT4DiTConfig.__post_init__)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(DiT4DiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"overrides: unknown config field(s) {unknown}")
    return DiT4DiTConfig(**{**PRESETS[preset], **overrides})


# ----------------------------------------------------------------------------------------------
# Small building blocks: timestep embeddings, 3D rotary embeddings, RMSNorm, MLPs.

def _compute_dtype(dtype):
    """float32 for float32 and narrower dtypes, float64 for float64 (the model's float64 checks)."""
    return torch.promote_types(dtype, torch.float32)


def timestep_embedding(t, dim, max_period=10000.0, shift=0):
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps t (...,) -> (..., dim) in
    float32 (float64 for float64 t), at frequencies max_period^(-i / (dim/2 - shift)), i < dim/2
    (shift 1 is diffusers' `downscale_freq_shift=1`, which the released action head uses)."""
    half = dim // 2
    i = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * i / (half - shift))
    args = t.to(_compute_dtype(t.dtype))[..., None] * freqs  # (..., dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (..., dim)


class TimestepMLP(nn.Module):
    """sinusoid(t) -> Linear -> SiLU -> Linear: the conditioning vector of a DiT (out_dim: its
    width, default dim; shift: see timestep_embedding)."""

    def __init__(self, dim, freq_dim=256, bias=True, out_dim=None, shift=0):
        super().__init__()
        self.freq_dim, self.shift = freq_dim, shift
        self.fc1 = nn.Linear(freq_dim, dim, bias=bias)
        self.fc2 = nn.Linear(dim, out_dim or dim, bias=bias)

    def mlp(self, emb):
        return self.fc2(F.silu(self.fc1(emb.to(self.fc1.weight.dtype))))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim, shift=self.shift))


def rope_3d(T, h, w, head_dim, theta, device, scale=(1.0, 1.0, 1.0), pairs="interleaved"):
    """Rotations of 3D rotary embeddings for a (T, h, w) token grid, N = T*h*w tokens.

    The head dim is split into a temporal part and two equal spatial parts (Cosmos-Predict2.5's
    split: hd//6*2 channels each for rows and columns, the rest for time: 44/42/42 at hd 128).
    scale (t, h, w) stretches each axis by NTK-aware scaling, theta_axis = theta * s^(d/(d-2)) for
    an axis of d channels (Cosmos-Predict2.5: (1, 3, 3)). pairs="interleaved": channels (2i, 2i+1)
    form a pair, returns complex (N, hd/2); pairs="half" (Cosmos): channel i pairs with i + hd/2,
    returns (cos, sin), each (N, hd) in float32, computed as Cosmos computes them (frequencies
    1 / theta_axis^(2i/d)) so that converted weights see the same table bit for bit."""
    d_hw = head_dim // 6 * 2
    d_t = head_dim - 2 * d_hw

    def axis(n, d, s):  # positions 0..n-1 rotated at d/2 frequencies -> (n, d/2)
        theta_axis = theta * (s ** (d / (d - 2)) if s != 1 else 1.0)
        if pairs == "interleaved":
            freqs = theta_axis ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
        else:
            freqs = 1.0 / theta_axis ** (torch.arange(0, d, 2, device=device,
                                                      dtype=torch.float32) / d)
        return torch.arange(n, device=device, dtype=torch.float32)[:, None] * freqs

    ang = torch.cat([axis(T, d_t, scale[0])[:, None, None].expand(T, h, w, d_t // 2),
                     axis(h, d_hw, scale[1])[None, :, None].expand(T, h, w, d_hw // 2),
                     axis(w, d_hw, scale[2])[None, None, :].expand(T, h, w, d_hw // 2)],
                    dim=-1)  # (T, h, w, hd/2)
    ang = ang.reshape(T * h * w, head_dim // 2)  # (N, hd/2)
    if pairs == "interleaved":
        return torch.polar(torch.ones_like(ang), ang)  # (N, hd/2) e^{i*angle}
    ang = torch.cat([ang, ang], dim=-1)  # (N, hd): channel i and i + hd/2 share an angle
    return ang.cos(), ang.sin()


def sincos_2d(h, w, dim, device):
    """Fixed 2D sinusoidal absolute positions of an (h, w) patch grid -> (h*w, dim): half the
    channels encode the row, half the column (as in ViT/MAE's 2D sin-cos embedding)."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freqs  # (h, dim/4)
    cols = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freqs  # (w, dim/4)
    emb = torch.cat([rows.sin()[:, None].expand(h, w, quarter),
                     rows.cos()[:, None].expand(h, w, quarter),
                     cols.sin()[None].expand(h, w, quarter),
                     cols.cos()[None].expand(h, w, quarter)], dim=-1)  # (h, w, 4 * quarter)
    return F.pad(emb, (0, dim - 4 * quarter)).reshape(h * w, dim)  # (h, w, dim) -> (h*w, dim)


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain, statistics in fp32 (float64 for float64 x); per head on q and
    k, and on Cosmos's timestep sinusoid."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        acc = _compute_dtype(x.dtype)
        return F.rms_norm(x.to(acc), x.shape[-1:], self.weight.to(acc), self.eps).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, dim, hidden, bias, approximate="none", dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.approximate = approximate
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x), approximate=self.approximate))))


class Attention(nn.Module):
    """Multi-head attention; K/V come from the input (self) or from a context (cross).

    `project_kv(context)` is separate so a caller can compute the K/V of a fixed context once
    and pass them back as `kv=` on every call (the action DiT's Euler steps, §3.8)."""

    def __init__(self, dim, heads, context_dim=None, qk_norm=False, bias=False, norm_eps=1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else nn.Identity()

    def _split(self, x):
        # (B, L, D) -> (B, nh, L, hd)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def project_kv(self, context):
        """context (B, L, D_ctx) -> (k, v), each (B, nh, L, hd)."""
        return self.k_norm(self._split(self.k(context))), self._split(self.v(context))

    def forward(self, x, context=None, kv=None, rope=None):
        if rope is not None:  # self-attention (with qk_norm): q/k RMSNorm and 3D rotation fused
            q, k, v = (self._split(proj(x)) for proj in (self.q, self.k, self.v))  # (B, nh, L, hd)
            q, k = qk_norm_rope(q, self.q_norm, rope), qk_norm_rope(k, self.k_norm, rope)
        else:
            q = self.q_norm(self._split(self.q(x)))  # (B, nh, L, hd)
            k, v = kv if kv is not None else self.project_kv(x if context is None else context)
        o = attention(q, k, v)  # (B, nh, L, hd)
        return self.out(o.transpose(1, 2).flatten(2))  # (B, nh, L, hd) -> (B, L, D)


# ----------------------------------------------------------------------------------------------
# Video DiT blocks (§3.3): per-frame adaLN-Zero, self-attn, cross-attn, MLP.

class Modulation(nn.Module):
    """Produce n modulation vectors (shift, scale[, gate]) per frame from the timestep embedding.

    rank == 0: one Linear D -> n*D (the DiT form). rank > 0: adaLN-LoRA (Cosmos-Predict2.5,
    used at paper scale): a low-rank D -> r -> n*D projection plus a term shared by all blocks."""

    def __init__(self, dim, n, rank):
        super().__init__()
        self.n = n
        if rank == 0:
            self.proj = nn.Linear(dim, n * dim, bias=False)
        else:
            self.proj = nn.Sequential(nn.Linear(dim, rank, bias=False),
                                      nn.Linear(rank, n * dim, bias=False))

    def forward(self, c, shared=None):
        out = self.proj(c)  # (B, T, n*D)
        if shared is not None:
            out = out + shared[..., : out.shape[-1]]
        return out.chunk(self.n, dim=-1)  # n x (B, T, D)


def per_frame(gate, x):
    """Multiply tokens x (B, N, D) grouped by frame by gate (B, T, D)."""
    B, N, D = x.shape
    T = gate.shape[1]
    return (x.view(B, T, N // T, D) * gate[:, :, None]).view(B, N, D)  # (B, T, N/T, D) -> (B, N, D)


class VideoBlock(nn.Module):
    def __init__(self, dim, heads, mlp_dim, text_dim, lora_rank, qk_eps):
        super().__init__()
        self.mod_self, self.mod_cross, self.mod_mlp = (Modulation(dim, 3, lora_rank)
                                                       for _ in range(3))
        self.self_attn = Attention(dim, heads, qk_norm=True, norm_eps=qk_eps)
        self.cross_attn = Attention(dim, heads, context_dim=text_dim, qk_norm=True, norm_eps=qk_eps)
        self.mlp = MLP(dim, mlp_dim, bias=False)

    def forward(self, x, c, shared, text, rope):
        # x (B, N, D) tokens; c (B, T, D) = SiLU(timestep embedding) per frame; each sublayer is
        # LayerNorm -> modulate(shift, scale) -> op -> gated residual (gate 0 at init: adaLN-Zero):
        #   x = x + per_frame(gate, op(modulate(x, shift, scale))).
        # The gated residual of one sublayer and the modulate of the next are one residual_modulate.
        shift1, scale1, gate1 = self.mod_self(c, shared)
        shift2, scale2, gate2 = self.mod_cross(c, shared)
        shift3, scale3, gate3 = self.mod_mlp(c, shared)
        h = modulate(x, shift1, scale1)
        x, h = residual_modulate(x, self.self_attn(h, rope=rope), gate1, shift2, scale2)
        x, h = residual_modulate(x, self.cross_attn(h, context=text), gate2, shift3, scale3)
        return x + per_frame(gate3, self.mlp(h))


# ----------------------------------------------------------------------------------------------
# Action DiT block (§3.6): adaLN without gate, cross- or self-attention, MLP.

class ActionBlock(nn.Module):
    """GR00T-style block: adaLN (shift, scale; no gate) -> attention -> residual; LayerNorm ->
    MLP -> residual.

    Even blocks cross-attend to the video features h (K/V projected from D_video), odd blocks
    self-attend over [state, actions]. The block owns its modulation Linear `mod`, but ActionDiT
    applies it (step_inputs): it reads only the conditioning vector, so inference computes it once
    for all Euler steps."""

    def __init__(self, dim, heads, mlp_dim, context_dim, dropout):
        super().__init__()
        self.is_cross = context_dim is not None
        self.mod = nn.Linear(dim, 2 * dim)
        self.attn = Attention(dim, heads, context_dim=context_dim, bias=True)
        self.drop = nn.Dropout(dropout)
        self.mlp = MLP(dim, mlp_dim, bias=True, approximate="tanh", dropout=dropout)

    def forward(self, x, shift, scale, kv):
        """x (B, L, D); shift, scale (B, 1, D), the halves of self.mod(c): one group per sample."""
        # dropout twice on the attention output, as released (the attention module's output
        # dropout, then the block's final dropout); with dropout 0 both are the identity
        x = x + self.drop(self.drop(self.attn(modulate(x, shift, scale), kv=kv)))
        return x + self.mlp(F.layer_norm(x, x.shape[-1:], eps=1e-6))


# ----------------------------------------------------------------------------------------------
# Boundaries: the video tokenizer and the text encoder (§3.2, 3.3).

class PixelTokenizer(nn.Module):
    """The default video tokenizer: latents are the pixels in [-1, 1] (§3.2).

    A real VAE (the paper: Wan2.1, 16 channels, 8x spatial, 4x temporal) plugs in with the same
    interface: `channels`, `spatial_factor`, `latent_frames(T)`, `encode`, `decode`."""

    channels = 3
    spatial_factor = 1

    def latent_frames(self, num_frames):
        return num_frames

    def encode(self, video):  # (B, 3, T, H, W) -> (B, C, T', H/s, W/s)
        return video

    def decode(self, latents):  # (B, C, T', h, w) -> (B, 3, T, H, W)
        return latents.clamp(-1, 1)


class ByteTextEncoder(nn.Module):
    """A small trainable text encoder over UTF-8 bytes (the paper uses a frozen 7B LM, §3.3).

    Instructions are truncated / padded to `max_len` bytes, so one instruction always gives the
    same features whatever the batch. The pad bytes stay visible to the video DiT's
    cross-attention (the attention op takes no mask); they are a learned constant suffix."""

    PAD = 256

    def __init__(self, dim, depth, max_len):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(257, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        heads = max(1, dim // 32)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.LayerNorm(dim), Attention(dim, heads, bias=True),
                           nn.LayerNorm(dim), MLP(dim, 4 * dim, bias=True)]) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.embed.weight, std=0.02)

    def tokenize(self, texts):
        ids = torch.full((len(texts), self.max_len), self.PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            b = list(text.encode("utf-8"))[: self.max_len]
            ids[i, : len(b)] = torch.tensor(b, dtype=torch.long)
        return ids  # (B, S)

    def forward(self, texts):
        x = self.embed(self.tokenize(texts).to(self.pos.device)) + self.pos  # (B, S, D_text)
        for ln1, attn, ln2, mlp in self.blocks:
            x = x + attn(ln1(x))
            x = x + mlp(ln2(x))
        return self.norm(x)


# ----------------------------------------------------------------------------------------------
# The video DiT (§3.3).

class VideoDiT(nn.Module):
    """Cosmos-Predict2.5-style video DiT: (latents + cond-mask channel [+ padding-mask channel])
    -> velocity per frame. With the `paper` preset's switches (video_time_embed="cosmos",
    rope_pairs="half", rope_scale, video_qk_norm_eps, video_padding_mask, text_proj_dim) it is
    diffusers' CosmosTransformer3DModel of Cosmos-Predict2.5, parameter for parameter:
    video_dit_state_from_cosmos converts its weights (tests/test_released_weights.py)."""

    def __init__(self, cfg):
        super().__init__()
        D, C, p, r = cfg.video_width, cfg.latent_channels, cfg.patch_size, cfg.adaln_lora_rank
        self.patch, self.channels, self.heads, self.theta = p, C, cfg.video_heads, cfg.rope_theta
        self.abs_pos_embed, self.time_scale = cfg.abs_pos_embed, cfg.video_time_scale
        self.rope_scale, self.rope_pairs = cfg.rope_scale, cfg.rope_pairs
        self.padding_mask = cfg.video_padding_mask
        cosmos_time = cfg.video_time_embed == "cosmos"
        in_channels = C + 1 + cfg.video_padding_mask  # +1: condition mask (+1: padding mask)
        self.patch_embed = nn.Linear(in_channels * p * p, D, bias=False)
        # "mlp": 256-d sinusoid -> MLP; "cosmos": the MLP maps the D-wide sinusoid to the LoRA's
        # shared term (D -> 3D), and the modulations read RMSNorm(sinusoid) (t_norm).
        self.t_embed = (TimestepMLP(D, freq_dim=D, out_dim=3 * D, bias=False) if cosmos_time
                        else TimestepMLP(D, bias=False))
        self.t_norm = RMSNorm(D) if cosmos_time else None
        # video_text_adaln (toy departure): the mean instruction token joins every frame's
        # conditioning vector, as DiT adds its class embedding to the timestep embedding.
        self.text_adaln = nn.Linear(cfg.text_dim, D, bias=False) if cfg.video_text_adaln else None
        # adaLN-LoRA's term shared by all blocks with "mlp" time: a Linear on SiLU(embedding)
        # (with "cosmos" time the timestep MLP's last layer is that term, as in Cosmos).
        self.t_shared = nn.Linear(D, 3 * D, bias=False) if r > 0 and not cosmos_time else None
        # Cosmos-Predict2.5's crossattn_proj: the LM's stacked hidden states -> text_proj_dim
        self.text_proj = nn.Linear(cfg.text_dim, cfg.text_proj_dim) if cfg.text_proj_dim else None
        self.blocks = nn.ModuleList(
            VideoBlock(D, cfg.video_heads, cfg.video_mlp_dim, cfg.text_proj_dim or cfg.text_dim, r,
                       cfg.video_qk_norm_eps) for _ in range(cfg.video_depth))
        self.final_mod = Modulation(D, 2, r)
        self.final_linear = nn.Linear(D, p * p * C, bias=False)
        self._grids = {}  # rotary and absolute-position tables per token grid (not parameters)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
        nn.init.normal_(self.t_embed.fc1.weight, std=0.02)
        nn.init.normal_(self.t_embed.fc2.weight, std=0.02)
        if self.text_proj is not None:
            nn.init.zeros_(self.text_proj.bias)
        # adaLN-Zero: every shift/scale/gate starts at 0, so each block starts as the identity
        # (gate 0) and the zero final linear makes a fresh model predict exactly zero velocity.
        # With adaLN-LoRA the up-projection and the shared term are zeroed (the down-projection
        # keeps its random init, as in LoRA).
        modulations = [self.final_mod]
        for block in self.blocks:
            modulations += [block.mod_self, block.mod_cross, block.mod_mlp]
        for mod in modulations:
            # LoRA: the up-projection
            out_layer = mod.proj if isinstance(mod.proj, nn.Linear) else mod.proj[1]
            nn.init.zeros_(out_layer.weight)
        if self.t_shared is not None:
            nn.init.zeros_(self.t_shared.weight)
        if self.t_norm is not None:  # "cosmos" time: the timestep MLP's output is the shared term
            nn.init.zeros_(self.t_embed.fc2.weight)
        nn.init.zeros_(self.final_linear.weight)

    def pos_embed(self, h, w, device):
        key = ("pos", h, w, str(device))
        if key not in self._grids:
            with torch.inference_mode(False):
                self._grids[key] = sincos_2d(h, w, self.patch_embed.out_features, device)
        return self._grids[key]

    def rope(self, T, h, w, device):
        key = (T, h, w, str(device))
        if key not in self._grids:
            with torch.inference_mode(False):  # a cached inference tensor breaks later training
                self._grids[key] = rope_3d(T, h, w, self.blocks[0].self_attn.head_dim, self.theta,
                                           device, self.rope_scale, self.rope_pairs)
        return self._grids[key]

    def forward(self, x, tau, text, stop_after=None, padding_mask=None):
        """x (B, C, T, H, W) latents with frame 0 = conditioning frame; tau (B, T) per-frame
        timesteps; text (B, S, D_text). Returns the velocity (B, C, T, H, W), or, when
        `stop_after` is a block index, that block's output tokens (B, T*h*w, D) without running
        the later blocks (the early exit of the extraction pass, §3.5). padding_mask
        (B or 1, 1, H, W), 1 on padded latent pixels, with video_padding_mask (default: zeros,
        nothing padded, as Cosmos-Predict2.5's pipeline passes)."""
        B, C, T, H, W = x.shape
        p = self.patch
        h, w = H // p, W // p
        mask = torch.zeros(B, 1, T, H, W, dtype=x.dtype, device=x.device)
        mask[:, :, 0] = 1  # condition-mask channel: 1 on the conditioning frame
        x = torch.cat([x, mask], dim=1)  # (B, C+1, T, H, W)
        if self.padding_mask:  # the same padding-mask channel on every frame
            pad = torch.zeros(B, 1, H, W, dtype=x.dtype, device=x.device)
            if padding_mask is not None:
                pad = pad + check_tensor("padding_mask", padding_mask, (None, 1, H, W)).to(x.dtype)
            x = torch.cat([x, pad[:, :, None].expand(B, 1, T, H, W)], dim=1)  # (B, C+2, T, H, W)
        elif padding_mask is not None:
            raise ValueError("padding_mask: this config has no padding-mask channel "
                             "(video_padding_mask=False)")
        Cin = x.shape[1]
        x = x.reshape(B, Cin, T, h, p, w, p).permute(0, 2, 3, 5, 1, 4, 6)  # (B, T, h, w, Cin, p, p)
        x = self.patch_embed(x.reshape(B, T * h * w, Cin * p * p))  # (B, N, D)
        if self.abs_pos_embed:
            # Departure from Cosmos-Predict2.5 (rotary positions only): the action DiT reads h
            # through cross-attention without positions, so a model trained from scratch in
            # minutes needs the tokens themselves to say where they are. Same rows/columns in
            # every frame.
            pos = self.pos_embed(h, w, x.device)  # (h*w, D)
            x = (x.view(B, T, h * w, -1) + pos).view(B, T * h * w, -1)  # (B, T, hw, D) -> (B, N, D)
        # One conditioning vector per frame from a sinusoid of time_scale * tau. Cosmos-Predict2.5
        # feeds sigma in [0, 1] itself (time_scale 1, the `paper` preset); with a max period of
        # 10 000 the embeddings of tau = 0.995 and 0.5 then have cosine 0.99, which a pretrained
        # model can live with but a model trained from scratch cannot: the toy presets use 1000.
        if self.t_norm is None:
            c = self.t_embed(self.time_scale * tau)  # (B, T, D)
        else:  # Cosmos-Predict2.5: the sinusoid itself is as wide as the model
            emb = timestep_embedding(self.time_scale * tau, self.t_embed.freq_dim)  # (B, T, D)
            emb = emb.to(x.dtype)
            c, shared = self.t_norm(emb), self.t_embed.mlp(emb)  # (B, T, D), (B, T, 3D)
        if self.text_adaln is not None:
            c = c + self.text_adaln(text.mean(1))[:, None]  # (B, 1, D): the same for every frame
        c = F.silu(c)
        if self.t_norm is None:
            shared = self.t_shared(c) if self.t_shared is not None else None  # (B, T, 3D)
        if self.text_proj is not None:
            text = F.gelu(self.text_proj(text))  # (B, S, text_proj_dim)
        rope = self.rope(T, h, w, x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, c, shared, text, rope)
            if i == stop_after:  # departure: the release runs every block and discards the rest
                return x
        shift, scale = self.final_mod(c, shared)
        x = self.final_linear(modulate(x, shift, scale))  # (B, N, p*p*C)
        x = x.reshape(B, T, h, w, C, p, p).permute(0, 4, 1, 2, 5, 3, 6)  # (B, C, T, h, p, w, p)
        return x.reshape(B, C, T, H, W)


# ----------------------------------------------------------------------------------------------
# The action DiT (§3.6).

class ActionDiT(nn.Module):
    """GR00T-N1.5-style flow-matching action head: [state, K noisy actions] -> velocity (B, K, A).

    With action_hidden_dim=2560, action_max_len=1024 and action_time_shift=1 (the `paper` preset)
    it has the released head's parameters, shape for shape (tests/test_released_weights.py). What
    still differs from the release's computation: LayerNorms use eps 1e-6 (release: 1e-5) so that
    one fused `modulate` kernel serves both DiTs; the blocks' adaLN reads (shift, scale) from its
    Linear (release: (scale, shift), the halves swapped) and the action encoder's sinusoid is
    [cos, sin] (release: [sin, cos], the halves of action_mix's second input block swapped): a
    weight converter swaps those rows and columns."""

    def __init__(self, cfg):
        super().__init__()
        D, A, P, K = cfg.action_width, cfg.action_dim, cfg.state_dim, cfg.action_horizon
        Hd = cfg.action_hidden_dim or D  # hidden width of the state encoder and the decoder
        self.width = D
        self.state_encoder = nn.Sequential(nn.Linear(P, Hd), nn.ReLU(), nn.Linear(Hd, D))
        # action encoder: W1 a, concat sinusoid(floor(1000 tau)), W2 -> swish -> W3
        self.action_in = nn.Linear(A, D)
        self.action_mix = nn.Linear(2 * D, D)
        self.action_out = nn.Linear(D, D)
        # learned positions of the action tokens: a table of action_max_len rows, the first K used
        self.pos_embed = nn.Parameter(torch.zeros(cfg.action_max_len or K, D))
        self.t_embed = TimestepMLP(D, shift=cfg.action_time_shift)
        self.blocks = nn.ModuleList(
            ActionBlock(D, cfg.action_heads, cfg.action_mlp_dim,
                        context_dim=cfg.video_width if i % 2 == 0 else None,
                        dropout=cfg.action_dropout)
            for i in range(cfg.action_depth))
        self.final_mod = nn.Linear(D, 2 * D)
        self.proj_out = nn.Linear(D, Hd)
        self.decoder = nn.Sequential(nn.Linear(Hd, Hd), nn.ReLU(), nn.Linear(Hd, A))
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        # GR00T's blocks have no gate, so zero modulation would not make them the identity; a
        # zero last decoder layer is enough for a fresh model to predict exactly zero velocity.
        nn.init.zeros_(self.decoder[-1].weight)

    def context_kv(self, h):
        """Project the video features h (B, N, D_video) to the K/V of every cross-attention block
        once: a list with (k, v) (B, nh, N, hd) for even blocks and None for self-attention. They
        are made contiguous here, once, so the fused attention kernel does not copy them again at
        every Euler step."""
        return [tuple(t.contiguous() for t in block.attn.project_kv(h)) if block.is_cross else None
                for block in self.blocks]

    def step_inputs(self, taus, state, cond=None):
        """Everything forward computes from the time, the state and cond alone, not from the noisy
        actions, for S steps at once: taus (S, B), state (B, P), cond (B, D_action) or None ->
        a list of S dicts, each with `time_mix` (B, D), the time's share of the action encoder's
        action_mix (its weight's second input block times the sinusoid of the discretized time,
        plus its bias), the state token `state` (B, 1, D), and `mods`, the (shift, scale) (B, 1, D)
        of every block and, last, of the final layer. predict_action calls it once for its fixed
        Euler schedule."""
        step = torch.floor(1000 * taus)  # (S, B) discretized time, as in GR00T
        c = self.t_embed(step)  # (S, B, D)
        c = F.silu(c if cond is None else c + cond)
        D = self.width
        time = timestep_embedding(step, D)  # (S, B, D)
        # action_mix([W1 a, time]) = W_a (W1 a) + W_t time + b: the second term is fixed per step
        time_mix = F.linear(time.to(self.action_mix.weight.dtype), self.action_mix.weight[:, D:],
                            self.action_mix.bias)  # (S, B, D)
        state_token = self.state_encoder(state)[:, None]  # (B, 1, D)
        mods = [linear(c)[:, :, None].chunk(2, dim=-1)  # (shift, scale), (S, B, 1, D) each
                for linear in [*(block.mod for block in self.blocks), self.final_mod]]
        return [dict(time_mix=time_mix[i], state=state_token,
                     mods=[(shift[i], scale[i]) for shift, scale in mods])
                for i in range(taus.shape[0])]

    def forward(self, actions, tau, state, h=None, kv=None, cond=None, pre=None):
        """actions (B, K, A) at time tau (B,), state (B, P), and either the features h or their
        precomputed `context_kv(h)`; cond (B, D_action) is added to the timestep embedding (the
        pooled instruction with action_text); pre: this step's `step_inputs` when precomputed
        (then tau, state and cond are not read). Returns the velocity (B, K, A)."""
        if kv is None:
            kv = self.context_kv(h)
        if pre is None:
            pre = self.step_inputs(tau[None], state, cond)[0]
        K = actions.shape[1]
        # action_mix of the concatenation [W1 a, sinusoid(time)] (B, K, 2D), as two terms
        mix = F.linear(self.action_in(actions), self.action_mix.weight[:, : self.width])
        mix = mix + pre["time_mix"][:, None]  # (B, K, D)
        a = self.action_out(F.silu(mix)) + self.pos_embed[:K]  # (B, K, D)
        x = torch.cat([pre["state"], a], dim=1)  # (B, 1+K, D)
        for block, block_kv, (shift, scale) in zip(self.blocks, kv, pre["mods"]):
            x = block(x, shift, scale, block_kv)
        shift, scale = pre["mods"][-1]  # the final layer's
        x = self.decoder(self.proj_out(modulate(x, shift, scale)))  # (B, 1+K, A)
        return x[:, -K:]  # velocity of the action tokens


# ----------------------------------------------------------------------------------------------
# Flow-matching pieces shared by both branches: the Euler sampler, the action-time draw, the
# masked MSE.

def euler_times(num_steps, B, device=None):
    """The fixed schedule of euler_sample: tau = 1, 1 - 1/n, ..., 1/n (for n = 4: 1, .75, .5, .25),
    each repeated for the batch -> (n, B)."""
    taus = torch.tensor([1.0 - i / num_steps for i in range(num_steps)], device=device)
    return taus[:, None].expand(-1, B)


def euler_sample(velocity, x, num_steps):
    """Integrate dx/dtau = velocity(x, tau) from tau = 1 (noise) to 0 (data) in equal steps at
    the times of euler_times, calling velocity once per step in schedule order."""
    for tau in euler_times(num_steps, x.shape[0], x.device):
        x = x - velocity(x, tau) / num_steps
    return x


def sample_action_time(n, generator=None, device=None):
    """tau_a = s / 0.999 with s ~ Beta(1.5, 1): more weight on noisy samples (GR00T, §3.6).
    Beta(1.5, 1) is sampled by inversion: its CDF is s^1.5, so s = u^(1/1.5)."""
    u = torch.rand(n, generator=generator, device=device)
    return u.pow(1 / 1.5) / 0.999


def masked_mse(pred, target, mask):
    """sum(mask * (pred - target)^2) / sum(mask), with mask broadcast to pred's shape."""
    mask = mask.expand_as(pred).to(pred.dtype)
    return (mask * (pred - target).pow(2)).sum() / mask.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------------
# The joint model: dual flow matching (§3.4-3.7) and inference (§3.8).

class DiT4DiT(nn.Module):
    """The joint model: tokenizer and text boundaries, video DiT, action DiT; training loss
    (`loss`) and inference (`extract_features`, `predict_action`, `imagine_video`)."""

    def __init__(self, config, tokenizer=None):
        super().__init__()
        tokenizer = tokenizer if tokenizer is not None else PixelTokenizer()
        _check_model_parts(config, tokenizer)
        self.config = config
        self.tokenizer = tokenizer
        self.text_encoder = (ByteTextEncoder(config.text_dim, config.text_depth,
                                             config.text_max_len)
                             if config.text_encoder == "bytes" else None)
        self.video_dit = VideoDiT(config)
        self.action_dit = ActionDiT(config)
        if config.action_text:  # toy departure: the instruction reaches the action DiT directly too
            self.text_to_context = nn.Linear(config.text_dim, config.video_width)
            self.text_to_cond = nn.Linear(config.text_dim, config.action_width)

    # -- every use of the video DiT: a clean conditioning frame + future frames at one tau -------
    def video_forward(self, cond, future, tau, text, stop_after=None):
        """cond (B, C, 1, h, w) clean conditioning latent; future (B, C, T-1, h, w) future latents
        at timestep tau (B,); text (B, S, D_text). The conditioning frame gets COND_TAU. Returns
        the velocity (B, C, T, h, w), or block `stop_after`'s tokens (B, T*h*w, D_video)."""
        x = torch.cat([cond, future], dim=2)  # (B, C, T, h, w)
        taus = tau[:, None].repeat(1, x.shape[2])  # (B, T): one timestep per frame
        taus[:, 0] = COND_TAU
        out = self.video_dit(x, taus, text, stop_after=stop_after)
        if stop_after is not None or self.config.video_prediction == "velocity":
            return out
        # "x0_residual" (toy departure, after Li & He 2025, "JiT"): a pixel patch holds more numbers
        # than a token is wide, so the network predicts the clean latents, as a change from the
        # conditioning frame (a fresh model imagines a still scene), instead of eps - x0. The loss
        # and the sampler stay in velocity space: v = (x_tau - x0_hat) / max(tau, X0_MIN_TAU).
        x0_hat = out + cond
        return (x - x0_hat) / taus.clamp_min(X0_MIN_TAU)[:, None, :, None, None]

    def future_noise(self, cond, generator=None):
        """Pure noise for every future latent frame: cond (B, C, 1, h, w) -> (B, C, T-1, h, w)."""
        B, C, _, h, w = cond.shape
        T_future = self.tokenizer.latent_frames(1 + self.config.num_future_frames) - 1
        return torch.randn(B, C, T_future, h, w, generator=generator, device=cond.device,
                           dtype=cond.dtype)

    # -- training: the dual flow-matching loss (§3.4-3.7) ---------------------------------
    def video_flow_loss(self, latents, text, tau_v, noise):
        """Flow-matching loss of the video DiT. latents (B, C, T, h, w), frame 0 conditioning;
        tau_v (B,); noise like latents. The conditioning frame stays clean and is not scored."""
        tau = tau_v[:, None, None, None, None]
        future = ((1 - tau) * latents + tau * noise)[:, :, 1:]  # x_tau of the future frames
        v_hat = self.video_forward(latents[:, :, :1], future, tau_v, text)
        return F.mse_loss(v_hat[:, :, 1:], (noise - latents)[:, :, 1:])

    def action_flow_loss(self, h, state, actions, mask, tau_a, noise, cond=None):
        """Flow-matching loss of the action DiT. h (B, N, D_video), state (B, P), actions
        (B, K, A), mask (B, K, A) (0 on padded steps and dims); tau_a (B*R,) and noise
        (B*R, K, A): R draws per sample that
        share h and state (released: R = 4); cond (B, D_action) or None, see action_context."""
        R = tau_a.shape[0] // actions.shape[0]
        kv = [None if p is None else (p[0].repeat_interleave(R, 0), p[1].repeat_interleave(R, 0))
              for p in self.action_dit.context_kv(h)]  # each (B*R, nh, N, hd)
        a0 = actions.repeat_interleave(R, 0)  # (B*R, K, A)
        tau = tau_a[:, None, None]
        cond = None if cond is None else cond.repeat_interleave(R, 0)
        v_hat = self.action_dit((1 - tau) * a0 + tau * noise, tau_a, state.repeat_interleave(R, 0),
                                kv=kv, cond=cond)
        return masked_mse(v_hat, noise - a0, mask.repeat_interleave(R, 0))

    def _extract(self, cond, text, generator):
        """The extraction pass (§3.5): clean conditioning latent cond (B, C, 1, h, w), all
        future frames fresh noise (no ground truth) at tau_f, and an early exit after block
        extract_layer (the release runs every block and discards the rest) -> h (B, N, D_video)."""
        tau_f = torch.full((cond.shape[0],), self.config.tau_f, device=cond.device)
        h = self.video_forward(cond, self.future_noise(cond, generator), tau_f, text,
                               stop_after=self.config.extract_layer)
        return self.select_features(h, cond)

    def select_features(self, h, cond):
        """The tokens of block extract_layer's output h (B, T*h*w, D_video) that are the features:
        all of them, or with feature_frames="conditioning" (toy departure) the first frame's."""
        if self.config.feature_frames == "all":
            return h
        n = cond.shape[-2] * cond.shape[-1] // self.config.patch_size ** 2  # tokens of one frame
        return h[:, :n]  # (B, h*w, D_video)

    def action_context(self, h, text):
        """What the action DiT reads: the features h as cross-attention context, and with
        action_text (toy departure) the instruction's tokens beside them and its mean token as a
        conditioning vector. -> (context (B, N', D_video), cond (B, D_action) or None)."""
        if not self.config.action_text:
            return h, None
        return torch.cat([h, self.text_to_context(text)], dim=1), self.text_to_cond(text.mean(1))

    def loss(self, batch, generator=None):
        """Total training loss L = L_action + lambda * L_video (tri-timestep scheme, §3.7).
        Returns dict(loss, video_loss, action_loss); video_loss is 0 when action_only."""
        cfg = self.config
        video, state, actions, mask, text = check_batch(self, batch)
        B, dev = video.shape[0], video.device
        latents = self.tokenizer.encode(video)  # (B, C, T, h, w)
        text = self.encode_text(text)  # (B, S, D_text)

        # 1. Video flow matching: one tau_v ~ U[0, 1] per sample on the future frames.
        if cfg.action_only:
            video_loss = torch.zeros((), device=dev)
        else:
            tau_v = torch.rand(B, generator=generator, device=dev)
            noise = torch.randn(latents.shape, generator=generator, device=dev, dtype=latents.dtype)
            video_loss = self.video_flow_loss(latents, text, tau_v, noise)

        # 2. Extraction: a separate pass at tau_f from fresh noise, stopped after extract_layer.
        #    detach_features=True (release): under no_grad, L_action trains only the action DiT;
        #    False (paper, and the action-only baseline): L_action also trains the video DiT via h.
        with torch.no_grad() if cfg.detach_features else nullcontext():
            h = self._extract(latents[:, :, :1], text, generator)

        # 3. Action flow matching: R draws of (eps, tau_a ~ Beta(1.5, 1)/0.999) per sample.
        R = cfg.repeat
        tau_a = sample_action_time(B * R, generator, dev)
        noise_a = torch.randn(B * R, *actions.shape[1:], generator=generator, device=dev,
                              dtype=actions.dtype)
        context, cond = self.action_context(h, text)
        action_loss = self.action_flow_loss(context, state, actions, mask, tau_a, noise_a, cond)
        loss = action_loss + cfg.video_loss_weight * video_loss
        return dict(loss=loss, video_loss=video_loss, action_loss=action_loss)

    # -- inference (§3.8) -------------------------------------------------------------------
    def encode_observation(self, obs, instruction):
        """The inputs of every inference entry point, checked: obs (B, 3, H, W) in [-1, 1] and
        instruction (list[str] or (B, S, D_text)) -> (cond latent (B, C, 1, h, w),
        text (B, S, D_text))."""
        check_frames(self, "obs", obs, time_axis=False)
        check_text(instruction, obs.shape[0])
        return self.tokenizer.encode(obs[:, :, None]), self.encode_text(instruction)

    def extract_features(self, obs, text_tokens, generator=None):
        """obs (B, 3, H, W) in [-1, 1]; text_tokens: list[str] or (B, S, D_text) -> the features h
        (B, N, D_video): block `extract_layer`'s tokens (see select_features)."""
        return self._extract(*self.encode_observation(obs, text_tokens), generator)

    @torch.inference_mode()
    def predict_action(self, obs, state, instruction, generator=None):
        """obs (B, 3, H, W) in [-1, 1], state (B, P) normalized, instruction list[str] or
        (B, S, D_text) -> normalized actions (B, K, A) clipped to [-1, 1]. Dropout follows the
        module's mode: call .eval() first for deterministic actions."""
        cfg = self.config
        cond_latent, text = self.encode_observation(obs, instruction)
        B = obs.shape[0]
        check_tensor("state", state, (B, cfg.state_dim), obs.dtype)
        h = self._extract(cond_latent, text, generator)  # one video pass, early exit
        context, cond = self.action_context(h, text)
        kv = self.action_dit.context_kv(context)  # cross-attention K/V, computed once for all steps
        # the time embeddings, modulations and state token of the whole fixed schedule, once
        taus = euler_times(cfg.num_action_steps, B, obs.device)
        steps = iter(self.action_dit.step_inputs(taus, state, cond))
        a = torch.randn(B, cfg.action_horizon, cfg.action_dim, generator=generator,
                        device=obs.device)
        a = a * cfg.action_noise_scale  # drawn even at scale 0: the generator's stream is the same
        a = euler_sample(lambda x, tau: self.action_dit(x, tau, state, kv=kv, pre=next(steps)), a,
                         cfg.num_action_steps)
        return a.clamp(-1, 1)

    @torch.no_grad()
    def imagine_video(self, obs, instruction, generator=None, num_steps=None):
        """Full video sampler for visualization: obs (B, 3, H, W) -> video (B, 3, 1+F, H, W) in
        [-1, 1]
        whose frame 0 is the observation."""
        cond, text = self.encode_observation(obs, instruction)

        def velocity(future, tau):  # only the future frames move; the conditioning one stays clean
            return self.video_forward(cond, future, tau, text)[:, :, 1:]

        future = euler_sample(velocity, self.future_noise(cond, generator),
                              num_steps or self.config.num_video_steps)
        return self.tokenizer.decode(torch.cat([cond, future], dim=2)).clamp(-1, 1)

    # -- boundary: text features -----------------------------------------------------------------
    def encode_text(self, instructions):
        """list[str] (byte encoder) or embeddings (B, S, text_dim) -> (B, S, text_dim)."""
        if isinstance(instructions, torch.Tensor):
            return check_tensor("instruction", instructions, (None, None, self.config.text_dim),
                                 model_dtype(self))
        if not (isinstance(instructions, (list, tuple))
                and all(isinstance(s, str) for s in instructions)):
            raise ValueError("instruction: expected a list of strings or a (B, S, text_dim) tensor")
        if self.text_encoder is None:
            raise ValueError("instruction: this config takes precomputed text embeddings "
                             "(text_encoder='embeddings'); pass a (B, S, text_dim) tensor")
        return self.text_encoder(list(instructions))
