# ADE20K semantic segmentation, ViT-B/16 + UperNet: BEiT v2's recipe (unilm/beit2/semantic_segmentation/configs/
# beit/upernet/upernet_beit_base_12_512_slide_160k_ade20k.py), which the DTM paper's ADE20K numbers follow.
# 8 GPUs x 2 images, 160k iterations, single-scale sliding-window evaluation.
#   torchrun --nproc_per_node=8 segment.py config/segment_vitb_ade20k.py \
#       --init_from=out/pretrain_vitb_300ep/ckpt.pt --data_dir=/data/ade20k/ADEChallengeData2016
out_dir = "out/segment_vitb_ade20k"
data_dir = "data/ade20k/ADEChallengeData2016"
num_classes = 150
channels = 768
aux_channels = 256
drop_path = 0.15
out_indices = [3, 5, 7, 11]
crop_size = 512
scale = (2048, 512)
ratio_range = (0.5, 2.0)
eval_stride = 341
iters = 160000
warmup_iters = 1500
batch_size = 16
micro_batch_size = 2
lr = 5e-5
betas = (0.9, 0.999)
weight_decay = 0.05
layer_decay = 0.75
power = 1.0
eval_interval = 16000
ckpt_interval = 1000
workers = 8
