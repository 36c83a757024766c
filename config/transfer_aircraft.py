# FGVC-Aircraft, variant level (100 classes; trainval 6667, test 3333), fine-tuned from a ViT-B/16 checkpoint:
#   python eval_transfer.py --init_from=out/pretrain_vitb/ckpt.pt --datasets=aircraft
# NOT the DTM paper's values: its appendix settings are not available to us, and these are untuned.
# Where each value comes from:
# - 224 px: the pre-training resolution, as in the usual fine-grained transfer protocol;
# - batch 256 and 100 epochs with 10 warmup: ours, for a few-thousand-image training set (a batch of 1024
#   would leave a handful of steps per epoch);
# - everything else: finetune.py's ImageNet-1K recipe (BEiT v2 ViT-B: lr 5e-4 at batch 1024, scaled
#   linearly to batch 256, layer decay 0.65, drop path 0.1, weight decay 0.05, RandAugment, MixUp 0.8,
#   CutMix 1.0, label smoothing 0.1, erasing 0.25).
img_size = 224
epochs = 100
warmup_epochs = 10
batch_size = 256
micro_batch_size = 32  # 8 GPUs x 32, or fewer GPUs with accumulation
