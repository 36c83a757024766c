# DTM ViT-L/16, 300 epochs on ImageNet-1K with the CLIP ViT-B/16 teacher. The official docs give no ViT-L
# values; these follow BEiT v2's ViT-L recipe: LayerScale 1e-5, otherwise the ViT-B run's settings.
#   torchrun --nproc_per_node=8 pretrain.py config/pretrain_vitl.py --data_dir=/data/imagenet/train
out_dir = "out/dtm_vitl_300ep"
model = "large"
img_size = 224
patch_size = 16
teacher = "ViT-B-16-quickgelu"
teacher_pretrained = "openai"
num_masked = 75
n_max = 196
k_max = 14
epochs = 300
warmup_epochs = 10
batch_size = 2048
micro_batch_size = 64  # x 8 GPUs x 4 accumulation steps = 2048
lr = 1.5e-3
min_lr = 1e-5
weight_decay = 0.05
betas = (0.9, 0.98)
grad_clip = 3.0
drop_path = 0.0
layer_scale = 1e-5
