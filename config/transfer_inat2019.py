# iNaturalist 2019 (1010 classes), official train/val split, fine-tuned from a ViT-B/16 checkpoint:
#   torchrun --nproc_per_node=8 eval_transfer.py --init_from=out/pretrain_vitb/ckpt.pt --datasets=inat2019
# Untuned, not the DTM paper's values; where they come from: eval_transfer.py's docstring.
warmup_epochs = 5
