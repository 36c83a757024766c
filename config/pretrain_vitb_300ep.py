# The paper's main run: DTM ViT-B/16, 300 epochs on ImageNet-1K, CLIP ViT-B/16 teacher, total batch 2048.
# Values the official DTM docs leave as shell variables follow BEiT v2's 300-epoch ViT-B recipe (layer scale
# 0.1, drop path 0, betas (0.9, 0.98), warmup 10 epochs, crop scale 0.2).
#   torchrun --nproc_per_node=8 pretrain.py config/pretrain_vitb_300ep.py --data_dir=/data/imagenet/train
out_dir = "out/dtm_vitb_300ep"
model = "base"
img_size = 224
patch_size = 16
teacher = "ViT-B-16-quickgelu"
teacher_pretrained = "openai"
num_masked = 75
dtm = True
num_schedules = 2
n_max = 196
k_max = 14
loss = "smooth_l1"
beta = 2.0
epochs = 300
warmup_epochs = 10
batch_size = 2048
micro_batch_size = 256  # x 8 GPUs = 2048: no accumulation on 80 GB cards; lower it (e.g. 128) to accumulate
lr = 1.5e-3
min_lr = 1e-5
weight_decay = 0.05
betas = (0.9, 0.98)
grad_clip = 3.0
drop_path = 0.0
layer_scale = 0.1
