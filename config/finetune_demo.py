# Offline demo: fine-tune the demo pre-training checkpoint on the generated 64-px shapes dataset (10 classes).
# Run the pre-training demo first (python eval_transfer.py config/transfer_demo_teacher.py, then
# python pretrain.py config/pretrain_demo.py), then
#   python finetune.py config/finetune_demo.py
# The ImageNet recipe (finetune.py's defaults: MixUp, CutMix, label smoothing, erasing, layer decay, drop
# path) except what a 600-image, 64-px set and a few CPU minutes need: the demo model, small batches, few
# epochs, a large step, milder crops and no RandAugment. It shows the pipeline working, not a good model:
# the shape labels need far more training than this (see README.md, "Fine-tuning on ImageNet-1K").
out_dir = "out/finetune_demo"
demo_data = "data/demo"  # generated if missing (the same images as the pre-training demo)
data_dir = "data/demo"
init_from = "out/pretrain_demo/ckpt.pt"
model = "tiny"  # the pre-training demo's model: tiny width, 6 blocks, 64 px, patch 8
depth = 6
img_size = 64
patch_size = 8
epochs = 5
warmup_epochs = 1
batch_size = 32
micro_batch_size = 32
lr = 0.064  # at batch 1024, i.e. 2e-3 at batch 32: a 5-epoch schedule needs a large step
crop_scale = (0.5, 1.0)  # an 8% crop of a 64-px image would often miss the shape entirely
randaug_ops = 0
workers = 0
log_interval = 1
