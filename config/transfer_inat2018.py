# iNaturalist 2018 (8142 classes), official train/val split, fine-tuned from a ViT-B/16 checkpoint:
#   torchrun --nproc_per_node=8 eval_transfer.py --init_from=out/pretrain_vitb/ckpt.pt --datasets=inat2018
# NOT the DTM paper's values: its appendix settings are not available to us. Where each value comes from:
# - 224 px and 100 epochs: the usual iNaturalist transfer schedule for masked-image-modelling models (as
#   suggested in this project's issue 5); not verified against a paper's appendix;
# - 5 warmup epochs: ours (iNat2018 is a fraction of ImageNet-1K's size; 20 warmup epochs would be a fifth of the run);
# - everything else: finetune.py's ImageNet-1K recipe (BEiT v2 ViT-B: lr 5e-4 at batch 1024, layer decay 0.65,
#   drop path 0.1, weight decay 0.05, RandAugment, MixUp 0.8, CutMix 1.0, label smoothing 0.1, erasing 0.25).
img_size = 224
epochs = 100
warmup_epochs = 5
batch_size = 1024
micro_batch_size = 128
