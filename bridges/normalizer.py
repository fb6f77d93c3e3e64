"""State and action normalization: per-dimension min-max statistics of a dataset, mapping each
dimension to [-1, 1] (docs/design.md §3.1); saved in every checkpoint beside the model."""
import numpy as np
import torch


class Normalizer:
    """Per-dimension min-max normalization to [-1, 1]; works on numpy and torch.
    Values outside the fitted range map outside [-1, 1] (no clipping)."""

    def __init__(self, low, high):
        self.low = torch.as_tensor(low, dtype=torch.float32)
        self.high = torch.as_tensor(high, dtype=torch.float32)
        if self.low.shape != self.high.shape or self.low.ndim != 1:
            raise ValueError(f"low/high: expected two (D,) vectors, got {tuple(self.low.shape)} "
                             f"and {tuple(self.high.shape)}")

    @classmethod
    def fit(cls, x):
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        if x.ndim < 1 or x.numel() == 0 or not torch.isfinite(x).all():
            raise ValueError(f"x: expected a finite, non-empty array (..., D), got shape {tuple(x.shape)}")
        x = x.reshape(-1, x.shape[-1])  # (M, D)
        low, high = x.min(0).values, x.max(0).values
        flat = high - low < 1e-6  # a constant dim maps to 0 instead of dividing by zero
        return cls(torch.where(flat, low - 1, low), torch.where(flat, high + 1, high))

    def _apply(self, x, fn):
        if isinstance(x, torch.Tensor):
            return fn(x, self.low.to(x.device, x.dtype), self.high.to(x.device, x.dtype))
        out = fn(torch.as_tensor(np.asarray(x, dtype=np.float32)), self.low, self.high)
        return out.numpy()

    def normalize(self, x):
        return self._apply(x, lambda v, lo, hi: 2 * (v - lo) / (hi - lo) - 1)

    def unnormalize(self, x):
        return self._apply(x, lambda v, lo, hi: (v + 1) / 2 * (hi - lo) + lo)

    def state_dict(self):
        return {"low": self.low.clone(), "high": self.high.clone()}

    @classmethod
    def from_state_dict(cls, d):
        if not isinstance(d, dict) or set(d) != {"low", "high"}:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"normalizer state: expected keys 'low' and 'high', got {got}")
        return cls(d["low"], d["high"])
