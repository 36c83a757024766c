# CUB-200-2011 (200 classes; train 5994, test 5794), fine-tuned from a ViT-B/16 checkpoint:
#   python eval_transfer.py --init_from=out/pretrain_vitb/ckpt.pt --datasets=cub200
# Untuned, not the DTM paper's values; where they come from: eval_transfer.py's docstring.
warmup_epochs = 10
batch_size = 256
micro_batch_size = 32  # 8 GPUs x 32, or fewer GPUs with accumulation
