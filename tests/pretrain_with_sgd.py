"""pretrain.py with plain SGD in place of AdamW, for equivalence tests (accumulation, DDP):

    python tests/pretrain_with_sgd.py <pretrain.py's arguments>
    torchrun --nproc_per_node=2 tests/pretrain_with_sgd.py <pretrain.py's arguments>

SGD's update is linear in the gradient, so a gradient off by any factor shows in every weight; AdamW's first
step is about lr x sign(gradient), which hides a wrong scale and turns rounding noise in near-zero gradients
into differences of a whole lr."""
import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sgd_instead_of_adamw(groups, lr, betas, eps=1e-8, device=None):
    return torch.optim.SGD(groups, lr=lr, momentum=0.0)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    import common
    common.adamw = sgd_instead_of_adamw
    sys.argv[0] = os.path.join(ROOT, "pretrain.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
