# Recipe for folder:<path> datasets (any ImageFolder with train/ and val/). Untuned; where values come from:
# - batch 256, 100 epochs, 10 warmup: ours, as for the fine-grained sets (config/transfer_flowers102.py);
# - everything else: finetune.py's ImageNet-1K recipe. Override anything on the command line.
epochs = 100
warmup_epochs = 10
batch_size = 256
micro_batch_size = 32
