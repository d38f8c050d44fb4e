"""SegFormer: parameter counts and function against transformers' reference, any input size, weights from files."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from segtrain.config import ModelConfig
from segtrain.errors import ConfigError
from segtrain.models.build import build_model, count_parameters
from segtrain.models.segformer import VARIANTS, SegFormer, convert_state_dict
from tests.safetensors_writer import save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")

# transformers' SegformerForSemanticSegmentation (5.25), random init, for (variant, classes); the paper's table:
# 3.8M, 13.7M, 27.5M, 47.3M, 64.1M, 84.7M
REFERENCE_PARAMS = {
    ("b0", 150): 3_752_694,
    ("b0", 19): 3_719_027,
    ("b1", 150): 13_715_798,
    ("b1", 19): 13_682_131,
    ("b2", 150): 27_461_974,
    ("b2", 19): 27_361_235,
    ("b3", 150): 47_337_814,
    ("b3", 19): 47_237_075,
    ("b4", 150): 64_108_374,
    ("b4", 19): 64_007_635,
    ("b5", 150): 84_708_694,
    ("b5", 19): 84_607_955,
}
HF_SIZES = {"b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256), "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256)}


def model_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": "segformer", **kw})


def hf_config(variant: str, classes: int):
    """transformers' SegformerConfig of ``variant`` (its defaults are MiT-b0's)."""
    from transformers import SegformerConfig

    widths, depths, decoder = VARIANTS[variant]
    return SegformerConfig(
        hidden_sizes=list(widths), depths=list(depths), decoder_hidden_size=decoder, num_labels=classes
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_counts_equal_the_reference(variant):
    """Ours equal the hard-coded counts of transformers' model; with transformers installed, its model too."""
    try:
        from transformers import SegformerForSemanticSegmentation
    except ImportError:
        SegformerForSemanticSegmentation = None
    for classes in (150, 19):
        with torch.device("meta"):
            ours = count_parameters(SegFormer(classes, variant))
            theirs = (
                count_parameters(SegformerForSemanticSegmentation(hf_config(variant, classes)))
                if SegformerForSemanticSegmentation is not None
                else REFERENCE_PARAMS[variant, classes]
            )
        assert ours == theirs == REFERENCE_PARAMS[variant, classes], (variant, classes, ours, theirs)


def test_any_input_size_and_training_steps():
    """97x131 gives 97x131 logits; a few AdamW steps on a tiny problem lower the loss; stochastic depth only trains."""
    torch.manual_seed(0)
    model = build_model(model_cfg(variant="b0"), 3)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 97, 131)).shape == (1, 3, 97, 131)
        x = torch.randn(1, 3, 64, 80)
        assert torch.equal(model(x), model(x))  # eval: no drop path
    target = torch.zeros(2, 64, 64, dtype=torch.long)
    target[:, :, 32:] = 1
    target[:, 40:] = 2
    x = F.one_hot(target, 3).permute(0, 3, 1, 2).float() + 0.1 * torch.randn(2, 3, 64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert model.backbone.stages[3].blocks[1].drop_path.p == pytest.approx(0.1)  # 0 .. 0.1 over the 8 blocks


# --- weights in other implementations' names ---------------------------------------------------------------

V5_TO_V4 = [  # transformers >= 5 names -> < 5 (the hub's files), after transformers' conversion_mapping.py
    (r"segformer\.stages\.(\d+)\.patch_embeddings\.", r"segformer.encoder.patch_embeddings.\1."),
    (r"segformer\.stages\.(\d+)\.blocks\.", r"segformer.encoder.block.\1."),
    (r"segformer\.stages\.(\d+)\.layer_norm\.", r"segformer.encoder.layer_norm.\1."),
    (r"attention\.q_proj", "attention.self.query"),
    (r"attention\.k_proj", "attention.self.key"),
    (r"attention\.v_proj", "attention.self.value"),
    (r"attention\.sequence_reduction\.sequence_reduction", "attention.self.sr"),
    (r"attention\.sequence_reduction\.layer_norm", "attention.self.layer_norm"),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "mlp.dense1"),
    (r"mlp\.fc2", "mlp.dense2"),
    (r"layernorm_before", "layer_norm_1"),
    (r"layernorm_after", "layer_norm_2"),
    (r"decode_head\.linear_projections", "decode_head.linear_c"),
]


def _v4_names(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for pattern, repl in V5_TO_V4:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def _reference(classes: int = 5):
    """transformers' SegFormer-B0, random weights and BN statistics, larger logits than at init."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = transformers.SegformerForSemanticSegmentation(hf_config("b0", classes)).eval()
    with torch.no_grad():
        ref.decode_head.batch_norm.running_mean.uniform_(-0.1, 0.1)
        ref.decode_head.batch_norm.running_var.uniform_(0.5, 2.0)
        ref.decode_head.classifier.weight.mul_(20)
    return ref


def _their_logits(ref, x):
    with torch.no_grad():
        return F.interpolate(ref(pixel_values=x).logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_transformers_weights_give_the_same_logits(tmp_path):
    """transformers' SegFormer, saved as a .safetensors file (its names today) and as a Hugging Face folder
    (config.json + pytorch_model.bin in the hub's older names, which transformers itself reads back), loads into
    ours with model.pretrained=PATH: the same logits at an odd size, so the same architecture."""
    ref = _reference()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_safetensors(state, tmp_path / "segformer.safetensors")
    folder = tmp_path / "hf"
    ref.config.save_pretrained(folder)
    torch.save(_v4_names(state), folder / "pytorch_model.bin")
    from transformers import SegformerForSemanticSegmentation

    reread = SegformerForSemanticSegmentation.from_pretrained(folder).eval()  # the test's old names are real
    x = torch.randn(1, 3, 97, 131)
    expected = _their_logits(ref, x)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(_their_logits(reread, x), expected)
    for path in (tmp_path / "segformer.safetensors", folder):
        torch.manual_seed(1)
        ours = build_model(model_cfg(variant="b0", pretrained=str(path)), 5).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)


def test_encoder_weights_and_other_bands(tmp_path):
    """nvidia/mit-b0 is an ImageNet classifier: the encoder loads, the decoder stays fresh; with 4 bands the first
    layer is adapted (bands repeating RGB give the RGB encoder's features)."""
    ref = _reference()
    encoder_only = {k: v for k, v in ref.state_dict().items() if k.startswith("segformer.")}
    encoder_only["classifier.weight"] = torch.zeros(1000, 256)  # SegformerForImageClassification's head
    torch.save(_v4_names(encoder_only), tmp_path / "mit.bin")
    rgb = build_model(model_cfg(pretrained=str(tmp_path / "mit.bin")), 5).eval()
    six = build_model(model_cfg(pretrained=str(tmp_path / "mit.bin")), 5, in_channels=6).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(six.backbone(x.repeat(1, 2, 1, 1))[4], rgb.backbone(x)[4], rtol=1e-4, atol=1e-4)
        features = ref.segformer(pixel_values=x).last_hidden_state
        torch.testing.assert_close(rgb.backbone(x)[4], features, rtol=1e-4, atol=1e-4)


def test_the_papers_checkpoint_names():
    """NVlabs/SegFormer's names (patch_embed1, block1.0.attn.kv, norm1, decode_head.linear_c4 ...) map onto ours,
    the joint key/value layer split in two."""
    torch.manual_seed(0)
    ours = SegFormer(4, "b0")
    paper = {}
    for name, tensor in ours.state_dict().items():
        new = re.sub(r"backbone\.stages\.(\d)\.patch_embed\.", lambda m: f"patch_embed{int(m[1]) + 1}.", name)
        new = re.sub(r"backbone\.stages\.(\d)\.blocks\.", lambda m: f"block{int(m[1]) + 1}.", new)
        new = re.sub(r"backbone\.stages\.(\d)\.norm\.", lambda m: f"norm{int(m[1]) + 1}.", new)
        new = new.replace(".ffn.", ".mlp.").replace(".mlp.dwconv.", ".mlp.dwconv.dwconv.")
        new = new.replace(".attn.sr_norm.", ".attn.norm.")
        new = re.sub(r"head\.linear_c\.(\d)\.", lambda m: f"decode_head.linear_c{int(m[1]) + 1}.proj.", new)
        new = new.replace("head.fuse.0.", "decode_head.linear_fuse.conv.").replace(
            "head.fuse.1.", "decode_head.linear_fuse.bn."
        )
        new = new.replace("head.classifier.", "decode_head.linear_pred.")
        paper[new] = tensor
    for key in [k for k in paper if ".attn.k." in k]:
        paper[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([paper.pop(key), paper.pop(key.replace(".k.", ".v."))])
    assert "block1.0.attn.kv.weight" in paper and "norm4.weight" in paper and "block4.1.norm1.weight" in paper
    encoder, decoder = convert_state_dict(
        {f"backbone.{k}" if "decode_head" not in k else k: v for k, v in paper.items()}
    )
    assert encoder.keys() == ours.backbone.state_dict().keys() and decoder.keys() == ours.head.state_dict().keys()
    for k, v in ours.backbone.state_dict().items():
        assert torch.equal(encoder[k], v), k
    for k, v in ours.head.state_dict().items():
        assert torch.equal(decoder[k], v), k


def test_a_file_of_another_network_is_one_line(tmp_path):
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, tmp_path / "r18.pth")
    with pytest.raises(ConfigError) as e:
        build_model(model_cfg(pretrained=str(tmp_path / "r18.pth")), 5)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= 300, msg
    assert re.search(r"0 of the 192 tensors of the MiT-b0 encoder match the file's 2; missing stages\.0\.", msg), msg
    with pytest.raises(ConfigError, match="no such file or folder"):
        build_model(model_cfg(pretrained=str(tmp_path / "nope.pth")), 5)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"variant": "b9"}, "unknown model.variant 'b9' for segformer; choose one of: b0, b1"),
        ({"backbone": "resnet50"}, "builds its own Mix Transformer encoder"),
        ({"aux": True}, "model.aux=true is not used by model=segformer"),
        ({"output_stride": 16}, "model.output_stride=16 is not used by model=segformer"),
        ({"pretrained": 3}, "model.pretrained must be true, false or the PATH"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        build_model(model_cfg(**kw), 3)


def test_min_input_size():
    from segtrain.models import min_input_size

    assert min_input_size(model_cfg()) == 32
    with torch.no_grad():  # 29 px is the smallest that works: stage 1 has 8 rows for the 8 x 8 reduction
        assert SegFormer(2, "b0").eval()(torch.randn(1, 3, 29, 40)).shape == (1, 2, 29, 40)


def test_pretrained_true_uses_the_hub_cache_or_says_where_to_put_the_file(tmp_path, monkeypatch):
    """model.pretrained=true: nvidia/mit-b0 from the torch hub cache (nvidia-mit-b0.bin), else a download that
    fails fast offline naming the URL and the cache path."""
    from segtrain.models import backbones

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(backbones, "DOWNLOAD_TIMEOUT", 2.0)
    monkeypatch.setattr(
        "segtrain.models.segformer.WEIGHTS_URL", "http://127.0.0.1:9/nvidia/mit-{variant}/pytorch_model.bin"
    )
    with pytest.raises(ConfigError) as e:
        build_model(model_cfg(pretrained=True), 5)
    msg = str(e.value)
    assert "\n" not in msg and "http://127.0.0.1:9/nvidia/mit-b0/pytorch_model.bin" in msg
    assert str(tmp_path / "hub" / "checkpoints" / "nvidia-mit-b0.bin") in msg
    torch.manual_seed(4)
    encoder = SegFormer(1000, "b0").backbone.state_dict()
    torch.save({f"backbone.{k}": v for k, v in encoder.items()}, tmp_path / "hub" / "checkpoints" / "nvidia-mit-b0.bin")
    model = build_model(model_cfg(pretrained=True), 5)
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in encoder.items())
