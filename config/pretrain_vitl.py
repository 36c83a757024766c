# DTM ViT-L/16, 300 epochs on ImageNet-1K with the CLIP ViT-B/16 teacher. The official docs give no ViT-L
# values; these follow BEiT v2's ViT-L recipe: LayerScale 1e-5, otherwise the ViT-B run's settings.
#   torchrun --nproc_per_node=8 pretrain.py config/pretrain_vitl.py --data_dir=/data/imagenet/train
out_dir = "out/dtm_vitl_300ep"
model = "large"
micro_batch_size = 64  # x 8 GPUs x 4 accumulation steps = 2048
layer_scale = 1e-5
