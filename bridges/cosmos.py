"""The released video weights: Cosmos-Predict2.5 as diffusers' CosmosTransformer3DModel holds
them -> dit4dit's VideoDiT (README, "Running with the released weights"). diffusers is not
imported: the converter reads a state dict and the model's config (a dict, e.g. `model.config`)."""
import torch

from dit4dit import VideoDiT



# The fields of a VideoDiT that is Cosmos's computation, whatever the size.
COSMOS_FIXED_FIELDS = dict(video_time_embed="cosmos", rope_pairs="half", rope_theta=10000.0,
                           video_qk_norm_eps=1e-5, abs_pos_embed=False, video_time_scale=1.0,
                           video_text_adaln=False, video_prediction="velocity")

# One block's weights: our name -> diffusers' name (both under the block's prefix).
COSMOS_BLOCK_NAMES = {
    "mod_self.proj.0": "norm1.linear_1", "mod_self.proj.1": "norm1.linear_2",
    "mod_cross.proj.0": "norm2.linear_1", "mod_cross.proj.1": "norm2.linear_2",
    "mod_mlp.proj.0": "norm3.linear_1", "mod_mlp.proj.1": "norm3.linear_2",
    **{f"{ours}.{a}": f"{theirs}.{b}" for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out.0"),
                    ("q_norm", "norm_q"), ("k_norm", "norm_k"))},
    "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
}


def cosmos_video_config(cosmos_config):
    """The DiT4DiTConfig fields of the VideoDiT that is a diffusers CosmosTransformer3DModel of
    this config (a dict with its constructor arguments, e.g. `model.config` or its config.json):
    sizes from the config, the Cosmos switches fixed (COSMOS_FIXED_FIELDS). Use them as overrides:
    make_config("paper", **cosmos_video_config(cfg)). ValueError names a key that is missing or a
    Cosmos feature VideoDiT does not have (text-to-world input without a condition mask, learned
    absolute positions, temporal patches, ControlNet, image context)."""
    def get(key, default=KeyError):
        if key in cosmos_config:
            return cosmos_config[key]
        if default is KeyError:
            raise ValueError(f"cosmos config: missing key {key!r}")
        return default

    C, heads, hd = get("out_channels"), get("num_attention_heads"), get("attention_head_dim")
    if get("in_channels") != C + 1:
        raise ValueError(f"cosmos config: in_channels={get('in_channels')} must be out_channels + 1 = {C + 1} (the "
                         f"condition-mask channel of Cosmos's video-to-world models, which VideoDiT always has)")
    patch = tuple(get("patch_size"))
    if len(patch) != 3 or patch[0] != 1 or patch[1] != patch[2]:
        raise ValueError(f"cosmos config: patch_size={patch} must be (1, p, p)")
    if get("extra_pos_embed_type") is not None:
        raise ValueError(f"cosmos config: extra_pos_embed_type={get('extra_pos_embed_type')!r} (learned absolute "
                         f"positions) is not supported; Cosmos-Predict2.5 uses None")
    for key in ("controlnet_block_every_n", "img_context_dim_in"):
        if get(key, None):
            raise ValueError(f"cosmos config: {key}={get(key)!r} (Cosmos-Transfer) is not supported")
    width = heads * hd
    fields = dict(latent_channels=C, video_width=width, video_heads=heads, video_depth=get("num_layers"),
                  video_mlp_dim=int(width * get("mlp_ratio")), patch_size=patch[1],
                  adaln_lora_rank=get("adaln_lora_dim"), rope_scale=tuple(float(v) for v in get("rope_scale")),
                  video_padding_mask=bool(get("concat_padding_mask")), **COSMOS_FIXED_FIELDS)
    if get("use_crossattn_projection", False):
        if get("encoder_hidden_states_channels") != get("text_embed_dim"):
            raise ValueError(f"cosmos config: encoder_hidden_states_channels={get('encoder_hidden_states_channels')} "
                             f"must equal text_embed_dim={get('text_embed_dim')} (the cross-attention reads the "
                             f"projected text)")
        fields.update(text_dim=get("crossattn_proj_in_channels"), text_proj_dim=get("text_embed_dim"))
    else:
        fields.update(text_dim=get("text_embed_dim"), text_proj_dim=0)
    return fields


def cosmos_names(config):
    """Our VideoDiT's state-dict keys -> the diffusers CosmosTransformer3DModel keys they come from."""
    names = {"patch_embed.weight": "patch_embed.proj.weight",
             "t_embed.fc1.weight": "time_embed.t_embedder.linear_1.weight",
             "t_embed.fc2.weight": "time_embed.t_embedder.linear_2.weight",
             "t_norm.weight": "time_embed.norm.weight"}
    if config.text_proj_dim:
        names.update({"text_proj.weight": "crossattn_proj.0.weight", "text_proj.bias": "crossattn_proj.0.bias"})
    for i in range(config.video_depth):
        names.update({f"blocks.{i}.{ours}.weight": f"transformer_blocks.{i}.{theirs}.weight"
                      for ours, theirs in COSMOS_BLOCK_NAMES.items()})
    names.update({"final_mod.proj.0.weight": "norm_out.linear_1.weight",
                  "final_mod.proj.1.weight": "norm_out.linear_2.weight", "final_linear.weight": "proj_out.weight"})
    return names


def video_dit_state_from_cosmos(state_dict, cosmos_config, config):
    """The state dict of our VideoDiT(config) holding the weights of a diffusers
    CosmosTransformer3DModel: state_dict its `state_dict()` (any dtype; the tensors are not
    copied where no layout changes), cosmos_config its config (see cosmos_video_config), config
    the DiT4DiTConfig the weights are for. Load the result with
    `model.video_dit.load_state_dict(...)`.

    Every tensor keeps its layout except the output projection: Cosmos orders its output rows
    (patch row, patch column, patch frame, channel), VideoDiT (channel, patch row, patch column).
    ValueError names the first config field that differs from the Cosmos model's, or the keys
    that are missing, unexpected, or of the wrong shape."""
    for name, value in cosmos_video_config(cosmos_config).items():
        if getattr(config, name) != value:
            raise ValueError(f"config field {name}={getattr(config, name)!r} does not match the Cosmos model "
                             f"({value!r} from its config)")
    names = cosmos_names(config)
    with torch.device("meta"):  # names and shapes only
        shapes = {k: v.shape for k, v in VideoDiT(config).state_dict().items()}
    missing = [theirs for theirs in names.values() if theirs not in state_dict]
    unexpected = sorted(set(state_dict) - set(names.values()))
    if missing or unexpected:
        parts = [f"{label} {items[:3]}{' ...' if len(items) > 3 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected)) if items]
        raise ValueError(f"cosmos state dict: {'; '.join(parts)}")
    out = {}
    for ours, theirs in names.items():
        tensor = state_dict[theirs]
        if tuple(tensor.shape) != tuple(shapes[ours]):
            raise ValueError(f"cosmos state dict: {theirs} has shape {tuple(tensor.shape)}, but {ours} of this "
                             f"config needs {tuple(shapes[ours])}")
        if ours == "final_linear.weight":
            p, C = config.patch_size, config.latent_channels
            tensor = tensor.unflatten(0, (p, p, C)).permute(2, 0, 1, 3).reshape(C * p * p, -1)  # rows (p, p, C) -> (C, p, p)
        out[ours] = tensor
    return out
