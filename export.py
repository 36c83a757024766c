"""Export a checkpoint's weights for timm's `Beit` (the key names of BEiT v2 and the official DTM release too).

    python export.py --ckpt=out/finetune/best.pt --out=model.safetensors
    python export.py --ckpt=out/pretrain/ckpt.pt --out=backbone.safetensors   # the pre-trained backbone

Weights only: no optimizer, no settings. The shared relative position table is added into every block's own
table (as fine-tuning does), so the file loads strictly into timm's standard `Beit` (use_rel_pos_bias=True)
with the call export.py prints; the parts timm's Beit has no place for are left out (a pre-training run's mask
token and prediction head, a linear probe's BatchNorm and head, a segmenter's UperNet). A segmenter's backbone
has no final norm (UperNet reads block outputs): its file holds a fresh one (ones, zeros), said when written.
Written as safetensors when the safetensors package is importable, else as a torch state dict (.pt). Official
DTM / BEiT v2 / timm checkpoints are read too: the other direction needs no export, `--init_from` takes them.
"""
import os

import torch

import common
from configurator import configure
from model import VisionTransformer, as_our_checkpoint, backbone_state_dict, to_timm_keys

# ------------------------------------------------------------------------------------------------- settings
ckpt = ""  # a checkpoint of pretrain.py, finetune.py (or a probe) or segment.py, or an official DTM / BEiT v2 one
out = ""  # the file to write; '' = next to ckpt, <name>_timm.safetensors (.pt without safetensors)
overwrite = False  # replace an existing out file


def exported_state(checkpoint: dict) -> tuple[dict, dict]:
    """(state dict in timm's names, the architecture it is for) of a checkpoint of any of our stages: every
    weight of that architecture, checked by loading it strictly (a foreign or partial file is refused)."""
    segmenter = "backbone_args" in checkpoint
    checkpoint = as_our_checkpoint(checkpoint)  # a probe's or segmenter's backbone; official and timm layouts
    args = dict(checkpoint["model_args"], mask_token=False, out_dim=0)
    args["shared_rel_pos"] = args.get("shared_rel_pos", True) and not args.get("block_rel_pos", True)
    target = VisionTransformer(**args)  # the architecture the weights are folded for
    grid = (args["img_size"] // args["patch_size"],) * 2
    state = backbone_state_dict(checkpoint["model"], target, grid)
    if segmenter:  # no final norm of its own: timm's Beit gets a fresh one, as its own init would make it
        state = {**{k: v for k, v in target.state_dict().items() if k.startswith("norm.")}, **state}
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as e:  # the weights of another network
        raise ValueError(f"its weights do not make a whole ViT ({' '.join(str(e).split())[:400]})") from None
    return to_timm_keys({k: v.detach().contiguous() for k, v in state.items()}), dict(args, segmenter=segmenter)


def timm_kwargs(args: dict) -> str:
    """The create_model arguments that build the matching timm Beit."""
    kwargs = dict(img_size=args["img_size"], patch_size=args["patch_size"], embed_dim=args["embed_dim"],
                  depth=args["depth"], num_heads=args["num_heads"], num_classes=args.get("num_classes", 0),
                  use_abs_pos_emb=args.get("abs_pos", False), use_rel_pos_bias=args.get("block_rel_pos", True),
                  use_shared_rel_pos_bias=args["shared_rel_pos"])
    if not kwargs["num_classes"]:
        kwargs["global_pool"] = "token"  # a backbone keeps the final norm (timm's 'avg' pooling uses fc_norm)
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def write(state: dict, path: str) -> str:
    """Write atomically (a torn file never replaces a good one); safetensors when importable."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
        if path.endswith(".safetensors"):
            path = path[:-len(".safetensors")] + ".pt"
            print(f"safetensors is not importable: writing a torch state dict to {path} instead")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    if save_file is not None and path.endswith(".safetensors"):
        save_file(state, tmp, metadata={"format": "pt"})
    else:
        torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def main(cfg):
    if not cfg.ckpt:
        raise SystemExit("give --ckpt=<a checkpoint of pretrain.py, finetune.py or segment.py>")
    path = cfg.out or os.path.splitext(cfg.ckpt)[0] + "_timm.safetensors"
    if os.path.exists(path) and not cfg.overwrite:
        raise SystemExit(f"out={path!r} exists: choose another --out or pass --overwrite")
    try:
        state, args = exported_state(common.load_checkpoint(cfg.ckpt))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"ckpt={cfg.ckpt!r} cannot be exported: {e}") from None
    path = write(state, path)
    size = sum(v.numel() for v in state.values())
    print(f"wrote {path}: {len(state)} tensors, {size / 1e6:.2f}M weights, timm Beit key names")
    if args["segmenter"]:
        print("a segmenter's backbone: UperNet reads its block outputs (timm: forward_intermediates), it has no "
              "final norm of its own; the file's norm is a fresh one (ones, zeros)")
    print(f"load it with: timm.create_model('beit_base_patch16_224', pretrained=False, {timm_kwargs(args)}, "
          f"checkpoint_path={path!r})")


if __name__ == "__main__":
    main(configure(globals()))
