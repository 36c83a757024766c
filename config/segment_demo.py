# Offline demo: UperNet on a tiny ViT, on the generated 64-px demo dataset's per-pixel labels (4 background
# textures + 10 shapes = 14 classes, in the ADE20K folder layout). No download; about 1.5 minutes on 2 CPU cores.
#   python segment.py config/segment_demo.py
# Random backbone by default; after `python pretrain.py config/pretrain_demo.py`, start from its checkpoint:
#   python segment.py config/segment_demo.py --init_from=out/pretrain_demo/ckpt.pt --out_dir=out/segment_demo_dtm
out_dir = "out/segment_demo"
demo_data = "data/demo"
data_dir = "data/demo/ADEChallengeData2016"
model = "tiny"
depth = 6  # as config/pretrain_demo.py, so its checkpoint fits
patch_size = 8
drop_path = 0.1
num_classes = 14
channels = 64
aux_channels = 32
crop_size = 64
scale = (256, 64)  # the 64-px images stay 64 px at ratio 1; crops of 32..128-px rescales
eval_stride = 43  # 341/512 of the crop, as the ADE20K recipe
iters = 200
warmup_iters = 25
micro_batch_size = 16
lr = 1e-3  # a random or tiny backbone learns faster than BEiT v2's 5e-5 allows
layer_decay = 0.9
eval_interval = 100
ckpt_interval = 50
workers = 2
log_interval = 10
