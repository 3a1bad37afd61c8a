"""The config's sections as typed dataclasses, one per concern, each default with a short reason where it is not
obvious, and the closed sets of values some keys take."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field


INT_MAX = 2**31 - 1  # the largest int key: every seed (+ rank, + epoch) fits NumPy's and torch's generators


def at_least(low: int, default: int, note: str = ""):
    """An int key whose smallest valid value is low (int keys start at 0 otherwise): coerce and validate refuse
    a smaller one saying ">= low", the real bound, and note (what low means) after it."""
    return field(default=default, metadata={"range": (low, INT_MAX), "note": note})


@dataclass
class EncoderConfig:
    # a torchvision CNN (resnet18/50/101/152, ...), timm/NAME (any timm.list_models() name, pip install
    # "captioner[timm]") or open_clip/NAME (the model's visual tower, pip install "captioner[clip]")
    arch: str = "resnet152"
    # module whose output is taken by a forward hook (`captioner layers ARCH` lists them); "" (the default): the last
    # feature stage the library reports (layer4 of a ResNet, stages.3 of a timm ConvNeXt, the last transformer
    # block of a ViT); `train` records the resolved name in the checkpoint
    layer: str = ""
    # None (random init), the library's weights name (torchvision IMAGENET1K_V2, a timm or open_clip tag) or a
    # local .safetensors / .pth / .bin file
    weights: str | None = None
    in_channels: int = at_least(1, 3)  # != 3 replaces conv1 (e.g. 11-band satellite images)
    # images are resized to image_size x image_size; 224 gives a 7x7 layer4 grid (a ViT's patch size must divide it)
    image_size: int = at_least(32, 224)
    # None keeps the backbone frozen; e.g. layer4 trains it and what follows, up to the hook
    finetune_from: str | None = None
    seed: int = 0  # random-init weights (weights: null) come from this seed, in train and extract alike
    # Normalisation (x / 255 - mean) / std per channel and the resize filter. None / "": the weights' own (timm's
    # pretrained config, open_clip's preprocess config, ImageNet and bicubic for torchvision); `train` records
    # the values it used in the checkpoint, so caption, serve and evaluate preprocess exactly as training did.
    mean: list[float] | None = None
    std: list[float] | None = None  # per-channel std of the normalisation above; None: the weights' own
    interpolation: str = ""  # "" (the weights' own), bicubic or bilinear


@dataclass
class ModelConfig:
    embed_dim: int = at_least(1, 512)  # word embedding size, also the size features are projected to
    attention_dim: int = at_least(1, 512)  # size of the additive attention's hidden layer
    decoder_dim: int = at_least(1, 512)  # LSTM hidden size
    dropout: float = 0.5  # dropout before the word classifier, in training only
    alpha_c: float = 1.0  # weight of the doubly stochastic attention regulariser (Show, Attend and Tell eq. 14)
    # What the decoder attends over (docs/quality.md): norm, a LayerNorm over all C encoder channels (unit scale
    # even for random-init weights); project, Linear to embed_dim + LayerNorm (the first default: fewer distinct
    # captions on real photos); raw, the activations as they are (pretrained weights only)
    features: str = "norm"
    attention: str = "tanh"  # additive attention's nonlinearity: tanh (Bahdanau) or relu (the reference tutorial)
    init_state: str = "tanh"  # h0, c0 = tanh(Linear(mean region)) or "linear" (no tanh, the reference tutorial)
    gate: bool = True  # sigmoid gate on the attention context ("beta", Show, Attend and Tell 4.2.1)


# The values these keys had before the real-photo benchmark measured better defaults (docs/quality.md, k-fold
# table): a saved config without the key takes it (LEGACY_DEFAULTS), and a run continuing a checkpoint trained
# with it (--init-from, --resume --config) keeps it unless its file or overrides state the key
# (defaults.inherit_old_defaults). Each new default is its dataclass field's (one line to change).
DEFAULTS_BEFORE_MEASURED = {"train": {"label_smoothing": 0.0, "val_beam_size": 1}, "decode": {"suppress_unk": False}}


# The value a key added after a checkpoint was written takes when that checkpoint is loaded: the behaviour
# it was trained with, whatever today's default is.
LEGACY_DEFAULTS = {"model": {"features": "project", "attention": "tanh", "init_state": "tanh", "gate": True},
                   **DEFAULTS_BEFORE_MEASURED}


DATASET_FORMATS = ("auto", "synthetic", "coco", "karpathy", "flickr8k", "flickr30k", "csv", "jsonl")
INTERPOLATIONS = ("bicubic", "bilinear")  # the resize filters of encoder.interpolation (every timm/open_clip weight's)


@dataclass
class DatasetConfig:
    format: str = "auto"  # auto (from the annotations file; synthetic without one) or one of DATASET_FORMATS
    root: str = "data/synthetic"  # synthetic: generated here on first use; others: base for relative paths
    annotations: str = ""  # the captions file: COCO JSON, Karpathy dataset_*.json, Flickr8k.token.txt, CSV, JSONL
    encoding: str = ""  # the captions files' text encoding: "" reads UTF-8 (with or without BOM), else e.g. latin-1
    images: str = ""  # image folder (Karpathy COCO: the one holding train2014/, val2014/); empty: annotations' folder
    splits: str = ""  # optional JSON {"train": [image ids], "val": [...], "test": [...]}; overrides the file's own
    train_list: str = ""  # optional image-name lists, one per line (Flickr_8k.trainImages.txt); Flickr8k's three
    val_list: str = ""  # lists are found next to the token file without these; images in no list are unused
    test_list: str = ""  # the test split's image-name list (as train_list)
    restval: str = "train"  # Karpathy 'restval' images: train (Karpathy's recipe, 113k train images) or drop
    max_missing_fraction: float = 0.05  # missing image files are skipped with a warning; more than this is an error
    val_fraction: float = 0.1  # data without splits: share of images held out for val, and again for test
    min_freq: int = at_least(1, 1)  # words seen fewer times in the training captions become <unk>
    max_len: int = at_least(1, 30)  # captions are cut to this many words
    synthetic_images: int = at_least(1, 2000)  # synthetic only: how many images to generate
    synthetic_seed: int = 0  # synthetic only: the seed its images and captions are drawn with


@dataclass
class TrainConfig:
    epochs: int = at_least(1, 10)  # passes over the training captions
    batch_size: int = at_least(1, 64)  # captions per training step (scst: images)
    lr: float = 4e-4  # AdamW learning rate of the decoder (encoder.finetune_from stages: train.encoder_lr)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (0: off)
    grad_clip: float = 5.0  # gradients are clipped to this total norm (0: no clipping)
    seed: int = 0  # seeds initialisation, shuffling and dropout: a run repeats exactly on a CPU
    num_workers: int = 2  # DataLoader processes of the training loader (and validation)
    log_every: int = at_least(1, 50)  # steps between metrics.jsonl lines
    precompute_features: bool = True  # run the frozen encoder once per image instead of once per caption per epoch
    val_images: int = 0  # cap on validation images per epoch (0 = all)
    checkpoint_every: int = 500  # steps between last.pt saves (0: only at the end of each epoch)
    max_bad_steps: int = at_least(1, 5)  # a non-finite loss skips its step; this many in a row stop the run
    lr_schedule: str = "none"  # none | cosine | step | plateau (after warmup_steps of linear warmup)
    warmup_steps: int = 0  # steps of linear warmup from 0 to train.lr before the schedule (0: none)
    min_lr_ratio: float = 0.0  # cosine: the final lr as a fraction of the initial one
    lr_decay_epochs: int = at_least(1, 1)  # step: the lr is multiplied by lr_gamma every this many epochs
    lr_gamma: float = 0.1  # step and plateau: the factor of each decay
    lr_patience: int = 2  # plateau: validations without improvement before the lr decays
    # false: best.pt is the latest validated weights, not the best-scoring epoch's (with train.ema_decay, the average):
    # on a small val set the best of many noisy scores is often a lucky, undertrained early epoch (docs/quality.md)
    select_best: bool = True
    select_metric: str = "cider"  # validation score (coco-caption's, as evaluate's) that picks best.pt, drives plateau
    # and early stopping: cider (CIDEr-D), bleu1..bleu4 or rouge_l
    early_stop_patience: int = 0  # stop after this many validations without improvement (0: never)
    # validation's beam: 0 (the default) decode.beam_size's, so best.pt is picked on the captions `evaluate` and
    # `caption` write (measured best, docs/quality.md); 1 greedy (faster); a run records the number it used
    val_beam_size: int = at_least(0, 0, "0: decode.beam_size, 1: greedy")
    validate_init: bool = True  # --init-from: score the starting weights first (epoch 0; best.pt until an epoch beats
    # them), so fine-tuning, self-critical training above all, never leaves a best.pt worse on val than its start
    encoder_lr: float = 1e-4  # learning rate of the fine-tuned encoder stages (encoder.finetune_from)
    objective: str = "xe"  # xe: cross-entropy on the reference captions; scst: self-critical training on CIDEr-D
    scst_samples: int = at_least(1, 5)  # scst: captions sampled per image (train.batch_size counts images)
    scst_baseline: str = "mean"  # scst: mean (of the image's other samples; Luo 2020) or greedy (Rennie et al.)
    scst_max_len: int = 0  # scst: longest sampled caption, in words (0: decode.max_len, which then also cuts captions)
    scst_entropy: float = 0.0  # scst: weight of an entropy bonus that keeps sampling from collapsing (0: off)
    # scst: a sample's reward is lowered by this times its similarity to another image's most similar sample in the
    # batch (0: off), against one generic caption for many photos (docs/quality.md)
    scst_diversity: float = 0.0
    # scst: weight of cross-entropy on a reference caption of each image, added to SCST's loss (Paulus et al. 2018's
    # mixed objective; 0: off; 0.1 did not help on 545 photos, docs/quality.md)
    scst_xe_weight: float = 0.0
    scst_temperature: float = 1.0  # scst: samples drawn from softmax(logits / this); < 1 keeps them near the beam's
    # xe: probability of the target spread over the other words (0: off; 0.1 measured best, docs/quality.md)
    label_smoothing: float = 0.1
    # exponential moving average of the trained weights (0: off): validation, best.pt and checkpoints' "model" hold the
    # average, training steps the raw weights; its decay warms up as min(this, (1 + n) / (10 + n)) over steps n
    ema_decay: float = 0.0
    # Where training's metrics go (LOGGERS): RUN_DIR/metrics.jsonl is always written (resume and `captioner plot`
    # read it); tensorboard adds RUN_DIR/tb/, mlflow an MLflow run (MLFLOW_TRACKING_URI, else RUN_DIR/mlflow.db),
    # wandb a Weights & Biases run (WANDB_MODE): the same scalars, sample captions; each behind its extra
    log_to: list[str] = field(default_factory=lambda: ["jsonl"])
    experiment: str = ""  # mlflow: experiment, wandb: project ("": the run dir's parent folder's name)
    register_as: str = ""  # mlflow: register the run's final model under this name in the model registry ("": not)


@dataclass
class DecodeConfig:
    beam_size: int = at_least(1, 3)  # beams of the beam search; 1 is greedy decoding
    max_len: int = at_least(1, 30)  # longest caption produced, in words
    length_penalty: float = 0.0  # 0 ranks beams by total log-probability; 1 by mean per word
    batch_size: int = at_least(1, 32)  # images per batch when captioning (evaluate, caption, validation)
    sample: bool = False  # draw each word from the model's distribution (varied captions) instead of greedy/beam
    temperature: float = 1.0  # sampling only: < 1 sharper (closer to greedy), > 1 more varied; see TEMPERATURES
    block_ngram: int = 0  # > 0: no caption repeats one of its n-grams of this length (greedy and beam; 0: off)
    # captions never hold <unk> (rare words): greedy, beam, sampling, SCST's samples; as self-critical.pytorch
    # (measured best, docs/quality.md; checkpoints from before keep false)
    suppress_unk: bool = True
    groups: int = at_least(1, 1)  # beam search in this many diverse groups (Vijayakumar 2018); beam_size a multiple
    diversity: float = 0.0  # diverse groups: log-probability penalty per earlier group that chose the same word
    top_k: int = at_least(0, 0)  # sampling only: draw from the k most likely words (0: off; 1: greedy)
    top_p: float = 1.0  # sampling only: draw from the fewest words whose probability reaches p (nucleus; 1.0: off)
    # captions returned per image, best first: the n best beams (n <= beam_size), or n samples with decode.sample
    num_return_sequences: int = at_least(1, 1)


@dataclass
class CacheConfig:
    dir: str = ""  # feature cache folder written by `captioner extract`; "" = DATASET_ROOT/features/ARCH-LAYER-SIZE
    dtype: str = "bfloat16"  # bfloat16 | float32; never float16: random-weight activations (~1e8) overflow it
    use: bool = True  # train and evaluate read features from the cache when it is valid and covers the split


# auto | true | false; YAML and overrides may also give a boolean (true/false, yes/no, on/off).
Switch = typing.Literal["auto", "true", "false"]


@dataclass
class ComputeConfig:
    # auto: on CUDA, and on CPUs with native bf16 units (AVX-512 BF16, AMX); see engine/runtime/compute.py
    bf16: Switch = "auto"  # bf16 autocast; weights, optimizer state, loss and checkpoints stay float32
    channels_last: Switch = "auto"  # the CNN in channels_last (NHWC) memory format
    compile: bool = False  # torch.compile the encoder: a slow first batch, then faster; for long runs
    gpu_decode: bool = False  # CUDA only: workers read JPEG bytes, the GPU decodes and resizes them in batches
    num_workers: int = 2  # image decoding processes of evaluate, extract and training's feature extraction
    encode_batch_size: int = at_least(1, 32)  # images per encoder batch when features are extracted (extract,
    # precompute)


@dataclass
class Config:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)


# Sampling temperatures that work: below 1e-4 the scaled float32 logits overflow (NaN probabilities), above 1e4
# every word is equally likely.
TEMPERATURES = (1e-4, 1e4)


LR_SCHEDULES = ("none", "cosine", "step", "plateau")


# What validation computes (coco-caption's scorers, as in evaluate; METEOR's java process is too slow per epoch).
SELECT_METRICS = ("cider", "bleu1", "bleu2", "bleu3", "bleu4", "rouge_l")


OBJECTIVES = ("xe", "scst")


LOGGERS = ("jsonl", "tensorboard", "mlflow", "wandb")


SCST_BASELINES = ("mean", "greedy")
