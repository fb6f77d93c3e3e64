"""Checks of what enters dit4dit's public entry points (training batches, observations,
instructions, tensors), gathered here so the method reads without them: each bad input raises
one ValueError that names the argument and what was expected."""
import torch


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def check_tensor(name, x, shape, dtype=None):
    """shape: tuple of ints or None (any size); dtype: the model's dtype, which x must have
    (None: any floating dtype). Raises ValueError naming `name`."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{name}: expected {_dtype_name(dtype)} like the model, "
                         f"got {_dtype_name(x.dtype)}")
    want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return x


def model_dtype(model):
    return next(model.parameters()).dtype


def check_frames(model, name, x, time_axis):
    """Video (B, 3, 1+F, H, W) when time_axis, else one frame (B, 3, H, W): B >= 1, H = W =
    config.image_size, the model's dtype, pixel values in [-1, 1] (frames_to_video's range)."""
    cfg = model.config
    shape = (None, 3, 1 + cfg.num_future_frames, None, None) if time_axis else (None, 3, None, None)
    check_tensor(name, x, shape, model_dtype(model))
    H, W = x.shape[-2:]
    if (H, W) != (cfg.image_size, cfg.image_size):
        raise ValueError(f"{name}: frames are {H}x{W} pixels, but the model was configured for "
                         f"{cfg.image_size}x{cfg.image_size} (config image_size={cfg.image_size})")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (B = 0)")
    low, high = x.aminmax()
    if low < -1 or high > 1:
        raise ValueError(f"{name}: pixel values must lie in [-1, 1] (frames_to_video converts "
                         f"uint8 frames), got values in [{low.item():.4g}, {high.item():.4g}]")
    return x


def check_text(text, B):
    if isinstance(text, str) or not hasattr(text, "__len__"):
        raise ValueError("instruction: expected a list of strings or a (B, S, text_dim) tensor")
    if len(text) != B:
        raise ValueError(f"instruction: expected {B} entries (one per sample), got {len(text)}")


def check_batch(model, batch):
    """The training batch of DiT4DiT.loss -> (video, state, actions, mask (B, K, A), text)."""
    cfg = model.config
    if not isinstance(batch, dict):
        raise ValueError(f"batch: expected a dict, got {type(batch).__name__}")
    for key in ("video", "state", "actions"):
        if key not in batch:
            raise ValueError(f"batch: missing key {key!r}")
    video = check_frames(model, "video", batch["video"], time_axis=True)
    B, dtype = video.shape[0], video.dtype
    state = check_tensor("state", batch["state"], (B, cfg.state_dim), dtype)
    K, A = cfg.action_horizon, cfg.action_dim
    actions = check_tensor("actions", batch["actions"], (B, K, A), dtype)
    mask = batch.get("action_mask")
    if mask is None:
        mask = torch.ones(B, K, A, device=actions.device)
    else:
        # (A,) or (B, A): which action dims are real; (B, K, A): also which steps of the chunk are
        # real (steps past an episode's end are padding and must not be scored)
        if not isinstance(mask, torch.Tensor) or mask.shape not in ((A,), (B, A), (B, K, A)):
            raise ValueError(f"action_mask: expected shape ({A},), ({B}, {A}) or ({B}, {K}, {A}), "
                             f"got {tuple(getattr(mask, 'shape', ()))}")
        mask = mask.to(actions.dtype)
        if mask.ndim < 3:
            mask = mask.expand(B, A)[:, None]  # (B, 1, A)
        mask = mask.expand(B, K, A)
        if not torch.isfinite(mask).all():
            raise ValueError("action_mask: contains NaN or inf")
        if ((mask < 0) | (mask > 1)).any():
            raise ValueError("action_mask: values must lie in [0, 1] (1: a real action, "
                             "0: padding)")
    if ("instruction" in batch) == ("text" in batch):
        raise ValueError("batch: give exactly one of 'instruction' (list of str) or 'text' "
                         "(B, S, D_text)")
    text = batch.get("instruction", batch.get("text"))
    check_text(text, B)
    return video, state, actions, mask, text
