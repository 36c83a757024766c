"""The frozen teacher of DTM pre-training: what turns the full image into one target token per patch.

    net = build_teacher("ViT-B-16-quickgelu", "openai", {}, device)       # OpenAI CLIP ViT-B/16, the paper's
    net = build_teacher("out/cifar/teacher/ckpt.pt", "", {}, device)     # a checkpoint of this project
    targets = net(images_uint8)                                          # [B, patches, net.out_dim]

A teacher string names one of two things, decided in one place (`teacher_kind`): a checkpoint file of this
project, or an open_clip model. Each teacher takes uint8 images and normalises them itself, with the statistics
it was trained with; `img_size` is the input size it was built for, `out_dim` the width of its tokens.
"""
import contextlib
import os
import socket
import warnings

import torch

import common
from model import VisionTransformer

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CHECKPOINT_SUFFIXES = (".pt", ".pth")


def teacher_kind(teacher: str) -> str:
    """'checkpoint' for a file, 'open_clip' for a model name. A string that looks like a path (a folder in it,
    a checkpoint's suffix) but names no file is an error: it would otherwise be taken for an unknown model."""
    if os.path.isfile(teacher):
        return "checkpoint"
    if os.sep in teacher or teacher.endswith(CHECKPOINT_SUFFIXES):
        raise SystemExit(f"teacher={teacher!r} does not exist: train it first (a checkpoint of finetune.py, "
                         f"eval_transfer.py or pretrain.py), or name an open_clip model. The offline demo's "
                         f"teacher is written by: python eval_transfer.py config/transfer_demo_teacher.py")
    return "open_clip"


def build_teacher(teacher: str, pretrained: str, overrides: dict, device: torch.device) -> torch.nn.Module:
    """The frozen teacher (in bf16 on GPU): a checkpoint of this project, or an open_clip model with its
    `pretrained` weights ('' = random init) and config `overrides`."""
    if teacher_kind(teacher) == "checkpoint":
        net = CheckpointTeacher(teacher)
    else:
        net = ClipTeacher(teacher, pretrained, overrides)
    net = net.to(device).eval().requires_grad_(False)
    return net.to(torch.bfloat16) if device.type == "cuda" else net


def check_patch_grid(teacher: torch.nn.Module, img_size: int, patch_size: int, device: torch.device):
    """Teacher and student must see the same patch grid: one target per student token."""
    grid = img_size // patch_size
    with torch.no_grad():
        tokens = teacher(torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8, device=device)).shape[1]
    if tokens != grid * grid:
        raise SystemExit(f"the teacher gives {tokens} tokens for a {img_size}px image, the student {grid * grid} "
                         f"(patch_size={patch_size}): give them the same patch grid")


# ------------------------------------------------------------------------------------------------ open_clip
def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for k, v in overrides.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def hub_unreachable(host: str = "huggingface.co", timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub cannot be reached, found in at most `timeout` seconds. Behind a proxy the
    direct connection may fail where downloads work: then the hub is taken as reachable."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return False
    except OSError:
        return True


@contextlib.contextmanager
def hub_cache_only_if_unreachable(pretrained: str):
    """Offline, open_clip would spend about 50 s in hub retries before failing: with the hub out of reach, look
    in the local cache only (huggingface_hub's offline mode), which finds cached weights or fails at once."""
    if not pretrained or os.path.isfile(pretrained) or not hub_unreachable():
        yield
        return
    import huggingface_hub.constants as hub
    offline, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = offline


class ClipTeacher(torch.nn.Module):
    """An open_clip vision tower; targets are its patch tokens after ln_post, projected by proj."""

    def __init__(self, name: str, pretrained: str, overrides: dict):
        super().__init__()
        import open_clip  # lazily: only pre-training needs it
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise SystemExit(f"teacher={name!r} is neither an open_clip model nor a checkpoint file; "
                             f"open_clip models include: {', '.join(open_clip.list_models()[:12])}, ...")
        kwargs = {k: v for k, v in _merge(cfg, overrides).items() if k in overrides}
        if not pretrained:
            warnings.warn("\n" + "!" * 80 + f"\nteacher_pretrained='' : the teacher {name} is RANDOMLY INITIALISED. "
                          "Fine for smoke tests;\nuseless for real pre-training.\n" + "!" * 80)
        try:
            with hub_cache_only_if_unreachable(pretrained):
                clip = open_clip.create_model(name, pretrained=pretrained or None, **kwargs)
        except Exception as e:
            raise SystemExit(
                f"could not load teacher weights teacher_pretrained={pretrained!r} for teacher={name!r}: {e}\n"
                f"Without internet access, download the weights on another machine (open_clip: {name}, "
                f"'{pretrained}') and pass the file: --teacher_pretrained=/path/to/open_clip_model.bin") from e
        self.visual = clip.visual
        self.visual.output_tokens = True
        self.mean = tuple(self.visual.preprocess_cfg.get("mean", CLIP_MEAN))
        self.std = tuple(self.visual.preprocess_cfg.get("std", CLIP_STD))
        size = self.visual.image_size
        self.img_size = size[0] if isinstance(size, (tuple, list)) else size
        self.out_dim = self.visual.proj.shape[1]

    def forward(self, images_uint8):
        _, tokens = self.visual(common.normalize(images_uint8, self.mean, self.std).to(self.visual.proj.dtype))
        return tokens @ self.visual.proj


# ------------------------------------------------------------------------------------ a checkpoint of ours
class CheckpointTeacher(torch.nn.Module):
    """A checkpoint of this project as the teacher. Its targets, per patch:
    - a pre-training checkpoint: its predictions (final norm, then lm_head), what that student learned to give;
    - a fine-tuned classifier (finetune.py): the last block's patch tokens after fc_norm, the norm its head
      reads. That is what ClipTeacher takes from CLIP: every patch token through ln_post, the norm CLIP trained
      on its pooled output. The class head is left out: a handful of class logits per patch would throw away
      most of what a token holds, where CLIP's proj keeps a 512-d embedding.
    Every weight is loaded strictly from the file: a teacher that silently kept random weights would teach
    noise."""

    def __init__(self, path: str):
        super().__init__()
        ckpt = common.load_checkpoint(path)
        state, args = dict(ckpt.get("model", {})), ckpt.get("model_args")
        if args is None or ckpt.get("probe"):
            raise SystemExit(f"teacher={path!r} is neither a pre-training nor a fine-tuned checkpoint of this "
                             f"project" + (" (a linear probe: pass the checkpoint it probed)" if args else ""))
        if args.get("num_classes"):  # fine-tuned: fc_norm becomes the per-token norm, the class head goes
            state = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v
                     for k, v in state.items() if not k.startswith("head.")}
        elif "lm_head.weight" not in state:
            raise SystemExit(f"teacher={path!r} has neither a pre-training head (lm_head) nor a classifier")
        args = dict(args, mask_token=False, num_classes=0, drop_path=0.0)
        self.net = VisionTransformer(**args)
        self.net.load_state_dict({k: v for k, v in state.items() if k != "mask_token"})
        self.img_size, self.out_dim = args["img_size"], args.get("out_dim") or args["embed_dim"]
        self.mean, self.std = common.IMAGENET_MEAN, common.IMAGENET_STD

    def forward(self, images_uint8):
        return self.net(common.normalize(images_uint8, self.mean, self.std))
