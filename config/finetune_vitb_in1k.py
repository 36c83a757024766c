# ViT-B/16 fine-tuning on ImageNet-1K from a 300-epoch DTM checkpoint: the paper's 85.4 top-1.
#   torchrun --nproc_per_node=8 finetune.py config/finetune_vitb_in1k.py --init_from=out/pretrain_vitb/ckpt.pt
# The recipe is BEiT v2's ViT-B fine-tuning recipe for 300-epoch pre-training (BEiT v2 repository,
# get_started_cls.md; the DTM release says to fine-tune with it): 8 GPUs x 128 images, lr 5e-4, layer decay
# 0.65, drop path 0.1, 100 epochs with 20 warmup, weight decay 0.05, AdamW betas (0.9, 0.999), min lr 1e-6,
# RandAugment m9 n2, random erasing 0.25, MixUp 0.8, CutMix 1.0, label smoothing 0.1, no gradient clipping.
# These are finetune.py's defaults: this file only names the run.
out_dir = "out/finetune_vitb_in1k"
