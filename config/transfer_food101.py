# Food-101 (101 classes; train 75750 images, test 25250), fine-tuned from a ViT-B/16 checkpoint:
#   torchrun --nproc_per_node=8 eval_transfer.py --init_from=out/pretrain_vitb/ckpt.pt --datasets=food101
# Untuned, not the DTM paper's values; where they come from: eval_transfer.py's docstring.
epochs = 50
warmup_epochs = 5
