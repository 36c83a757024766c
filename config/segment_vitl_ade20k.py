# ADE20K semantic segmentation, ViT-L/16 + UperNet: BEiT v2's recipe (unilm/beit2/semantic_segmentation/configs/
# beit/upernet/upernet_beit_large_24_512_slide_160k_ade20k.py). 8 GPUs x 2 images, 160k iterations.
#   torchrun --nproc_per_node=8 segment.py config/segment_vitl_ade20k.py \
#       --init_from=out/pretrain_vitl_300ep/ckpt.pt --data_dir=/data/ade20k/ADEChallengeData2016
out_dir = "out/segment_vitl_ade20k"
data_dir = "data/ade20k/ADEChallengeData2016"
model = "large"  # for random init only; a checkpoint brings its own architecture
num_classes = 150
channels = 1024
aux_channels = 256
drop_path = 0.2
out_indices = [7, 11, 15, 23]
crop_size = 512
scale = (2048, 512)
ratio_range = (0.5, 2.0)
eval_stride = 341
iters = 160000
warmup_iters = 1500
batch_size = 16
micro_batch_size = 2
lr = 4e-5
betas = (0.9, 0.999)
weight_decay = 0.05
layer_decay = 0.9
power = 1.0
eval_interval = 16000
ckpt_interval = 1000
workers = 8
