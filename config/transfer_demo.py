# Offline transfer demo: fine-tune the demo pre-training checkpoint on two labellings of the generated 64-px
# demo images (demo_coarse: background texture, 4 classes; demo_fine: shape and texture, 40 classes), then
# print the results table. Run the pre-training demo first (python eval_transfer.py
# config/transfer_demo_teacher.py, then python pretrain.py config/pretrain_demo.py), then
#   python eval_transfer.py config/transfer_demo.py
# Both demo datasets have no recipe file: the finetune.py settings below apply to both.
init_from = "out/pretrain_demo/ckpt.pt"
datasets = "demo_coarse,demo_fine"
out_dir = "out/transfer_demo"
# finetune.py settings: the pre-training demo's model, and a schedule that fits in about two CPU minutes
model = "tiny"
depth = 6
img_size = 64
patch_size = 8
epochs = 8
warmup_epochs = 1
batch_size = 32
micro_batch_size = 32
lr = 0.064  # at batch 1024, i.e. 2e-3 at batch 32: a short schedule needs a large step
crop_scale = (0.5, 1.0)  # an 8% crop of a 64-px image would often miss the shape entirely
randaug_ops = 0
mixup = 0.0
cutmix = 0.0
workers = 0
log_interval = 1
