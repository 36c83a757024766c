# Offline demo, step 1: the teacher that the pre-training demo distils. A one-block tiny ViT trained here from
# scratch, supervised, on the background textures of the generated 64-px demo images (demo_coarse, 4 classes);
# about two CPU minutes. Then python pretrain.py config/pretrain_demo.py distils it.
#   python eval_transfer.py config/transfer_demo_teacher.py       # writes out/demo_teacher/demo_coarse/ckpt.pt
# A teacher must know something for its student to learn it: distilling a randomly initialised one teaches
# each patch's mean colour, and that checkpoint transfers worse than random init (docs/benchmarks.md).
init_from = ""  # from scratch
datasets = "demo_coarse"
out_dir = "out/demo_teacher"
# finetune.py settings: the demo's patch grid (the teacher gives one target per student token)
model = "tiny"
depth = 1
img_size = 64
patch_size = 8
epochs = 16
warmup_epochs = 1
batch_size = 16
micro_batch_size = 16
lr = 0.0192  # at batch 1024, i.e. 3e-4 at batch 16: from scratch, 1e-3 often stays at chance throughout
layer_decay = 1.0  # from scratch: every block learns at the full rate
layer_scale = 1.0  # the block's branches at full weight from the start: it leaves chance level sooner
drop_path = 0.0
crop_scale = (0.5, 1.0)  # its student sees crops of 20-100% at 64 px: the teacher must know rescaled textures
randaug_ops = 0
erase_prob = 0.0
mixup = 0.0
cutmix = 0.0
workers = 0
log_interval = 1
