# ADE20K semantic segmentation, ViT-L/16 + UperNet: BEiT v2's recipe (unilm/beit2/semantic_segmentation/configs/
# beit/upernet/upernet_beit_large_24_512_slide_160k_ade20k.py). 8 GPUs x 2 images, 160k iterations.
#   torchrun --nproc_per_node=8 segment.py config/segment_vitl_ade20k.py \
#       --init_from=out/pretrain_vitl_300ep/ckpt.pt --data_dir=/data/ade20k/ADEChallengeData2016
out_dir = "out/segment_vitl_ade20k"
model = "large"  # for random init only; a checkpoint brings its own architecture
channels = 1024
drop_path = 0.2
out_indices = [7, 11, 15, 23]
lr = 4e-5
layer_decay = 0.9
