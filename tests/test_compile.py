"""device.compile=true: training compiles its graphs once; the last, smaller batch is dropped and validation runs
eager, so neither triggers a recompile (each recompile costs seconds on a CPU, minutes for a big network)."""

import functools

import torch
from test_config import composed

from segtrain.build import build_trainer


def test_compiled_training_never_recompiles_across_epochs_and_validation(tmp_path, monkeypatch):
    graphs: list[list[tuple]] = []

    def counting_backend(gm, example_inputs):  # every graph dynamo hands to a compiler: first compiles and recompiles
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    cfg = composed(
        "debug=smoke", "data.num_train=18", "data.num_val=6", "data.val_batch_size=4", "trainer.max_epochs=3",
        "trainer.progress=false", "trainer.num_vis=0", "model.base_channels=4", "device=cpu", "device.compile=true",
    )  # fmt: skip
    trainer = build_trainer(cfg, tmp_path / "run")
    step = trainer.train_step
    after_first: list[int] = []

    def train_step(micro):
        out = step(micro)
        after_first.append(len(graphs)) if not after_first else None
        return out

    trainer.train_step = train_step
    summary = trainer.fit()
    assert summary["step"] == 12  # 18 images, batch 4: 4 full batches per epoch, the 2 left over dropped
    assert len(trainer.history) == 3  # validated after every epoch (6 images: a batch of 4, then one of 2)
    assert after_first[0] >= 1 and len(graphs) == after_first[0], graphs  # nothing compiled after the first step
    torch._dynamo.reset()
