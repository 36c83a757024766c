# Food-101 (101 classes; train 75750 images, test 25250), fine-tuned from a ViT-B/16 checkpoint:
#   torchrun --nproc_per_node=8 eval_transfer.py --init_from=out/pretrain_vitb/ckpt.pt --datasets=food101
# NOT the DTM paper's values: its appendix settings are not available to us, and these are untuned.
# Where each value comes from:
# - 224 px: the pre-training resolution;
# - 50 epochs with 5 warmup: ours (about 3,700 steps at batch 1024, a middle ground between the
#   fine-grained sets and iNaturalist);
# - everything else: finetune.py's ImageNet-1K recipe (BEiT v2 ViT-B: lr 5e-4 at batch 1024, layer decay
#   0.65, drop path 0.1, weight decay 0.05, RandAugment, MixUp 0.8, CutMix 1.0, label smoothing 0.1).
img_size = 224
epochs = 50
warmup_epochs = 5
batch_size = 1024
micro_batch_size = 128
