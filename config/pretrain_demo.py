# Offline demo, step 2: DTM pre-training of a tiny ViT on the generated 64-px shapes dataset, distilling the
# small teacher of step 1 (a one-block ViT that learned the background textures). No download; about a minute
# on 2 CPU cores.
#   python eval_transfer.py config/transfer_demo_teacher.py       # step 1, once: the teacher
#   python pretrain.py config/pretrain_demo.py
#   torchrun --nproc_per_node=2 pretrain.py config/pretrain_demo.py   # the same on 2 processes (gloo on CPU)
out_dir = "out/pretrain_demo"
demo_data = "data/demo"
data_dir = "data/demo/train"
model = "tiny"
depth = 6
img_size = 64
patch_size = 8  # 8x8 = 64 tokens
teacher = "out/demo_teacher/demo_coarse/ckpt.pt"  # step 1's checkpoint; its 192-d normed patch tokens are the targets
num_masked = 26  # 40% of 64
min_block = 4
n_max = 64
k_max = 8
epochs = 6
warmup_epochs = 1
batch_size = 64
micro_batch_size = 32  # 2 micro-batches on one process, 1 on each of 2 (torchrun)
workers = 2
log_interval = 1
