# Oxford Flowers-102 (102 classes; train+val 2040 images, test 6149), fine-tuned from a ViT-B/16 checkpoint:
#   python eval_transfer.py --init_from=out/pretrain_vitb/ckpt.pt --datasets=flowers102
# Untuned, not the DTM paper's values; where they come from: eval_transfer.py's docstring.
warmup_epochs = 10
batch_size = 256
micro_batch_size = 32  # 8 GPUs x 32, or fewer GPUs with accumulation
