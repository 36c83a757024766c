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
    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        self.grid = tuple(grid)
        self.table = nn.Parameter(torch.zeros((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, num_heads))
        self.register_buffer("index", relative_position_index(grid), persistent=False)

    def forward(self) -> torch.Tensor:  # [heads, N+1, N+1]
        N1 = self.index.shape[0]
        return self.table[self.index.view(-1)].view(N1, N1, -1).permute(2, 0, 1)


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
        B, N, C = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, qkv_bias).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if self.rel_pos is not None:
            bias = self.rel_pos() if bias is None else bias + self.rel_pos()
        if bias is not None:
            bias = bias.to(q.dtype)  # SDPA wants the additive mask in the query's dtype (bf16 under autocast)
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
                 out_dim=0, num_classes=0, in_chans=3):
        super().__init__()
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim)) if abs_pos else None
        self.rel_pos = RelativePositionBias(self.grid, num_heads) if shared_rel_pos else None
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, self.grid if block_rel_pos else None, rates[i], layer_scale)
            for i in range(depth))
        # Classification pools first and norms after (fc_norm); the other uses norm every token.
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if not num_classes else None
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if num_classes else None
        self.lm_head = nn.Linear(embed_dim, out_dim) if out_dim else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else None
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for layer_id, block in enumerate(self.blocks, start=1):  # BEiT: keep deep residual sums in scale
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))

    def layer_id(self, name: str) -> int:
        """0 for the embeddings, tokens and shared position table; i + 1 for block i; depth + 1 for the rest
        (norms and heads). Layer-wise lr decay scales each parameter's lr by its layer id."""
        if name.startswith(("patch_embed", "cls_token", "mask_token", "pos_embed", "rel_pos")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def forward_blocks(self, x, mask=None, out_indices=()):
        """Image [B, 3, H, W] -> all tokens after the last block [B, 1+N, D] (class token first, no final
        norm), and the patch tokens [B, N, D] after each block in `out_indices`."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        bias = self.rel_pos() if self.rel_pos is not None else None
        features = []
        for i, block in enumerate(self.blocks):
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


def checkpoint_model_args(ckpt: dict) -> dict:
    """The constructor arguments stored in a checkpoint of this project."""
    if "model_args" not in ckpt:
        raise ValueError("not a checkpoint of this project: it has no 'model_args' entry")
    return dict(ckpt["model_args"])


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
    """Load a checkpoint of this project into `model` (see backbone_state_dict), refusing one of another
    model size with the list of mismatched shapes, and reporting missing and unexpected keys."""
    args = checkpoint_model_args(ckpt)
    grid = (args["img_size"] // args["patch_size"],) * 2
    state = backbone_state_dict(ckpt["model"], model, grid)
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ValueError("checkpoint does not fit this model (another model size?):\n  " + "\n  ".join(mismatched))
    missing, unexpected = model.load_state_dict(state, strict=False)
    log(f"loaded backbone: missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'}")
