# ADE20K semantic segmentation, ViT-B/16 + UperNet: BEiT v2's recipe (unilm/beit2/semantic_segmentation/configs/
# beit/upernet/upernet_beit_base_12_512_slide_160k_ade20k.py), which the DTM paper's ADE20K numbers follow.
# 8 GPUs x 2 images, 160k iterations, single-scale sliding-window evaluation.
#   torchrun --nproc_per_node=8 segment.py config/segment_vitb_ade20k.py \
#       --init_from=out/pretrain_vitb_300ep/ckpt.pt --data_dir=/data/ade20k/ADEChallengeData2016
out_dir = "out/segment_vitb_ade20k"
out_indices = [3, 5, 7, 11]
