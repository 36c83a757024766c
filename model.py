"""BEiT-style Vision Transformer for DTM pre-training and fine-tuning.

One class, three uses:
- pre-training (`out_dim > 0`): a mask token replaces masked patches; final LayerNorm, then a Linear head
  (`lm_head`) predicts a teacher token for every patch;
- classification (`num_classes > 0`): mean of the patch tokens, LayerNorm (`fc_norm`), Linear (`head`);
- a backbone (neither): returns the normed patch tokens, and any chosen block outputs for dense heads.
Positions come from relative position biases (a table shared by all blocks and/or one per block), added to
the attention logits through `F.scaled_dot_product_attention`'s additive mask.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {  # width, depth, heads, LayerScale init
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, layer_scale=0.1),
    "small": dict(embed_dim=384, depth=12, num_heads=6, layer_scale=0.1),
    "base": dict(embed_dim=768, depth=12, num_heads=12, layer_scale=0.1),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, layer_scale=1e-5),
}


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std) cut at +-std, the init of BEiT v2 and DTM pre-training (their wrapper passes a=-std,
    b=std). By the inverse CDF in one pass: torch's rejection loop takes minutes for a ViT-L at this cut."""
    edge = math.erf(1 / math.sqrt(2))  # 2 * Phi(1) - 1
    return tensor.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2))


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """[N+1, N+1] index into a ((2H-1)(2W-1) + 3)-row table; the last 3 rows are for the class token
    (cls->patch, patch->cls, cls->cls), as in BEiT."""
    H, W = grid
    coords = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")).flatten(1)  # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 2
    n_rel = (2 * H - 1) * (2 * W - 1)
    index = torch.zeros(H * W + 1, H * W + 1, dtype=torch.long)
    index[1:, 1:] = (rel[..., 0] + H - 1) * (2 * W - 1) + rel[..., 1] + W - 1
    index[0, :] = n_rel
    index[:, 0] = n_rel + 1
    index[0, 0] = n_rel + 2
    return index


class RelativePositionBias(nn.Module):
    """A table of one learned bias per relative offset and head, [(2H-1)(2W-1) + 3, heads]; the model reads
    all of them at once (VisionTransformer.attention_biases)."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, num_heads))


# The fused SDPA kernels (memory-efficient, cuDNN) take an additive mask only when its last dimension is
# contiguous and every other stride is a multiple of 8 elements (16 in some PyTorch builds); otherwise they
# copy it per call or fall back to the unfused math path. Rows padded to a multiple of 16 satisfy both.
MASK_ALIGN = 16


def padded_bias_index(grid: tuple[int, int]) -> torch.Tensor:
    """relative_position_index with each row padded to a multiple of MASK_ALIGN columns (the padding reads
    row 0 of the table and is sliced off again), flattened: [(N+1) * padded width]."""
    index = relative_position_index(grid)
    n1 = index.shape[0]
    return F.pad(index, (0, -n1 % MASK_ALIGN)).flatten()


def resize_rel_pos_table(table: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """Resize a relative position table to another grid (e.g. 14x14 -> 32x32) by bicubic interpolation of
    each head's (2H-1)x(2W-1) table, keeping the 3 class-token rows. Same grid: returned unchanged."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    (h, w), (H, W) = old_grid, new_grid
    heads = table.shape[1]
    grid_part = table[:-3].T.reshape(1, heads, 2 * h - 1, 2 * w - 1).float()
    grid_part = F.interpolate(grid_part, size=(2 * H - 1, 2 * W - 1), mode="bicubic", align_corners=False)
    return torch.cat([grid_part.reshape(heads, -1).T.to(table.dtype), table[-3:]])


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int] | None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))  # BEiT: q and v biases, no k bias
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.rel_pos = RelativePositionBias(grid, num_heads) if grid else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`bias`: the additive attention mask of this block [1, heads, N, N] (attention_biases), or None."""
        B, N, C = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, qkv_bias).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, num_heads, grid, drop_path_rate, layer_scale, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale))
        self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop_path_rate = drop_path_rate

    def forward(self, x, bias=None):
        x = x + drop_path(self.gamma_1 * self.attn(self.norm1(x), bias), self.drop_path_rate, self.training)
        return x + drop_path(self.gamma_2 * self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, layer_scale=0.1,
                 drop_path=0.0, abs_pos=False, shared_rel_pos=True, block_rel_pos=True, mask_token=False,
                 out_dim=0, num_classes=0):
        super().__init__()
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim)) if abs_pos else None
        self.rel_pos = RelativePositionBias(self.grid, num_heads) if shared_rel_pos else None
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, self.grid if block_rel_pos else None, rates[i], layer_scale)
            for i in range(depth))
        self.num_heads = num_heads
        self.register_buffer("bias_index", padded_bias_index(self.grid), persistent=False)
        # Classification pools first and norms after (fc_norm); the other uses norm every token.
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if not num_classes else None
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if num_classes else None
        self.lm_head = nn.Linear(embed_dim, out_dim) if out_dim else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else None
        self._init_weights()

    def _init_weights(self, std=0.02):
        init = lambda p: trunc_normal_(p, std)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                init(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                init(p)
        for layer_id, block in enumerate(self.blocks, start=1):  # BEiT: keep deep residual sums in scale
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))

    def decays(self, name: str, p: torch.Tensor) -> bool:
        """The official optimizer's rule (BEiT v2 / DTM optim_factory with the model's no_weight_decay()): weight
        decay on every parameter with 2 or more dimensions except pos_embed and cls_token, so the mask token and
        the relative position tables are decayed; never on biases and 1-D parameters (norms, LayerScale)."""
        return p.ndim > 1 and not name.endswith(".bias") and name not in ("pos_embed", "cls_token")

    def layer_id(self, name: str) -> int:
        """0 for the embeddings, tokens and shared position table; i + 1 for block i; depth + 1 for the rest
        (norms and heads). Layer-wise lr decay scales each parameter's lr by its layer id."""
        if name.startswith(("patch_embed", "cls_token", "mask_token", "pos_embed", "rel_pos")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def attention_biases(self, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """Every block's additive attention mask, [1, heads, N+1, N+1] in `dtype` (the queries' dtype, bf16
        under autocast), built once per forward with one gather: the shared table plus the block's own.
        Each mask is a slice of rows padded to MASK_ALIGN, so the fused attention kernels take it as is."""
        own = [b.attn.rel_pos.table for b in self.blocks if b.attn.rel_pos is not None]
        shared = self.rel_pos.table if self.rel_pos is not None else None
        if not own and shared is None:
            return [None] * len(self.blocks)
        tables = torch.stack(own) if own else shared[None]  # [tables, rows, heads]
        if own and shared is not None:
            tables = tables + shared  # summing the tables before the gather sums the biases after it
        rows = tables.shape[1]
        n1 = self.num_patches + 1
        flat = tables.to(dtype).transpose(1, 2).reshape(-1, rows)  # [tables * heads, rows]
        bias = flat.index_select(1, self.bias_index).view(len(tables), 1, self.num_heads, n1, -1)[..., :n1]
        return list(bias.unbind(0)) if own else [bias[0]] * len(self.blocks)

    def forward_blocks(self, x, mask=None, out_indices=()):
        """Image [B, 3, H, W] -> all tokens after the last block [B, 1+N, D] (class token first, no final
        norm), and the patch tokens [B, N, D] after each block in `out_indices`."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        biases = self.attention_biases(x.dtype)
        features = []
        for i, (block, bias) in enumerate(zip(self.blocks, biases)):
            x = block(x, bias)
            if i in out_indices:
                features.append(x[:, 1:])
        return x, features

    def forward(self, x, mask=None):
        """Pre-training: per-patch predictions [B, N, out_dim]; classification: logits [B, num_classes];
        backbone: normed patch tokens [B, N, D]. `mask` [B, N] (bool) marks the patches to hide."""
        if mask is not None and self.mask_token is None:
            raise ValueError("this model has no mask token: build it with mask_token=True to mask patches")
        x, _ = self.forward_blocks(x, mask)
        if self.head is not None:
            return self.head(self.fc_norm(x[:, 1:].mean(dim=1)))
        x = self.norm(x[:, 1:])
        return self.lm_head(x) if self.lm_head is not None else x


def vit(size: str = "base", **kwargs) -> VisionTransformer:
    """A ViT by size name (tiny, small, base, large); any constructor argument can be overridden."""
    if size not in SIZES:
        raise ValueError(f"model size {size!r} is not one of {', '.join(SIZES)}")
    return VisionTransformer(**{**SIZES[size], **kwargs})


# ------------------------------------------------------------------------ weights in other key layouts
# timm's `Beit`, BEiT v2 and the official DTM release (a BEiT v2 derivative) share one layout; ours differs
# in three names. Their checkpoints also keep the position index buffers, which are rebuilt here.
TIMM_NAMES = {"patch_embed.weight": "patch_embed.proj.weight", "patch_embed.bias": "patch_embed.proj.bias",
              "rel_pos.table": "rel_pos_bias.relative_position_bias_table"}  # the shared table
BLOCK_TABLE = (".attn.rel_pos.table", ".attn.relative_position_bias_table")  # a block's own table, ours/theirs


def to_timm_keys(state: dict) -> dict:
    """Our key names -> timm's Beit (= BEiT v2, official DTM) names."""
    return {TIMM_NAMES.get(k, k).replace(*BLOCK_TABLE): v for k, v in state.items()}


def from_timm_keys(state: dict) -> dict:
    """timm / BEiT v2 / official DTM key names -> ours: wrapper prefixes stripped (DDP's module., BEiT's
    encoder./backbone.), index buffers and BEiT v2's extra pre-training heads (cls_pt_*) dropped."""
    ours = {theirs: our for our, theirs in TIMM_NAMES.items()}
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "encoder.", "backbone."):
            key = key.removeprefix(prefix)
        if not key.endswith(("relative_position_index", "k_bias")) and not key.startswith(("cls_pt_", "lm_head_sg")):
            out[ours.get(key, key).replace(BLOCK_TABLE[1], BLOCK_TABLE[0])] = value
    return out


def infer_model_args(state: dict) -> dict:
    """Constructor arguments of a state dict in our key names (for checkpoints without our model_args)."""
    missing = [k for k in ("cls_token", "patch_embed.weight") if k not in state]
    if missing:
        raise ValueError(f"not a BEiT-style ViT state dict: no {', '.join(missing)} (keys: {list(state)[:6]} ...)")
    embed_dim, in_chans, patch, _ = state["patch_embed.weight"].shape
    if in_chans != 3:
        raise ValueError(f"the patch embedding takes {in_chans} channels; this ViT reads RGB images (3)")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    tables = [v for k, v in state.items() if k.endswith("rel_pos.table")]
    if tables:  # (2H - 1)^2 + 3 rows, one column per head
        grid = (math.isqrt(tables[0].shape[0] - 3) + 1) // 2
        num_heads = tables[0].shape[1]
    elif "pos_embed" in state:
        grid, num_heads = math.isqrt(state["pos_embed"].shape[1] - 1), embed_dim // 64
    else:
        raise ValueError("cannot tell the image size: the state dict has neither position tables nor pos_embed")
    layer_scale = next((s["layer_scale"] for s in SIZES.values() if s["embed_dim"] == embed_dim), 0.1)
    return dict(img_size=grid * patch, patch_size=patch, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads, layer_scale=layer_scale, abs_pos="pos_embed" in state,
                shared_rel_pos="rel_pos.table" in state, block_rel_pos="blocks.0.attn.rel_pos.table" in state,
                mask_token="mask_token" in state,
                out_dim=state["lm_head.weight"].shape[0] if "lm_head.weight" in state else 0,
                num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0)


def as_our_checkpoint(ckpt: dict) -> dict:
    """Any checkpoint as {'model', 'model_args'} of a ViT: a pre-training or fine-tuning checkpoint of this
    project unchanged; a linear probe's or a segmenter's backbone; an official DTM / BEiT v2 checkpoint
    ({'model': ...}) or a timm state dict (plain, or under 'model', 'module' or 'state_dict')."""
    if ckpt.get("probe") or "backbone_args" in ckpt:  # the ViT inside a linear probe or a segmenter
        backbone = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
        return {"model": backbone, "model_args": ckpt.get("backbone_args") or ckpt["model_args"]}
    if "model_args" in ckpt:
        return ckpt
    state = next((ckpt[k] for k in ("model", "module", "state_dict") if isinstance(ckpt.get(k), dict)), ckpt)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not a checkpoint of this project (no 'model_args') nor a state dict of tensors "
                         f"(top-level keys: {list(ckpt)[:8]})")
    state = from_timm_keys(state)
    return {"model": state, "model_args": infer_model_args(state)}


def checkpoint_model_args(ckpt: dict) -> dict:
    """The constructor arguments of a checkpoint: stored by this project, or inferred from the weights of
    an official DTM / BEiT v2 / timm BEiT checkpoint."""
    return dict(as_our_checkpoint(ckpt)["model_args"])


def backbone_state_dict(state: dict, model: VisionTransformer, grid_of_state) -> dict:
    """Turn a pre-training (or fine-tuned) state dict into one for `model`, a backbone or classifier:
    drop the mask token and the pre-training head, fold the shared relative position table into every
    block's own table (BEiT's --init_both_rpb), and resize position tables to the model's grid."""
    state = {k: v for k, v in state.items() if not k.startswith(("mask_token", "lm_head"))}
    shared = state.pop("rel_pos.table", None)
    if shared is not None and model.rel_pos is not None:
        state["rel_pos.table"] = shared  # the model keeps a shared table too
    elif shared is not None:
        for i, block in enumerate(model.blocks):
            key = f"blocks.{i}.attn.rel_pos.table"
            if block.attn.rel_pos is not None:
                state[key] = state[key] + shared if key in state else shared.clone()
    for key in [k for k in state if k.endswith("rel_pos.table")]:
        state[key] = resize_rel_pos_table(state[key], grid_of_state, model.grid)
    if model.norm is None:
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    if model.head is not None and "head.weight" in state and state["head.weight"].shape != model.head.weight.shape:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # another label set: new head
    if "pos_embed" in state and model.pos_embed is not None and state["pos_embed"].shape != model.pos_embed.shape:
        state["pos_embed"] = resize_abs_pos_embed(state["pos_embed"], model.grid)
    return state


def resize_abs_pos_embed(pos_embed: torch.Tensor, grid) -> torch.Tensor:
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(math.isqrt(patches.shape[1]))
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, -1, cls.shape[-1]).to(cls.dtype)], dim=1)


def load_backbone(model: VisionTransformer, ckpt: dict, log=print) -> None:
    """Load a checkpoint of this project, or an official DTM / BEiT v2 / timm BEiT one (as_our_checkpoint),
    into `model` (see backbone_state_dict), refusing one of another model size with the list of mismatched
    shapes, or one that leaves any backbone weight at its init; reporting missing and unexpected keys."""
    ckpt = as_our_checkpoint(ckpt)
    args = ckpt["model_args"]
    grid = (args["img_size"] // args["patch_size"],) * 2
    state = backbone_state_dict(ckpt["model"], model, grid)
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ValueError("checkpoint does not fit this model (another model size?):\n  " + "\n  ".join(mismatched))
    left = [k for k in own if k not in state and not k.startswith(("head.", "fc_norm."))]
    if left:  # a backbone left (partly) at its random init would train silently from scratch
        raise ValueError(f"the checkpoint leaves {len(left)} of the model's {len(own)} tensors at random init, e.g. "
                         f"{', '.join(left[:4])}; it holds {', '.join(sorted({k.split('.')[0] for k in state}))} "
                         f"(another depth or architecture?)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    log(f"loaded backbone: missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'}")


# -------------------------------------------------------------------------------- UperNet for segmentation
# A plain-torch UperNet on a ViT backbone, as BEiT v2 uses it for ADE20K (mmseg's UPerHead and FCNHead, and
# BEiT's multi-scale adapters), so that segmentation needs no mmcv/mmseg.
def default_out_indices(depth: int) -> list[int]:
    """Blocks whose outputs feed the head: 4 spread over the depth ([3, 5, 7, 11] for 12 blocks, [7, 11, 15,
    23] for 24, as BEiT); the last block always ends the list, so every block gets a gradient."""
    return [max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3, 1)]


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    """mmseg's ConvModule: a conv without bias (BatchNorm follows), BatchNorm, ReLU."""
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv's ConvModule init
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def classifier(channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout2d then a 1x1 conv (mmseg's cls_seg), initialised with std 0.01."""
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(dropout), conv)


class UperHead(nn.Module):
    """Pyramid pooling on the coarsest level, FPN laterals with a top-down path, 3x3 FPN convs, then all
    levels upsampled to the finest, concatenated, fused by a 3x3 conv and classified."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6),
                 dropout: float = 0.1, levels: int = 4):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels, channels, 1))
                                 for s in pool_scales)
        self.ppm_bottleneck = conv_bn_relu(in_channels + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(conv_bn_relu(in_channels, channels, 1) for _ in range(levels - 1))
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(levels - 1))
        self.fpn_bottleneck = conv_bn_relu(levels * channels, channels, 3)
        self.cls = classifier(channels, num_classes, dropout)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [upsample(ppm(top), top.shape[-2:]) for ppm in self.ppm]
        laterals = [lat(f) for lat, f in zip(self.laterals, feats)] + [self.ppm_bottleneck(torch.cat([top, *pooled], 1))]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse context into finer levels
            laterals[i - 1] = laterals[i - 1] + upsample(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outs = [outs[0]] + [upsample(o, outs[0].shape[-2:]) for o in outs[1:]]
        return self.cls(self.fpn_bottleneck(torch.cat(outs, 1)))


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 conv, dropout, 1x1 classifier (its loss only regularises training)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.cls = classifier(channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.conv(x))


class UperNetSegmenter(nn.Module):
    """ViT backbone -> 4 block outputs (class token dropped) as maps at stride p -> adapters to strides 4, 8,
    16, 32 -> UperHead; an FCN auxiliary head reads the stride-16 level. Logits come back at the input size."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, channels: int = 768,
                 aux_channels: int = 256, out_indices=None, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        backbone.norm = None  # features are taken before the final norm; an unused norm would upset DDP
        depth, dim = len(backbone.blocks), backbone.embed_dim
        self.out_indices = list(out_indices) if out_indices else default_out_indices(depth)
        if len(self.out_indices) != 4 or not all(0 <= i < depth for i in self.out_indices):
            raise ValueError(f"out_indices={self.out_indices}: need 4 block indices in [0, {depth - 1}]")
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))  # x4
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)  # x2
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2)  # x1/2
        self.decode_head = UperHead(dim, channels, num_classes, dropout=dropout)
        self.aux_head = FCNHead(dim, aux_channels, num_classes, dropout=dropout)

    def decays(self, name: str, p: torch.Tensor) -> bool:
        """The backbone's rule for its parameters (so its class token stays exempt); the rest as BEiT v2."""
        if name.startswith("backbone."):
            return self.backbone.decays(name[len("backbone."):], p)
        return p.ndim > 1 and not name.endswith(".bias")

    def layer_id(self, name: str) -> int:
        """The backbone's layer ids; the adapters and heads sit above the last block (lr scale 1)."""
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone."):])
        return len(self.backbone.blocks) + 1

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Image [B, 3, S, S] (S = the backbone's img_size) -> maps at strides 4, 8, 16, 32 (for patch 16)."""
        if tuple(x.shape[-2:]) != (self.backbone.img_size,) * 2:
            raise ValueError(f"input {tuple(x.shape[-2:])}: this segmenter takes {self.backbone.img_size}px "
                             f"crops (its position tables are built for that grid); slide a window over larger inputs")
        wanted = sorted(set(self.out_indices))
        _, tokens = self.backbone.forward_blocks(x, out_indices=wanted)
        by_block = dict(zip(wanted, tokens))
        B, (H, W) = x.shape[0], self.backbone.grid
        maps = [by_block[i].transpose(1, 2).reshape(B, -1, H, W) for i in self.out_indices]
        return [self.fpn1(maps[0]), self.fpn2(maps[1]), self.fpn3(maps[2]), self.fpn4(maps[3])]

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        """Logits [B, classes, S, S]; with_aux: (logits, auxiliary logits), both at the input size."""
        feats = self.features(x)
        logits = upsample(self.decode_head(feats), x.shape[-2:])
        if not with_aux:
            return logits
        return logits, upsample(self.aux_head(feats[2]), x.shape[-2:])
