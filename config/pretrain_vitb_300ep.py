# The paper's main run: DTM ViT-B/16, 300 epochs on ImageNet-1K, CLIP ViT-B/16 teacher, total batch 2048.
# Values the official DTM docs leave as shell variables follow BEiT v2's 300-epoch ViT-B recipe (layer scale
# 0.1, drop path 0, betas (0.9, 0.98), warmup 10 epochs, crop scale 0.2).
#   torchrun --nproc_per_node=8 pretrain.py config/pretrain_vitb_300ep.py --data_dir=/data/imagenet/train
out_dir = "out/dtm_vitb_300ep"
micro_batch_size = 256  # x 8 GPUs = 2048: no accumulation on 80 GB cards; lower it (e.g. 128) to accumulate
layer_scale = 0.1
