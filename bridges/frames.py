"""Frames between the world and the model: uint8 camera frames (channels last) -> the model's
square frame (model_frames, the one path that dataset frames and live simulator observations
both take, so training and evaluation see identical pixels) -> float video tensors in [-1, 1]
(frames_to_video, the one place uint8 becomes a model tensor) and back (video_to_frames).

Frames are uint8 RGB, channels last, (..., H, W, 3), in the orientation the dataset stores
(a suite that renders another way turns its frames before calling this). Several cameras are
tiled side by side, left to right in the order given, each resized to (S, S // n) so the tile is
S x S; one camera is resized to S x S. Resizing is bilinear with antialiasing (torch), rounded.
"""
import numpy as np
import torch
import torch.nn.functional as F


def _resize(frames, height, width):
    """uint8 (M, H, W, 3) -> uint8 (M, height, width, 3)."""
    if frames.shape[1:3] == (height, width):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (M, 3, H, W)
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()   # (M, h, w, 3)


def model_frames(views, image_size):
    """views: a list of uint8 (..., H, W, 3) arrays with the same leading shape, one per camera
    -> uint8 (..., image_size, image_size, 3). ValueError names a view of the wrong dtype or shape."""
    if isinstance(views, np.ndarray):
        views = [views]
    if not views:
        raise ValueError("model_frames: no camera views given")
    lead = views[0].shape[:-3]
    n = len(views)
    if image_size % n:
        raise ValueError(f"model_frames: image_size={image_size} is not divisible by the {n} tiled cameras")
    tiles = []
    for i, v in enumerate(views):
        v = np.asarray(v)
        if v.dtype != np.uint8 or v.ndim < 3 or v.shape[-1] != 3 or v.shape[:-3] != lead:
            raise ValueError(f"model_frames: view {i} must be uint8 (..., H, W, 3) with leading shape {lead}, "
                             f"got {v.dtype} {v.shape}")
        flat = v.reshape(-1, *v.shape[-3:])                                 # (M, H, W, 3)
        tiles.append(_resize(flat, image_size, image_size // n))
    out = np.concatenate(tiles, axis=2)                                     # (M, S, S, 3)
    return out.reshape(*lead, image_size, image_size, 3)


def frames_to_video(frames):
    """uint8 frames (B, T, H, W, 3), numpy or torch -> float32 video (B, 3, T, H, W) in [-1, 1]."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
        raise ValueError(f"frames: expected uint8 array/tensor, got {getattr(frames, 'dtype', type(frames))}")
    if frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected shape (B, T, H, W, 3), got {tuple(frames.shape)}")
    video = frames.permute(0, 4, 1, 2, 3).float()  # (B, 3, T, H, W)
    return video / 127.5 - 1.0


def video_to_frames(video):
    """float video (B, 3, T, H, W) in [-1, 1] -> uint8 numpy frames (B, T, H, W, 3)."""
    if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video: expected a tensor (B, 3, T, H, W), got {getattr(video, 'shape', type(video))}")
    pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).cpu().numpy()  # (B, T, H, W, 3)
