"""pretrain.py with every call of the DTM loss recorded: the schedules it was given, one JSON line per call in
$SCHEDULES_LOG.<rank>, for the tests of when and how schedules are drawn:

    torchrun --nproc_per_node=2 tests/pretrain_recording_schedules.py <pretrain.py's arguments>
"""
import json
import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    import morph
    loss = morph.dtm_loss

    def recorded(pred, target, schedules, *args, **kwargs):
        with open(f"{os.environ['SCHEDULES_LOG']}.{os.environ.get('RANK', '0')}", "a") as f:
            f.write(json.dumps({"schedules": schedules.tolist(), "training": torch.is_grad_enabled()}) + "\n")
        return loss(pred, target, schedules, *args, **kwargs)
    morph.dtm_loss = recorded  # before pretrain.py imports it
    sys.argv[0] = os.path.join(ROOT, "pretrain.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
