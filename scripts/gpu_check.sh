#!/usr/bin/env bash
# GPU check: install what is missing, then train each network for a few dozen iterations at 512x512
# with AMP (fp16), printing img/s, peak memory and loss.  Usage: bash scripts/gpu_check.sh [ITERS]
set -uo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ITERS=${1:-40}
python -c "import torch, torchvision" 2>/dev/null || pip install -q torch torchvision
pip install -q --no-deps -e . && pip install -q hydra-core 'omegaconf<2.4' albumentations tqdm tensorboard opencv-python-headless
python - "$ITERS" <<'PY'
import sys, time, torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from segtrain.config import ModelConfig
from segtrain.models import build_model, count_parameters
iters = int(sys.argv[1])
print(torch.__version__, torch.cuda.get_device_name(0))
nets = {"unet (base 64)": dict(name="unet", base_channels=64), "fcn8s-r50": dict(name="fcn", backbone="resnet50", variant="8s"),
        "deconvnet (base 64)": dict(name="deconvnet", base_channels=64), "pspnet-r50-d8": dict(name="pspnet", backbone="resnet50", output_stride=8, aux=True),
        "deeplabv3-r50-d8": dict(name="deeplabv3", backbone="resnet50", output_stride=8),
        "deeplabv3plus-r50-d16": dict(name="deeplabv3plus", backbone="resnet50", output_stride=16)}
bs = 8
for label, kw in nets.items():
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), kw)
    model = build_model(cfg, 21).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(bs, 3, 512, 512, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 21, (bs, 512, 512), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for i in range(iters):
        if i == 5:
            torch.cuda.synchronize(); t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x)
            loss = F.cross_entropy(out["out"].float(), y) + 0.4 * F.cross_entropy(out["aux"].float(), y) if isinstance(out, dict) else F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True); scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
    torch.cuda.synchronize()
    ips = bs * (iters - 5) / (time.perf_counter() - t0)
    print(f"{label:24s} params {count_parameters(model)/1e6:6.2f}M  {ips:7.1f} img/s  peak {torch.cuda.max_memory_allocated()/2**30:5.2f} GiB  loss {loss.item():.3f}", flush=True)
    del model, opt, x, y
    torch.cuda.empty_cache()
PY
# the CLI end to end on the GPU (fp16 AMP by default)
segtrain debug=smoke device=cuda hydra.run.dir=/tmp/gpu_smoke trainer.progress=false | tail -3
