"""The checkpoint layout, its one owner: save_checkpoint writes it (train_toy.py adds its own
entries), load_checkpoint reads it back verified (weights_only, content hash, config, shapes),
model_from_checkpoint rebuilds the model and its normalizers."""
import dataclasses
import hashlib
import os

import torch

from bridges.files import atomic_write
from bridges.normalizer import Normalizer
from dit4dit import DiT4DiT, DiT4DiTConfig, PixelTokenizer


CHECKPOINT_KEYS = ("model", "config", "state_normalizer", "action_normalizer", "sha256")


def checkpoint_sha256(payload):
    """The content hash of a checkpoint payload (every entry but "sha256" itself): sha256 over
    the keys in order, each tensor's dtype, shape and bytes, and the repr of every other value.
    A byte changed anywhere in the numbers or the settings changes it."""
    digest = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"T{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            digest.update(f"D{len(x)}".encode())
            for key, value in x.items():
                feed(key)
                feed(value)
        elif isinstance(x, (list, tuple)):
            digest.update(f"L{len(x)}".encode())
            for value in x:
                feed(value)
        else:
            digest.update(f"{type(x).__name__}:{x!r};".encode())

    feed({k: v for k, v in payload.items() if k != "sha256"})
    return digest.hexdigest()


def save_checkpoint(path, model, state_normalizer, action_normalizer, **extra):
    """Write a checkpoint atomically: {"model": model.state_dict(), "config": the DiT4DiTConfig
    as a dict, "state_normalizer", "action_normalizer": Normalizer.state_dict(), **extra,
    "sha256": checkpoint_sha256 of all that} (train_toy.py adds step, optimizer, scheduler,
    args, experiment). Tensors and plain Python values only, so load_checkpoint reads it back
    with torch.load(weights_only=True)."""
    payload = {"model": model.state_dict(), "config": dataclasses.asdict(model.config),
               "state_normalizer": state_normalizer.state_dict(),
               "action_normalizer": action_normalizer.state_dict(), **extra}
    payload["sha256"] = checkpoint_sha256(payload)
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path):
    """The payload dict of a checkpoint written by save_checkpoint, on the CPU, read with
    torch.load(weights_only=True) and verified: its content hash, its keys, the config (known
    fields, types and ranges), the normalizer sizes against the config and the weights against
    the model the config builds. FileNotFoundError, IsADirectoryError or ValueError (one line)
    naming the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path} is a directory, expected a checkpoint file "
                                f"(such as {os.path.join(path, 'checkpoint.pt')})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, or an object weights_only refuses
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path} is truncated or not a dit4dit checkpoint: {reason}") from err
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint {path} holds a {type(payload).__name__}, expected a dict")
    missing = [k for k in CHECKPOINT_KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint {path}: missing keys {missing}")
    if payload.get("sha256") != checkpoint_sha256(payload):
        raise ValueError(f"checkpoint {path} is corrupt: its content does not match the sha256 stored when it "
                         f"was written (bytes changed on disk or in a copy)")
    try:
        _check_checkpoint_contents(payload)
    except ValueError as err:
        raise ValueError(f"checkpoint {path}: {err}") from err
    return payload


def _config_from_dict(d):
    if not isinstance(d, dict):
        raise ValueError(f"config: expected a dict of DiT4DiTConfig fields, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(DiT4DiTConfig)})
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} (written by another version of dit4dit.py?)")
    return DiT4DiTConfig(**d)


def _check_checkpoint_contents(payload):
    """What model_from_checkpoint needs, checked before any model is built: a valid config,
    normalizers of its sizes, and weights with exactly the names and shapes of DiT4DiT(config)."""
    config = _config_from_dict(payload["config"])
    for name, size in (("state_normalizer", config.state_dim), ("action_normalizer", config.action_dim)):
        try:
            norm = Normalizer.from_state_dict(payload[name])
        except (ValueError, TypeError) as err:
            raise ValueError(f"{name}: {err}") from None
        if norm.low.shape != (size,):
            raise ValueError(f"{name} has {norm.low.numel()} entries but config.{name.split('_')[0]}_dim={size}")
    weights = payload["model"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError("model: expected a state dict of tensors")
    tokenizer = PixelTokenizer()  # the weights do not depend on the tokenizer, only its channel count
    tokenizer.channels = config.latent_channels
    with torch.device("meta"):  # names and shapes only: nothing is allocated
        expected = {k: v.shape for k, v in DiT4DiT(config, tokenizer).state_dict().items()}
    got = {k: v.shape for k, v in weights.items() if not k.startswith("tokenizer.")}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    reshaped = [f"{k} {tuple(got[k])} (config: {tuple(expected[k])})"
                for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or reshaped:
        parts = [f"{label} {items[:3]}{' ...' if len(items) > 3 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", reshaped)) if items]
        raise ValueError(f"the weights do not fit the config: {'; '.join(parts)}")


def model_from_checkpoint(payload):
    """(model, state_normalizer, action_normalizer) rebuilt from a load_checkpoint payload: a
    DiT4DiT of the saved config (default tokenizer) holding the saved weights, on the CPU."""
    model = DiT4DiT(_config_from_dict(payload["config"]))
    model.load_state_dict(payload["model"])
    return (model, Normalizer.from_state_dict(payload["state_normalizer"]),
            Normalizer.from_state_dict(payload["action_normalizer"]))
