# Recipe for folder:<path> datasets (any ImageFolder with train/ and val/); override anything on the command line.
# Untuned, not the DTM paper's values; where they come from: eval_transfer.py's docstring.
warmup_epochs = 10
batch_size = 256
micro_batch_size = 32
