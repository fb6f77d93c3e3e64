"""Oracles the tests compare dit4dit with, written as the authors' release and the unfused model
compute them, and shared with the benchmarks that time the same paths (bench/model.py, bench/ops.py)."""
import torch
import torch.nn.functional as F

from dit4dit import euler_sample
from kernels import reference


def release_predict_action(model, obs, state, instruction, generator):
    """predict_action as the release runs it: all video blocks and the final layer run, h is read
    from block extract_layer by a hook, and the K/V are recomputed at every Euler step."""
    cfg = model.config
    cond, text = model.encode_observation(obs, instruction)  # (B, C, 1, h, w), (B, S, D_text)
    tau_f = torch.full((cond.shape[0],), cfg.tau_f, device=cond.device)
    captured = {}
    hook = model.video_dit.blocks[cfg.extract_layer].register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("h", output))
    try:  # all blocks and the final layer; the velocity is discarded
        model.video_forward(cond, model.future_noise(cond, generator), tau_f, text)
    finally:
        hook.remove()
    context, c = model.action_context(model.select_features(captured["h"], cond), text)
    a = torch.randn(cond.shape[0], cfg.action_horizon, cfg.action_dim, generator=generator, device=obs.device)
    a = a * cfg.action_noise_scale
    a = euler_sample(lambda a_t, t: model.action_dit(a_t, t, state, h=context, cond=c), a, cfg.num_action_steps)
    return a.clamp(-1, 1)


def unfused_qk_norm_rope(x, weight, rot, eps=1e-6):
    """The video self-attention's q/k sequence before the fusion: the RMSNorm module (statistics in
    float32, cast back), then the rotation by rope_3d's tables: complex rot (N, hd/2) rotates the
    pairs (2i, 2i+1); rot = (cos, sin), each (N, hd), the pairs (i, i + hd/2)."""
    acc = reference.compute_dtype(x.dtype)
    x = F.rms_norm(x.to(acc), x.shape[-1:], weight.to(acc), eps).to(x.dtype)
    if isinstance(rot, tuple):
        x1, x2 = x.chunk(2, dim=-1)  # (B, nh, N, hd/2) each
        return (x.to(acc) * rot[0] + torch.cat([-x2, x1], dim=-1).to(acc) * rot[1]).to(x.dtype)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (B, nh, N, hd/2) complex
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)  # (B, nh, N, hd)
