# ViT-L/16 fine-tuning on ImageNet-1K from a 300-epoch DTM checkpoint: the paper's 86.7 top-1.
#   torchrun --nproc_per_node=8 finetune.py config/finetune_vitl_in1k.py --init_from=out/pretrain_vitl/ckpt.pt
# BEiT v2's ViT-L fine-tuning recipe (BEiT v2 repository, get_started_cls.md): 50 epochs with 5 warmup,
# lr 5e-4 at batch 1024, layer decay 0.8, drop path 0.2; the rest as for ViT-B (config/finetune_vitb_in1k.py).
out_dir = "out/finetune_vitl_in1k"
model = "large"
drop_path = 0.2
epochs = 50
warmup_epochs = 5
micro_batch_size = 64  # per GPU: 8 GPUs x 64 x 2 accumulation steps (ViT-L activations are ~2.7x ViT-B's)
layer_decay = 0.8
