"""Weights that leave and enter the project: export.py to timm's Beit, official DTM / BEiT v2 / timm checkpoints
as init_from (model.load_backbone). timm and safetensors are optional: these tests skip only without them."""
import os
import sys

import pytest
import torch

import common
import export
from conftest import run_script
from model import VisionTransformer, checkpoint_model_args, load_backbone, relative_position_index

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, layer_scale=0.1)


def randomised(net):
    """Non-zero position tables and q/v biases, so that a lost or misplaced one changes the output."""
    torch.manual_seed(11)
    for name, p in net.named_parameters():
        if "rel_pos" in name or name.endswith(("q_bias", "v_bias")):
            torch.nn.init.normal_(p)
    return net.eval()


def pretrain_checkpoint():
    """A checkpoint as pretrain.py writes it: shared and per-block tables, mask token, 16-d prediction head."""
    args = dict(SMALL, abs_pos=False, shared_rel_pos=True, block_rel_pos=True, mask_token=True, out_dim=16)
    torch.manual_seed(10)
    net = randomised(VisionTransformer(**args))
    return net, {"model": net.state_dict(), "model_args": args, "step": 3}


def classifier(num_classes=5):
    torch.manual_seed(12)
    return VisionTransformer(**SMALL, shared_rel_pos=False, num_classes=num_classes).eval()


def timm_beit(**kwargs):
    return timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, **kwargs).eval()


IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(13))


def test_exported_classifier_loads_strictly_into_timm_beit_with_equal_logits(tmp_path):
    """export.py as a user runs it, then the issue's command: timm.create_model(..., checkpoint_path=...)."""
    net = randomised(classifier())
    ckpt_path, out = tmp_path / "best.pt", tmp_path / "model.safetensors"
    torch.save({"model": net.state_dict(), "model_args": dict(SMALL, shared_rel_pos=False, num_classes=5),
                "optimizer": {}}, ckpt_path)
    printed = run_script(["export.py", f"--ckpt={ckpt_path}", f"--out={out}"]).stdout
    assert f"wrote {out}" in printed and "load it with: timm.create_model(" in printed
    theirs = timm_beit(num_classes=5, checkpoint_path=str(out))  # timm loads strictly
    with torch.no_grad():
        torch.testing.assert_close(theirs(IMAGES), net(IMAGES), rtol=0, atol=1e-6)
    assert "optimizer" not in str(safetensors_torch.load_file(out).keys())
    refused = run_script(["export.py", f"--ckpt={ckpt_path}", f"--out={out}"], check=False)
    assert refused.returncode != 0 and "exists" in refused.stderr and "--overwrite" in refused.stderr


def test_exported_pretraining_backbone_gives_timm_the_same_features(tmp_path):
    """The shared table is added into every block's own; the mask token and prediction head stay behind."""
    net, ckpt = pretrain_checkpoint()
    state, args = export.exported_state(ckpt)
    assert not any(k.startswith(("mask_token", "lm_head", "rel_pos_bias")) for k in state)
    theirs = timm_beit(num_classes=0, global_pool="token")
    theirs.load_state_dict(state, strict=True)
    with torch.no_grad():
        tokens, _ = net.forward_blocks(IMAGES)
        torch.testing.assert_close(theirs.forward_features(IMAGES), net.norm(tokens), rtol=0, atol=1e-5)
    assert "global_pool='token'" in export.timm_kwargs(args)


def official_layout(net):
    """The official DTM / BEiT v2 pre-training state dict of `net`, key by key as their modeling code names
    it (models/modeling_dtm.py, modeling_pretrain.py), index buffers included."""
    index = relative_position_index(net.grid)
    state = {"cls_token": net.cls_token, "mask_token": net.mask_token,
             "patch_embed.proj.weight": net.patch_embed.weight, "patch_embed.proj.bias": net.patch_embed.bias,
             "rel_pos_bias.relative_position_bias_table": net.rel_pos.table,
             "rel_pos_bias.relative_position_index": index,
             "norm.weight": net.norm.weight, "norm.bias": net.norm.bias,
             "lm_head.weight": net.lm_head.weight, "lm_head.bias": net.lm_head.bias}
    for i, b in enumerate(net.blocks):
        p = f"blocks.{i}."
        state.update({p + "gamma_1": b.gamma_1, p + "gamma_2": b.gamma_2,
                      p + "norm1.weight": b.norm1.weight, p + "norm1.bias": b.norm1.bias,
                      p + "attn.q_bias": b.attn.q_bias, p + "attn.v_bias": b.attn.v_bias,
                      p + "attn.relative_position_bias_table": b.attn.rel_pos.table,
                      p + "attn.relative_position_index": index,
                      p + "attn.qkv.weight": b.attn.qkv.weight,
                      p + "attn.proj.weight": b.attn.proj.weight, p + "attn.proj.bias": b.attn.proj.bias,
                      p + "norm2.weight": b.norm2.weight, p + "norm2.bias": b.norm2.bias,
                      p + "mlp.fc1.weight": b.mlp.fc1.weight, p + "mlp.fc1.bias": b.mlp.fc1.bias,
                      p + "mlp.fc2.weight": b.mlp.fc2.weight, p + "mlp.fc2.bias": b.mlp.fc2.bias})
    return {k: v.detach().clone() for k, v in state.items()}


def test_official_layout_checkpoint_as_init_from_gives_equal_logits(tmp_path):
    """An official-layout pre-training checkpoint ({'model': ...}, as their run_pretrain saves it) through
    load_backbone, as finetune.py and segment.py call it, equals our own checkpoint of the same weights."""
    net, ours = pretrain_checkpoint()
    official = {"model": official_layout(net), "epoch": 299}
    assert checkpoint_model_args(official) == dict(ours["model_args"], num_classes=0)
    from_official, from_ours = classifier(), classifier()
    logs = []
    load_backbone(from_official, official, log=logs.append)
    load_backbone(from_ours, ours, log=lambda *_: None)
    assert logs == ["loaded backbone: missing keys ['fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias']; "
                    "unexpected keys none"]  # the classifier's new parts, as from our own checkpoint
    for (name, a), b in zip(from_official.state_dict().items(), from_ours.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        torch.testing.assert_close(from_official(IMAGES), from_ours(IMAGES), rtol=0, atol=0)
    # a larger grid (segmentation's crops): the tables are resized the same way from either layout
    seg_official = VisionTransformer(**dict(SMALL, img_size=48), shared_rel_pos=False)
    seg_ours = VisionTransformer(**dict(SMALL, img_size=48), shared_rel_pos=False)
    load_backbone(seg_official, official, log=lambda *_: None)
    load_backbone(seg_ours, ours, log=lambda *_: None)
    assert torch.equal(seg_official.blocks[1].attn.rel_pos.table, seg_ours.blocks[1].attn.rel_pos.table)


def test_timm_beit_weights_round_trip(tmp_path):
    """timm's Beit -> safetensors -> our classifier (equal logits) -> export.py's state -> timm's keys and
    values unchanged."""
    theirs = timm_beit(num_classes=5)
    for name, p in theirs.named_parameters():
        if "relative_position_bias_table" in name or name.endswith(("q_bias", "v_bias")):
            torch.nn.init.normal_(p)
    path = tmp_path / "beit.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, path)
    weights = common.load_checkpoint(str(path))  # as finetune.py and segment.py read init_from
    assert checkpoint_model_args(weights)["num_classes"] == 5
    ours = classifier()
    load_backbone(ours, weights, log=lambda *_: None)
    with torch.no_grad():
        torch.testing.assert_close(ours(IMAGES), theirs(IMAGES), rtol=0, atol=1e-6)
    back, _ = export.exported_state({"model": ours.state_dict(), "model_args": checkpoint_model_args(weights)})
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())


def test_export_without_safetensors_writes_a_torch_state_dict(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails as if not installed
    written = export.write({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    assert written == str(tmp_path / "model.pt")
    assert torch.equal(torch.load(written, weights_only=True)["w"], torch.ones(2))


def test_a_foreign_file_is_refused_with_its_keys():
    with pytest.raises(ValueError, match="not a BEiT-style ViT state dict.*'fc.weight'"):
        checkpoint_model_args({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="nor a state dict of tensors.*'args'"):
        checkpoint_model_args({"args": "a Namespace", "epoch": 3})


def checkpoints_of_every_kind():
    """{kind: (checkpoint as a stage writes it, the ViT whose features the export must carry)}."""
    pre_net, pretrain = pretrain_checkpoint()
    net = randomised(classifier())
    kinds = {"pretrain": (pretrain, pre_net),
             "finetune": ({"model": net.state_dict(), "model_args": dict(SMALL, shared_rel_pos=False, num_classes=5),
                           "classes": list("abcde"), "stage": "finetune"}, net)}
    import finetune
    args = dict(SMALL, shared_rel_pos=False)
    probe = finetune.LinearProbe(randomised(VisionTransformer(**args)), -1, 5)
    kinds["probe"] = ({"model": probe.state_dict(), "model_args": args, "probe": {"block": -1, "num_classes": 5},
                       "classes": list("abcde"), "stage": "finetune"}, probe.backbone)
    import model
    seg = model.UperNetSegmenter(randomised(VisionTransformer(**args)), 3, channels=16, aux_channels=8)
    kinds["segment"] = ({"model": seg.state_dict(), "backbone_args": args, "head_args": {"num_classes": 3},
                         "stage": "segment"}, seg.backbone)
    return kinds


@pytest.mark.parametrize("kind", ["pretrain", "finetune", "probe", "segment"])
def test_every_kind_of_checkpoint_loads_strictly_with_the_call_export_prints(kind, tmp_path, capsys):
    """The printed timm.create_model call, run as printed, loads the file (timm loads checkpoint_path strictly)
    and gives the blocks' outputs of the network that was exported; into a folder that does not exist yet."""
    import configurator
    ckpt, net = checkpoints_of_every_kind()[kind]
    common.save_checkpoint(ckpt, str(tmp_path / "ckpt.pt"))
    out = tmp_path / "new" / "folder" / "model.safetensors"
    export.main(configurator.settings(export, ckpt=str(tmp_path / "ckpt.pt"), out=str(out)))
    printed = capsys.readouterr().out
    call = printed.split("load it with: ")[1].strip()
    theirs = eval(call, {"timm": timm}).eval()  # the very call a user copies
    with torch.no_grad():
        tokens, _ = net.forward_blocks(IMAGES)
        theirs_tokens = theirs.forward_intermediates(IMAGES, indices=1, intermediates_only=True, norm=False)[-1]
        torch.testing.assert_close(theirs_tokens.flatten(2).mT, tokens[:, 1:], rtol=0, atol=1e-5)
    if kind == "segment":
        assert "no final norm of its own; the file's norm is a fresh one (ones, zeros)" in printed


def test_a_checkpoint_that_is_no_whole_vit_is_refused_by_name(tmp_path):
    net, ckpt = pretrain_checkpoint()
    del ckpt["model"]["blocks.1.mlp.fc2.weight"]
    common.save_checkpoint(ckpt, str(tmp_path / "partial.pt"))
    proc = run_script(["export.py", f"--ckpt={tmp_path / 'partial.pt'}", f"--out={tmp_path / 'x.safetensors'}"],
                      check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"ckpt='{tmp_path / 'partial.pt'}' cannot be exported: its weights do not make a whole ViT" in proc.stderr
    assert "blocks.1.mlp.fc2.weight" in proc.stderr and not os.path.exists(tmp_path / "x.safetensors")
