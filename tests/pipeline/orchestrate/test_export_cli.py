"""`mam2 export`: every model and format writes a file that loads back (identical tensors, or through the
VideoMAE layout the same outputs), outside code reads the exports (torchvision's RAFT, safetensors,
finetune.init), and wrong combinations or missing models fail with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torchvision.models.optical_flow import raft_small

from models.classifier import VideoClassifier, classifier_config, load_classifier, save_classifier
from models.encoder_io import load_encoder, save_encoder
from models.flow import build_flow_model, torchvision_state_dict_from_original
from models.flow_io import load_flow_model, save_flow_model
from models.video_vit import build_encoder
from models.videomae_convert import load_videomae_classifier, load_videomae_encoder
from pipeline.orchestrate.cli import main as mam2
from stages.finetune import is_our_encoder

CONFIG = {"name": "tiny", "img_size": 32, "num_frames": 4, "patch_size": 8, "tubelet_size": 2, "depth": 2,
          "embed_dim": 64, "num_heads": 4}
SIZE = {"img_size": 32, "num_frames": 4, "source_num_frames": 4, "source_img_size": 32, "num_heads": 4}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A params file whose artifacts folder holds a tiny encoder, classifier and an untrained raft_small."""
    root = tmp_path_factory.mktemp("export")
    artifacts = root / "artifacts"
    torch.manual_seed(0)
    save_encoder(build_encoder(**CONFIG), CONFIG, artifacts / "pretrain" / "encoder.pt",
                 input_norm="imagenet")
    model = VideoClassifier(build_encoder(**CONFIG), 3, input_norm="imagenet", head_init_scale=1.0)
    with torch.no_grad():
        for block in model.encoder.blocks:
            block.attn.qkv.bias.normal_()  # a k bias the VideoMAE layout has no place for
    save_classifier(model, classifier_config(model, CONFIG, ["a", "b", "c"]),
                    artifacts / "finetune" / "classifier.pt")
    (artifacts / "motion_pretrain").mkdir(parents=True)
    save_flow_model(build_flow_model("raft_small"), "raft_small", artifacts / "motion_pretrain" / "flow.pt")
    (root / "params.yaml").write_text(yaml.safe_dump({"paths": {"artifacts": str(artifacts)}}))
    return root


def export(project: Path, *args: str) -> int:
    return mam2(["export", "--params", str(project / "params.yaml"), *args])


def test_encoder_exports_load_back(project, capsys):
    out = project / "out"
    assert export(project, "--what", "encoder", "--format", "safetensors", "--out", str(out / "enc.st")) == 0
    assert "identical tensors" in capsys.readouterr().out
    original, _ = load_encoder(project / "artifacts" / "pretrain" / "encoder.pt")
    loaded, config = load_encoder(out / "enc.st")  # no .safetensors suffix: found by its header
    assert config == CONFIG and is_our_encoder(out / "enc.st")  # finetune.init takes it as our encoder
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in original.state_dict().items())
    assert export(project, "--what", "encoder", "--format", "videomae", "--out", str(out / "enc.pth")) == 0
    printed = capsys.readouterr().out
    assert "VideoMAE pre-trained layout" in printed and "same outputs" in printed and "pos_embed" in printed
    state = torch.load(out / "enc.pth", weights_only=True)
    assert state["mam2"]["input_norm"] == "imagenet" and "encoder.blocks.1.attn.q_bias" in state["model"]
    videomae, *_ = load_videomae_encoder(out / "enc.pth", **SIZE)
    x = torch.rand(1, 3, 4, 32, 32)
    assert torch.equal(videomae.eval()(x), original.eval()(x))  # k bias was zero: exactly the same


def test_classifier_exports_give_the_same_logits(project, capsys):
    out = project / "out"
    original, _ = load_classifier(project / "artifacts" / "finetune" / "classifier.pt")
    x = torch.rand(2, 3, 4, 32, 32)
    path = out / "classifier.safetensors"
    assert export(project, "--what", "classifier", "--format", "safetensors", "--out", str(path)) == 0
    back, config = load_classifier(path)
    assert config["class_names"] == ["a", "b", "c"] and torch.equal(back(x), original(x))
    assert export(project, "--what", "classifier", "--format", "videomae", "--out", str(out / "cls.pth")) == 0
    assert "k bias is dropped" in capsys.readouterr().out
    videomae, _, report = load_videomae_classifier(out / "cls.pth", **SIZE)
    assert report.layout == "finetuned" and report.offending == []
    torch.testing.assert_close(videomae(x), original(x), atol=1e-5, rtol=1e-5)


def test_flow_exports_load_into_torchvision_and_back(project):
    out = project / "out"
    original = load_flow_model(project / "artifacts" / "motion_pretrain" / "flow.pt").state_dict()
    assert export(project, "--what", "flow", "--format", "torchvision", "--out", str(out / "raft.pth")) == 0
    model = raft_small(weights=None, progress=False)
    model.load_state_dict(torch.load(out / "raft.pth", weights_only=True))  # strict: torchvision's own model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())
    path = out / "f.safetensors"
    assert export(project, "--what", "flow", "--format", "safetensors", "--out", str(path)) == 0
    model.load_state_dict(load_file(str(path)))
    assert all(torch.equal(v, load_flow_model(path).state_dict()[k]) for k, v in original.items())
    assert export(project, "--what", "flow", "--format", "raft", "--out", str(out / "orig.pth")) == 0
    state = torch.load(out / "orig.pth", weights_only=True)
    assert all(k.startswith("module.") for k in state) and any(".fnet." in k for k in state)
    renamed, unexpected, _ = torchvision_state_dict_from_original(state, build_flow_model("raft_small"))
    assert unexpected == [] and all(torch.equal(v, renamed[k]) for k, v in original.items())


def test_wrong_combinations_and_missing_models_fail_with_one_line(project, tmp_path, capsys):
    assert export(project, "--what", "flow", "--format", "videomae", "--out", str(tmp_path / "x")) == 2
    assert "a flow exports to torchvision, raft, safetensors, not videomae" in capsys.readouterr().err
    assert export(project, "--what", "encoder", "--format", "safetensors", "--out", str(tmp_path / "x"),
                  "--from", str(tmp_path / "none.pt")) == 1
    assert "encoder not found" in capsys.readouterr().err and not (tmp_path / "x").exists()
    classifier = project / "artifacts" / "finetune" / "classifier.pt"
    assert export(project, "--what", "encoder", "--format", "videomae", "--out", str(tmp_path / "x"),
                  "--from", str(classifier)) == 1
    assert "not a mam2 encoder checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export(project, "--what", "tracker", "--format", "safetensors", "--out", str(tmp_path / "x"))
    capsys.readouterr()


def test_help_explains_the_formats(capsys):
    with pytest.raises(SystemExit) as done:
        mam2(["export", "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    assert "encoder: videomae, safetensors" in text and "use_learnable_pos_emb" in text and "--from" in text
    assert mam2([]) == 0  # the command list names it
    assert "  export  " in capsys.readouterr().out
