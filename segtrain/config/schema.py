"""The typed config schema: the one source of every default.

Every YAML file under ``configs/`` is merged onto these dataclasses, so a misspelled key, a wrong type or a value
outside an enum fails at compose time and names the key.  The defaults here are the default run's values: the
default option of each group (``model/unet.yaml``, ``data/synthetic.yaml`` ...) only selects it, and the other
options (``optimizer/sgd.yaml``, ``data/voc.yaml`` ...) set only what they change.  :mod:`segtrain.config.validate`
checks the values a type cannot express (``lr > 0``, ``num_classes >= 1`` ...).

The schemas are registered in Hydra's ConfigStore (:func:`register_configs`): ``segtrain_schema`` is the first
entry of ``configs/config.yaml``'s defaults list, and each command has its own (``segtrain_eval_schema`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from segtrain.rundir import unique_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # data.mean / data.std defaults (torchvision's ImageNet statistics)
IMAGENET_STD = (0.229, 0.224, 0.225)


OPTIMIZERS = ("sgd", "adamw")  # optimizer.name (segtrain.optim)
SCHEDULERS = ("poly", "cosine", "constant")  # scheduler.name (segtrain.optim)
LR_SCALINGS = ("none", "linear", "sqrt")  # optimizer.lr_scaling (segtrain.recipe)


class Precision(str, Enum):
    auto = "auto"  # fp16 on CUDA, bf16 on a CPU with native bf16, else fp32
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class DeviceType(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class ModelConfig:
    name: str = MISSING  # unet | fcn | deconvnet | pspnet | deeplabv3 | deeplabv3plus | segformer | upernet
    base_channels: int = 16  # width of from-scratch networks (U-Net, DeconvNet)
    # Encoder networks (FCN, PSPNet, DeepLab, U-Net with an encoder):
    backbone: str | None = None  # resnet18/34/50/101, vgg16, vgg16_bn, mobilenet_v3_large, timm:NAME
    pretrained: Any = False  # true: ImageNet weights (downloaded) | false | PATH: a local weights file or HF folder
    freeze_backbone: bool = False  # the pretrained encoder does not train (requires_grad off, eval mode)
    output_stride: int | None = None  # 8, 16 or 32; None: the network's default
    aux: bool = False  # auxiliary FCN head on stage 3 (train only)
    variant: str | None = None  # network-specific: fcn 32s/16s/8s, deconvnet deconvnet/segnet, segformer b0-b5
    dropout: float = 0.1
    head_channels: int | None = None  # decoder width: pspnet, upernet 512; segformer the variant's (256, 768)
    norm: str = "bn"  # bn | none (from-scratch networks)
    init_from: str | None = None  # partial weight load for fine-tuning


@dataclass
class DataConfig:
    name: str = MISSING  # synthetic | voc | ...
    root: str | None = None  # on-disk data sets
    num_classes: int = 6
    class_names: list[str] | None = None
    image_size: Any = 64  # synthetic: int or [h, w]
    num_train: int = 1600  # synthetic
    num_val: int = 160  # synthetic
    crop_size: Any = None  # int or [h, w]; None: no crop
    batch_size: int = 16
    val_batch_size: int | None = None  # None: batch_size
    num_workers: Any = (
        "auto"  # loader processes per training process; auto: one per CPU but one (<= 16; 0 with <= 2 CPUs)
    )
    pin_memory: bool = True
    persistent_workers: bool = True
    ignore_index: int = 255
    seed: int = 0  # synthetic: content seed (independent of the training seed)
    augment: bool = True  # flips / scale jitter on the training split
    in_channels: int = 3  # image bands (1: grayscale, 4: RGB + NIR, 13: Sentinel-2 ...); see docs/own-data.md
    # Per band, in units where the image type's full range is 1 (uint8 / 255, uint16 / 65535; float images as
    # they are), or "auto": computed from the training images (cached)
    mean: Any = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: Any = field(default_factory=lambda: list(IMAGENET_STD))
    # On-disk data sets (voc | cityscapes | ade20k | folder), see segtrain/data/:
    train_split: str = "train"  # voc: ImageSets/Segmentation/<split>.txt; cityscapes: train|val|test
    val_split: str = "val"
    base_size: Any = None  # int (short side), [h, w] (fit, keep ratio) or auto (median training size); None: own size
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random resize ratio around base_size
    cat_max_ratio: float = 0.75  # re-draw a crop (up to 10x) when one class fills more than this share; 1: off
    photometric: bool = True  # brightness/contrast/saturation/hue distortion in the standard train pipeline
    val_size: Any = None  # int (short side) or [h, w] (fit, keep ratio) for validation; None: base_size (or own size)
    train_pipeline: Any = None  # list of albumentations {_target_: ...} dicts; None: the standard recipe
    val_fraction: float = 0.1  # folder: seeded hold-out when there are no split lists / folders
    palette: Any = None  # [[r, g, b], ...] per class: visualisation, and folder RGB colour masks
    label_map: Any = None  # {raw: new} applied to mask values before checks, e.g. {255: 1}
    check_labels: bool = True  # scan every mask before training (cached); false: skip


@dataclass
class OptimizerConfig:
    name: str = MISSING  # sgd | adamw
    lr: float = 0.001
    weight_decay: float = 0.0001
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    head_lr_mult: float = 1.0  # lr multiplier for everything outside the backbone (decoder, heads)
    no_decay_norm_bias: bool = False  # no weight decay on norm layers and biases
    lr_scaling: str = "none"  # none | linear | sqrt: lr x (total batch / recipe.total_batch), or its square root


@dataclass
class SchedulerConfig:
    name: str = MISSING  # poly | cosine | constant
    power: float = 0.9  # poly
    min_lr: float = 0.0001
    warmup_iters: int = 0
    warmup_ratio: float = 0.1  # warmup starts at lr * warmup_ratio


@dataclass
class LossConfig:
    name: str = MISSING  # ce | ohem | dice | focal | bce (one sigmoid logit), or a weighted sum such as ce+dice
    # per-term weights of a sum, e.g. {ce: 1.0, dice: 3.0}; a term not listed: 1.  Any, not dict[str, float]: OmegaConf
    # cannot merge a dict given on the command line into a null typed dict (validate checks the values)
    weights: Any = None
    class_weights: Any = None  # [w_0, ..., w_K-1], or "auto": median-frequency weights from the training masks
    aux_weight: float = 0.4  # weight of the auxiliary head's loss (same terms)
    label_smoothing: float = 0.0  # ce, ohem
    ohem_thresh: float = 0.7  # ohem: pixels whose true-class probability is below this are hard
    ohem_min_kept: int = 100000  # ohem: keep at least this many pixels per batch (the hardest ones)
    focal_gamma: float = 2.0  # focal: (1 - p_t) ** gamma
    focal_alpha: float | None = None  # focal: optional scalar alpha
    dice_smooth: float = 1.0  # dice: (2|X.Y| + s) / (|X| + |Y| + s)


@dataclass
class DeviceConfig:
    type: DeviceType = DeviceType.auto
    precision: Precision = Precision.auto
    channels_last: bool = True
    compile: bool = False
    cudnn_benchmark: bool = True
    sync_bn: bool = True  # DDP on CUDA: BatchNorm statistics over all processes (off with one process / on CPU)


@dataclass
class EvalConfig:
    """How validation (during training) and ``segtrain-eval`` predict a full image."""

    mode: str = "whole"  # whole: one forward pass per image | slide: overlapping crops, overlaps averaged
    crop_size: Any = None  # slide: int or [h, w]; None: data.crop_size
    stride: Any = None  # slide: int or [h, w]; None: 2/3 of the crop
    scales: list[float] = field(default_factory=lambda: [1.0])  # multi-scale test-time augmentation
    flip: bool = False  # add horizontally flipped views (probabilities are averaged over views)
    threshold: float = 0.5  # data.num_classes=1: foreground where sigmoid(logit) > threshold (others: refused if set)


@dataclass
class TrainerConfig:
    max_epochs: int | None = 12
    max_iters: int | None = None  # wins over max_epochs when set
    val_interval: int | None = None  # iterations between validations; None: every epoch
    log_interval: int = 10  # iterations between TensorBoard scalars
    grad_clip: float | None = None  # max grad norm
    accumulate: int = 1  # micro-batches per optimizer step (effective batch = data.batch_size x accumulate)
    resume: str | None = None  # PATH or "auto" (last.pt of this run dir, if any)
    overwrite: bool = False  # start over in a run dir that holds a run: its files move to previous-<time>/
    keep_last: int = 1  # previous last.pt files kept as last-1.pt ... (a fallback if the newest is unreadable)
    stop_at: int | None = None  # stop after this iteration as if preempted (writes last.pt, exit code 75)
    deterministic: bool = False
    num_vis: int = 4  # images in the logged grid per validation
    progress: bool = True  # tqdm bars
    debug_errors: bool = False  # show full tracebacks
    # Checkpoints and early stopping by a validation value (segtrain/monitor.py):
    monitor: str = "val/mIoU"  # val/mIoU | val/aAcc | val/mAcc | val/mDice | val/loss | val_iou/<class>
    monitor_mode: str = "auto"  # max | min | auto (min for val/loss, else max)
    early_stop_patience: int | None = None  # stop after this many validations without improvement; null: off
    early_stop_min_delta: float = 0.0  # an improvement must exceed this to reset the patience count
    save_top_k: int = 0  # keep the k best as best-<step>-<value>.pt (-1: every validation; 0: best.pt only)
    # Weight EMA (segtrain/ema.py): validation and best checkpoints use the averaged weights
    ema_decay: float | None = None  # e.g. 0.999; null: off
    ema_warmup: int | None = 10  # decay_n = min(ema_decay, (1 + n) / (ema_warmup + n)); null: no warm-up


@dataclass
class TensorBoardLoggerConfig:
    dir: str = "tb"  # under the run dir


@dataclass
class CSVLoggerConfig:
    filename: str = "metrics.csv"  # under the run dir


@dataclass
class WandbLoggerConfig:
    project: str = "segtrain"
    entity: str | None = None
    name: str | None = None  # null: <job number>_<overrides> in a sweep, else the overrides or the run dir's name
    group: str | None = None  # null: the sweep dir's name in a sweep
    tags: list[str] = field(default_factory=list)
    mode: str = "offline"  # offline (sync later with `wandb sync`) | online | disabled


@dataclass
class MLflowLoggerConfig:
    tracking_uri: str | None = None  # null: a local file store, <run dir>/mlruns
    experiment: str = "segtrain"
    run_name: str | None = None  # null: as logger.wandb.name


@dataclass
class LoggerConfig:
    """The ``logger`` group: each option (``logger=csv``, ``logger=[tensorboard,csv]``) switches a backend on."""

    tensorboard: TensorBoardLoggerConfig | None = None
    csv: CSVLoggerConfig | None = None
    wandb: WandbLoggerConfig | None = None
    mlflow: MLflowLoggerConfig | None = None


@dataclass
class RecipeConfig:
    """What a recipe (``experiment=``) was published with, so that a run on other hardware can tell (segtrain/recipe.py)."""

    total_batch: int | None = None  # processes x data.batch_size x trainer.accumulate of the published run
    miou: float | None = None  # its published mIoU (%)
    source: str | None = None  # where the number comes from


@dataclass
class SegtrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    seed: int = 42
    run_dir: str | None = None  # None: Hydra's run dir (the working directory of the job)


@dataclass
class EvalAppConfig(SegtrainConfig):
    """``segtrain-eval``: the training schema plus the checkpoint to evaluate."""

    ckpt: str = MISSING  # PATH to a segtrain checkpoint (best.pt / last.pt)


@dataclass
class InfoSettings:
    size: Any = None  # int or [h, w]; None: data.crop_size, else data.image_size, else 512
    batch_size: int = 8  # the larger of the two timed batch sizes (the other is 1)
    warmup: int = 5  # untimed forward passes before timing (allocator, cuDNN autotuning, compilation)
    iters: int = 20  # timed forward passes per batch size
    latency: bool = True  # false: parameters and FLOPs only


@dataclass
class InfoAppConfig(SegtrainConfig):
    """``segtrain-info``: the training schema, an optional checkpoint, and what to measure."""

    ckpt: str | None = None  # PATH: the model (and data) config stored in a segtrain checkpoint
    info: InfoSettings = field(default_factory=InfoSettings)


@dataclass
class PredictConfig:
    """What ``segtrain-predict`` writes for each image."""

    batch_size: int = 8  # images per forward pass (images of the same size are batched together)
    overlay: bool = True  # <name>_overlay.jpg: the image blended with the class colours
    alpha: float = 0.5  # overlay: weight of the class colours (0: the image, 1: the colours)
    save_probs: bool = False  # <name>.npy: float16 class probabilities [C, H, W]
    extensions: list[str] = field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"]
    )  # the files a folder or glob input picks up (case-insensitive)


@dataclass
class PredictAppConfig(EvalAppConfig):
    """``segtrain-predict``: a checkpoint, the images, and where the masks go."""

    input: str = MISSING  # an image, a folder (read recursively) or a glob pattern such as 'photos/**/*.jpg'
    output: str | None = None  # folder for the masks; None: the run dir
    overwrite: bool = False  # replace files this command did not write (earlier predictions); never inputs or run files
    predict: PredictConfig = field(default_factory=PredictConfig)


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


@dataclass
class ExportAppConfig:
    """``segtrain-export``: a checkpoint's network as ONNX or TorchScript, checked against PyTorch."""

    ckpt: str = MISSING  # PATH to a segtrain checkpoint (best.pt / last.pt)
    format: ExportFormat = ExportFormat.onnx
    output: str | None = None  # FILE (.onnx; .pt/.pth) or FOLDER/ (model.onnx / model.pt in it); None: the run dir
    opset: int = 18  # ONNX opset (>= 18)
    check_sizes: list[Any] = field(default_factory=lambda: [[97, 131], [75, 109], [160, 96]])  # [h, w] self-check sizes
    tolerance: float = 0.001  # largest |exported - PyTorch| logit difference the self-check accepts (fp32)
    overwrite: bool = False  # replace a file this command did not write (an earlier export); never a checkpoint


def register_configs() -> None:
    """The schemas in Hydra's ConfigStore, and the ``unique_dir`` resolver of the default run dirs."""
    ConfigStore.instance().store(name="segtrain_schema", node=SegtrainConfig)
    ConfigStore.instance().store(name="segtrain_eval_schema", node=EvalAppConfig)
    ConfigStore.instance().store(name="segtrain_predict_schema", node=PredictAppConfig)
    ConfigStore.instance().store(name="segtrain_export_schema", node=ExportAppConfig)
    ConfigStore.instance().store(name="segtrain_info_schema", node=InfoAppConfig)
    OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True, replace=True)


APP_SCHEMAS: dict[str, type] = {  # each command's primary config (configs/NAME.yaml) and its schema
    "config": SegtrainConfig,
    "eval": EvalAppConfig,
    "predict": PredictAppConfig,
    "export": ExportAppConfig,
    "info": InfoAppConfig,
}


def config_dir() -> str:
    """The shipped configs: ``segtrain/configs`` in a wheel, the repo's ``configs/`` in a source checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise SystemExit("segtrain: error: cannot find the shipped configs (config.yaml); reinstall segtrain")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
