# Offline demo: a tiny ViT on the generated 64-px shapes dataset with a small randomly initialised CLIP
# teacher. No download; a few minutes on 2 CPU cores.
#   python pretrain.py config/pretrain_demo.py
out_dir = "out/pretrain_demo"
demo_data = "data/demo"
data_dir = "data/demo/train"
model = "tiny"
depth = 6
img_size = 64
patch_size = 8  # 8x8 = 64 tokens
teacher_pretrained = ""  # random init: no weights to download
teacher_overrides = {"embed_dim": 64,
                     "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 2, "head_width": 64},
                     "text_cfg": {"width": 64, "heads": 1, "layers": 1}}
num_masked = 26  # 40% of 64
min_block = 4
n_max = 64
k_max = 8
epochs = 6
warmup_epochs = 1
batch_size = 64
micro_batch_size = 64
workers = 2
log_interval = 1
