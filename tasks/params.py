"""One typed schema per stage: it validates ``params/NAME.yaml``, takes CLI overrides
(``-S finetune.epochs=3``), and is the form of the Prefect UI's run page (the flow's parameters).

An override is written back into ``params/NAME.yaml`` so DVC sees exactly what ran.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class StageParams(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestParams(StageParams):
    data_root: str | None = Field(None, description="Folder laid out as ROOT/DOMAIN/CLASS/IMAGE; empty = a built-in dataset")
    builtin: Literal["digits", "glyphs"] = Field(
        "digits", description="Built-in dataset when data_root is empty: digits (UCI scans, acquisition shifts) "
                              "or glyphs (letters in four typeface families and as line drawings, a style shift)")
    holdout_domains: list[str] = Field(["lowlight"], description="Domains kept out of training and model selection")
    val_fraction: float = Field(0.15, ge=0, lt=1, description="Per-domain validation share (model selection); "
                                                               "a file's split follows from its content hash")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="Per-domain test share (reported only)")
    gate_fraction: float = Field(0.1, ge=0, lt=1, description="Per-domain share the promotion gate scores on "
                                                               "(never trained on, selected on or reported as test)")
    seed: int = Field(0, description="Seed of the splits and of the built-in dataset")
    builtin_limit: int | None = Field(None, ge=40, description="Use only this many built-in digits (small runs)")
    unlabelled_root: str | None = Field(
        None, description="Folder of images without labels, laid out as ROOT/DOMAIN/IMAGE (deeper folders allowed): "
                          "copied into the workspace and seen only by the pretrain stage's self-supervised "
                          "pretraining (pretrain.enabled); empty = none")


# The validate stage's expectations, by the name that params/validate.yaml's ``severity`` uses.
VALIDATE_EXPECTATIONS = (
    "not_null_path", "not_null_domain", "not_null_label", "not_null_split", "not_null_sha256",
    "known_splits", "unique_path", "known_domains", "known_classes",
    "non_empty_file", "decodable", "extension_matches_content", "hash_matches_manifest",
    "colour_mode", "expected_channels", "min_width", "min_height", "max_side", "aspect_ratio",
    "unique_content", "disjoint_splits", "min_images_per_class", "pixel_drift_mean", "pixel_drift_std",
)
VALIDATE_SEVERITY = {
    "non_empty_file": "warning", "decodable": "warning", "extension_matches_content": "warning",
    "colour_mode": "warning", "expected_channels": "warning", "min_width": "warning", "min_height": "warning",
    "max_side": "warning", "aspect_ratio": "warning",
    "min_images_per_class": "warning",  # named in the log and the report; the images are kept
}


class ValidateParams(StageParams):
    min_side: int = Field(8, ge=1, description="Smallest accepted image width and height (pixels)")
    max_side: int | None = Field(None, ge=1, description="Largest accepted image width and height (pixels); empty = any")
    max_aspect_ratio: float = Field(4.0, ge=1, description="Largest accepted long side / short side of an image")
    allowed_modes: list[str] = Field(
        ["RGB", "L", "P", "RGBA", "LA", "PA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L", "I", "1"],
        description="Accepted PIL colour modes (every one of these is converted to RGB on load)")
    allowed_channels: list[int] = Field([1, 2, 3, 4], description="Accepted numbers of channels (bands) per image")
    min_images_per_class: int = Field(3, ge=0, description="Minimum images per (domain, class); 0 = no check")
    known_domains: list[str] | None = Field(
        None, description="Expected domains; empty = those of the last accepted profile (any on a first run)")
    known_classes: list[str] | None = Field(
        None, description="Expected classes; empty = those of the last accepted profile (any on a first run)")
    drift_check: bool = Field(True, description="Compare per-domain pixel statistics with the last accepted profile")
    drift_tolerance: float = Field(
        1.0, ge=0, description="Largest accepted shift of a domain's average per-image pixel mean/std, in units "
                               "of its spread across images in the accepted profile")
    drift_min_shift: float = Field(
        0.02, ge=0, le=1, description="A shift below this (pixel values in 0..1) is always accepted")
    profile: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Name of the accepted data profile in registry/data_profiles/; empty = one per data source "
                    "(the built-in dataset, or each ingest.data_root), so a new dataset starts a new profile")
    update_profile: bool = Field(True, description="Record the data as the new accepted profile when validation passes")
    workers: int = Field(0, ge=0, description="Processes that read and decode the images; 0 = every core")
    severity: dict[str, Literal["critical", "warning"]] = Field(
        dict(VALIDATE_SEVERITY),
        description="Severity per expectation name (default critical): warning = quarantine the rows that failed "
                    "(min_images_per_class: name the thin classes, keep their images)",
    )

    @field_validator("severity")
    @classmethod
    def _known_expectations(cls, v):
        unknown = sorted(set(v) - set(VALIDATE_EXPECTATIONS))
        if unknown:
            raise ValueError(f"unknown expectation(s) {unknown}; expectations: {list(VALIDATE_EXPECTATIONS)}")
        return v

    @field_validator("allowed_channels")
    @classmethod
    def _channels(cls, v):
        if not v or any(c < 1 or c > 4 for c in v):
            raise ValueError("give at least one number of channels, each 1 to 4")
        return v


class SynthesizeParams(StageParams):
    enabled: bool = Field(True, description="Generate synthetic training images for scarce domains")
    scarce_ratio: float = Field(0.5, gt=0, le=1, description="A domain is scarce below this share of the largest")
    target_per_class: int = Field(40, ge=0, description="Training images per (scarce domain, class) to reach")
    methods: list[Literal["fourier", "stats", "augment"]] | dict[Literal["fourier", "stats", "augment"], float] = Field(
        {"fourier": 0.5, "augment": 0.5},
        description="Generators and their share of each (domain, class) gap: a list (equal shares) or "
                    "{method: share}; fourier = amplitude-swap style transfer, stats = per-channel mean/std "
                    "matching, augment = augmentation policy fitted on the domain")
    beta: float = Field(0.05, gt=0, le=0.5, description="Fourier: low-frequency window swapped (share of side)")
    fourier_spectrum: bool = Field(
        True, description="Fourier: also match the target domain's radial amplitude spectrum (blur, noise floor)")
    augment_content: Literal["other", "same", "both"] = Field(
        "other", description="Augment: content from other seen domains, the scarce domain itself, or both")
    policy_jitter: float = Field(0.3, ge=0, description="Augment: noise around a sampled real image's statistics (x std)")
    max_rotation: float = Field(30.0, ge=0, le=45, description="Augment: cap on sampled rotations (degrees)")
    min_realism: float = Field(
        0.5, ge=0, le=1, description="Reject a batch when less of it is assigned to its target domain by the domain judge")
    min_agreement_ratio: float = Field(
        0.7, ge=0, le=1.5, description="Reject a batch whose label agreement is below this x the label judge's "
                                       "accuracy on real images of the target domain")
    seed: int = Field(0, description="Seed of the generators and judges")

    @field_validator("methods")
    @classmethod
    def _shares(cls, v):
        shares = {m: 1.0 for m in v} if isinstance(v, list) else v
        if not shares:
            raise ValueError("name at least one method")
        if any(w < 0 for w in shares.values()) or sum(shares.values()) <= 0:
            raise ValueError("method shares must be >= 0 with a positive total")
        return v

    def method_shares(self) -> dict[str, float]:
        """{method: share} with shares summing to 1 (methods with share 0 left out)."""
        shares = {m: 1.0 for m in self.methods} if isinstance(self.methods, list) else dict(self.methods)
        total = sum(shares.values())
        return {m: w / total for m, w in shares.items() if w > 0}


class PretrainParams(StageParams):
    enabled: bool = Field(True, description="Self-supervised pretraining (on top of backbone_weights when given: "
                                            "domain-adaptive continued pretraining); off = use the weights as they are")
    backbone: str = Field("resnet10t", description="Any timm model name")
    backbone_weights: str | None = Field(
        None, description="Starting weights: empty = random init; 'imagenet' = the ImageNet-1k weights installed "
                          "with a Python package, offline (backbone tf_efficientnet_lite0; or 'package:NAME'); a "
                          "file (safetensors, or a PyTorch state dict, e.g. models/pretrained/backbone.safetensors "
                          "of another run); or a timm pretrained tag of the backbone ('default', 'a1_in1k', ...; "
                          "downloaded to the Hugging Face cache)")
    image_size: Annotated[int, Field(ge=8)] | Literal["auto"] = Field(
        32, description="Side of the square images the model sees; auto = the input size of the starting "
                        "weights' pretrained_cfg (backbone_weights must carry one)")
    resize: Literal["auto", "bilinear", "bicubic"] = Field(
        "auto", description="Filter that resizes each image to image_size, in training and in the shipped model's "
                            "input contract; auto = the starting weights' pretrained_cfg interpolation (bicubic "
                            "for imagenet), else bilinear")
    input_norm: Literal["auto", "image", "pretrained", "none"] = Field(
        "auto", description="What the backbone sees: image = per-image standardization; pretrained = the mean/std "
                            "of timm's pretrained_cfg; none; auto = pretrained when backbone_weights come with a "
                            "pretrained_cfg (a timm tag, or a file whose config.json records one), else image")
    epochs: int = Field(5, ge=0, description="Self-supervised epochs over every training image (0 = none)")
    batch_size: int = Field(128, ge=4, description="Images per contrastive step (two views each)")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate of self-supervised pretraining")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay of self-supervised pretraining")
    temperature: float = Field(0.2, gt=0, description="Temperature of the contrastive (InfoNCE) loss")
    include_holdout_unlabelled: bool = Field(False, description="Domain adaptation: also see held-out images")
    fourier_mix_prob: float = Field(
        0.5, ge=0, le=1, description="Domain-aware view: share of images whose Fourier amplitude is mixed with an "
                                     "image of another domain (0 = off)")
    fourier_mix_strength: float = Field(0.8, ge=0, le=1, description="Largest amplitude-mixing weight (uniform draw)")
    linear_probe: bool = Field(True, description="Report per-domain linear-probe accuracy before and after pretraining")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where SimCLR and the probe's features run: auto = cuda when available, else cpu")
    threads: int = Field(2, ge=1, description="Torch threads of pretraining")
    seed: int = Field(0, description="Seed of pretraining (initialisation, views, batches)")


class FinetuneParams(StageParams):
    method: str = Field(
        "multidomain+randconv+linedraw+swad", description="Domain-generalization method from the registry "
                                   "(mdcore.methods): erm, multidomain, randconv, linedraw, mixstyle, swad, or several "
                                   "joined by + (e.g. multidomain+randconv+linedraw+swad)")
    method_hparams: dict[str, float | int | bool | list[int]] = Field(
        {}, description="Hyper-parameters of the method's components (e.g. randconv_p: 0.5); unknown keys are errors")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (1 x 2 CPUs measured faster than 2 x 1 on 2 cores)")
    cpus_per_worker: float = Field(2, gt=0, description="CPUs reserved per worker (also its torch threads)")
    use_gpu: bool = Field(False, description="One GPU per worker")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts from the last checkpoint")
    domain_mix: Literal["natural", "uniform"] | dict[str, float] = Field(
        "uniform", description="Per-domain share of every global batch: natural, uniform, or {domain: weight}")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Autocast dtype (bf16 on CPU or GPU)")
    channels_last: bool = Field(False, description="channels-last memory format for model and inputs")
    compile: bool = Field(False, description="torch.compile the model (slow first epoch)")
    loader: Literal["memory", "stream"] = Field(
        "memory", description="memory: every worker decodes its images once, up front (fastest while they fit); "
                              "stream: decode on demand, memory per worker flat as the dataset grows")
    loader_workers: int = Field(2, ge=0, description="stream: DataLoader processes decoding the next batches")
    decoded_cache: bool = Field(False, description="stream: keep decoded images on disk (~/.cache/mdpipe/decoded, "
                                                   "or MDPIPE_DECODED_CACHE) for later epochs and runs")
    input_norm: Literal["auto", "image", "pretrained", "none"] = Field(
        "auto", description="What the backbone sees: image = per-image standardization; pretrained = the mean/std "
                            "of timm's pretrained_cfg (stored in the model config: evaluate and the ONNX export "
                            "apply it too); none; auto = pretrained when the starting weights come with a "
                            "pretrained_cfg, else the method's own choice")
    epochs: int = Field(15, ge=1, description="Fine-tuning epochs (the most; early stopping may end sooner)")
    batch_size: int = Field(64, ge=2, description="Global batch (split across workers)")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate (AdamW, cosine schedule with warmup)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on norms, biases, per-domain scales)")
    layer_decay: float | None = Field(None, gt=0, le=1, description="timm layer-wise lr decay; empty = off")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the cross-entropy")
    adapters: bool = Field(True, description="Per-domain residual adapters")
    adapter_dim: int = Field(64, ge=1, description="Hidden width of each per-domain bottleneck adapter")
    # per-domain components (see mdcore.models.model.ModelConfig)
    stage_adapters: list[int] = Field(
        [], description="Per-domain 1x1-conv adapters inside the backbone, at these timm feature_info indices "
                        "(e.g. [-3, -2]); empty = off")
    stage_adapter_dim: int = Field(16, ge=1, description="Hidden width of the stage adapters")
    domain_bn: bool = Field(True, description="Per-domain batch-norm statistics and affine (batch-norm backbones)")
    head: Literal["linear", "moe"] = Field("linear", description="Classifier: linear, or mixture of experts "
                                                                 "gated by features + domain embedding")
    moe_experts: int = Field(4, ge=1, description="Experts of the moe head")
    moe_balance_weight: float = Field(0.01, ge=0, description="Weight of the moe load-balancing loss")
    supcon_weight: float = Field(0.0, ge=0, description="Supervised contrastive loss across domains, through "
                                                        "per-domain projection heads; 0 = off")
    supcon_temperature: float = Field(0.1, gt=0, description="Temperature of the supervised contrastive loss")
    proj_dim: int = Field(64, ge=1, description="Output size of the per-domain projection heads")
    align: Literal["none", "coral", "mmd"] = Field("none", description="Feature alignment penalty between domains")
    align_weight: float = Field(0.0, ge=0, description="Weight of the alignment penalty")
    # transfer-learning controls
    adapters_only: bool = Field(False, description="Freeze the whole shared backbone; train per-domain parts + head")
    freeze_stages: int = Field(0, ge=0, description="Freeze this many timm coarse groups from the input "
                                                    "(1 = stem, 2 = stem + first stage, ...)")
    gradual_unfreeze_every: int = Field(0, ge=0, description="Gradual unfreezing: start with the backbone frozen, "
                                                             "unfreeze one group from the top every N epochs; 0 = off")
    lr_cycles: int = Field(1, ge=1, description="Cosine schedule cycles (warm restarts when > 1)")
    lr_cycle_mul: float = Field(1.0, gt=0, description="Each cycle is this many times longer than the last")
    lr_cycle_decay: float = Field(1.0, gt=0, le=1, description="Peak lr of each new cycle x this")
    domain_weighting: Literal["uniform", "inverse_frequency", "groupdro"] = Field(
        "uniform", description="Per-domain loss weights: uniform, inverse training frequency, or GroupDRO")
    groupdro_eta: float = Field(0.1, gt=0, description="GroupDRO step size of the domain weights")
    class_balance: Literal["none", "reweight", "logit_adjust"] = Field(
        "none", description="Class-balanced loss from each training domain's class counts: reweight = inverse class "
                            "frequency weights on the cross-entropy; logit_adjust = log class prior added to the "
                            "logits in training only; none = plain (evaluate reports the imbalance per domain)")
    curriculum: Literal["none", "easy_first"] = Field(
        "none", description="Domain curriculum: easy_first favours low-loss domains, fading to even weights")
    curriculum_epochs: int = Field(5, ge=1, description="Epochs over which the curriculum fades out")
    early_stopping_patience: int = Field(0, ge=0, description="Stop after this many epochs without a better "
                                                              "training-domain val accuracy; 0 = off")
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest val accuracy gain that counts")
    use_synthetic: bool = Field(True, description="Train on synthetic rows too")
    init_from_pretrain: bool = Field(True, description="Start from the pretrain stage's backbone")
    seed: int = Field(0, description="Seed of fine-tuning (initialisation, batches, augmentations)")


    @field_validator("method")
    @classmethod
    def _known_method(cls, v):
        from mdcore.methods import method_class

        method_class(v)  # unknown names raise, listing the known ones
        return v

    @model_validator(mode="after")
    def _known_method_hparams(self):
        from mdcore.methods import create_method

        create_method(self.method, self.method_hparams)  # unknown hyper-parameters raise, naming the known ones
        return self


class EvaluateParams(StageParams):
    batch_size: int = Field(256, ge=1, description="Images per scoring batch")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model scores: auto = cuda when available, else cpu")
    target_precision: float = Field(
        0.95, gt=0, le=1, description="Selective prediction: per domain, the calibrated confidence under which "
                                      "the model abstains is the one whose answered images reach this precision "
                                      "(chosen on validation, reported on test and held-out domains)")
    ece_bins: int = Field(15, ge=2, description="Equal-width confidence bins of ECE and the reliability diagrams")
    cam_images: int = Field(
        6, ge=0, description="Grad-CAM sheets: per domain, up to this many correct and this many wrong predictions "
                             "(a seeded sample); 0 = off")
    seed: int = Field(0, description="Seed of the Grad-CAM sample")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "label_issues_folds" in data:
            raise ValueError("label_issues_folds moved to params/label_issues.yaml as `folds` (label issues are "
                             "now a stage of their own, after pretrain)")
        return data


class LabelIssuesParams(StageParams):
    folds: int = Field(
        5, ge=0, description="Out-of-fold folds of the logistic regression on the pretrain stage's label-free "
                             "backbone features of the real training rows, judged by cleanlab (a warning and "
                             "reports/label_issues/label_issues.csv; nothing is removed); 0 = off")
    seed: int = Field(0, description="Seed of the folds")
    batch_size: int = Field(256, ge=1, description="Images per feature batch")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the features are computed: auto = cuda when available, else cpu")

    @field_validator("folds")
    @classmethod
    def _folds(cls, v):
        if v == 1:
            raise ValueError("folds: 0 (off) or at least 2")
        return v


class CompressParams(StageParams):
    quantize: Literal["int8", "none"] = Field("int8", description="int8: post-training static quantization of each variant with ONNX Runtime; none = fp32 ONNX only")
    quant_format: Literal["qoperator", "qdq"] = Field("qoperator", description="ONNX Runtime quantized format (qoperator measured faster here, BENCHMARKS.md)")
    quant_ops: list[str] = Field(default_factory=lambda: ["Conv", "Gemm", "Clip"], description="ONNX op types to quantize (others stay fp32; MatMul would quantize domain batch-norm's statistics tables; Clip is ReLU6, which folds into the convolution before it)")
    quant_fp32_convs: int = Field(3, ge=0, description="Keep the first N convolutions (the stem) in fp32: the largest int8 error on this data")
    quant_reduce_range: bool = Field(False, description="7-bit int8 weights, ONNX Runtime's documented remedy for x86 CPUs without VNNI (on them, such as AVX2-only ones, full-range weights saturate ONNX Runtime's int8 kernels); off: trained models lost nothing measurable to it on validation (BENCHMARKS.md)")
    calibration_images: int = Field(512, ge=1, description="Seen-domain training images for int8 calibration (balanced over domains)")
    prune_ratio: float = Field(0.3, ge=0, lt=1, description="Structured pruning: share of channels removed from every prunable group (Torch-Pruning); 0 = no pruned variant")
    recovery_epochs: int = Field(15, ge=0, description="Distilled recovery fine-tune of the pruned model (epochs)")
    student_backbone: str | None = Field(None, description="timm backbone of the distilled student (random init); empty = no student variant")
    student_epochs: int = Field(20, ge=1, description="Distillation epochs of the student")
    distill_lr: float = Field(5e-4, gt=0, description="AdamW learning rate of recovery and student distillation (chosen on the acceptance split, BENCHMARKS.md)")
    distill_batch_size: int = Field(128, ge=2, description="Distillation: images per step")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the distillation loss (plus cross-entropy)")
    kd_temperature: float = Field(4.0, gt=0, description="Distillation: softmax temperature of teacher and student")
    max_drop: float = Field(0.01, ge=0, le=1, description="Reject a variant whose worst seen domain (val + gate split) drops more than this vs fp32")
    ship_by: Literal["size", "latency"] = Field("size", description="Which accepted variant ships: the smallest file, or the fastest at batch 1")
    ship_from: list[Literal["fp32", "int8", "pruned", "pruned+int8", "student", "student+int8"]] = Field(
        default_factory=lambda: ["fp32", "int8"], min_length=1,
        description="Variants allowed to ship (the others are built, scored and reported only); pruned and student "
                    "variants lose accuracy on held-out domains (BENCHMARKS.md), which the seen-domain acceptance "
                    "rule does not see, so they ship only when listed here")
    threads: int = Field(2, ge=1, description="Threads of every latency measurement (torch and ONNX Runtime)")
    latency_repeats: int = Field(30, ge=3, description="Timed calls at batch 1 (a third of them at batch 64), after warm-up, split over 3 rounds that take the variants in turn")
    corruption_images: int = Field(200, ge=1, description="Seen test images scored under the 15 corruptions (seeded draw)")
    batch_size: int = Field(256, ge=1, description="Images per scoring batch")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where distillation (pruned recovery, student) trains: auto = cuda when available, else cpu; export, int8 quantization, scoring and latency stay on CPU (ONNX Runtime CPU, the deployed runtime)")
    seed: int = Field(0, description="Seed of pruning recovery and distillation")


class ContinualParams(StageParams):
    """Continual learning (``mdpipe retrain`` warm start, ``mdpipe experiment continual``): not a DVC stage,
    its state (the champion) lives in the registry."""

    warm_start: bool = Field(True, description="Retrain fine-tunes the champion on the new training images plus a "
                                               "replay buffer of past ones (new domains get parts copied from the "
                                               "nearest known domain); off = rerun the whole pipeline from scratch")
    epochs: int = Field(3, ge=1, description="Warm start: epochs over the new images (each batch topped up with replay)")
    lr: float = Field(5e-4, gt=0, description="Warm start: learning rate (one for all layers; chosen on the gate "
                                               "split, BENCHMARKS.md)")
    warmup_epochs: int = Field(0, ge=0, description="Warm start: epochs at 0.1 x lr before the cosine schedule "
                                                     "(the champion is already trained; 0 = none)")
    batch_size: int = Field(32, ge=2, description="Warm start: images per step, replay included")
    replay_fraction: float = Field(0.05, ge=0, le=1, description="Share of past training images kept for replay")
    replay_max_images: int | None = Field(None, ge=0, description="Cap on the replay buffer; empty = no cap")
    replay_strategy: Literal["random", "reservoir", "hardest"] = Field(
        "reservoir", description="random: uniform over past images; reservoir: per-domain reservoir, equal share "
                                 "per domain; hardest: per domain, the highest loss under the champion")
    replay_per_batch: int = Field(8, ge=0, description="Replay images in every batch (drawn from the buffer)")
    replay_kd_weight: float = Field(0.0, ge=0, description="Warm start: distil the champion's own answers on the "
                                                           "replayed images (dark experience replay); 0 = off")
    new_domain: Literal["joint", "parts"] = Field(
        "parts", description="Warm start when only new domains arrive: joint = every weight learns (new images + "
                             "replay); parts = only the new domains' own parts learn (normalization, adapters, stage "
                             "adapters), so the known domains compute exactly as before and pass the gate")
    parts_lr: float = Field(1e-2, gt=0, description="Warm start, new_domain: parts: learning rate of the new "
                                                     "domains' parts (chosen on validation, BENCHMARKS.md)")
    parts_epochs: int = Field(4, ge=1, description="Warm start, new_domain: parts: epochs over the new domains' "
                                                   "images")
    full_retrain_after_parts: int | None = Field(
        3, ge=1, description="After this many champions in a row made by parts steps, retrain runs the whole "
                             "pipeline instead, so the shared backbone learns the added domains (a policy, not "
                             "tuned); empty = never")
    few_shot_k: int = Field(10, ge=1, description="Few-shot adaptation: labelled images per class of a new domain")
    few_shot_epochs: int = Field(20, ge=1, description="Few-shot adaptation: epochs over the k-per-class images")
    threads: int = Field(1, ge=1, description="Torch threads of the in-process warm start")
    max_class_recall_drop: float | None = Field(
        0.3, ge=0, le=1, description="Promotion gate: also refuse a challenger whose worst-class recall (gate "
                                     "split) falls by more than this in any domain; empty = off. 0.3: on the "
                                     "built-in data a (domain, class) has about 5 gate images, so one image moves "
                                     "a recall by 0.2; 0.3 lets one image flip and refuses a class that collapses")
    seed: int = Field(0, description="Seed of the warm start")


# parameter files of flows that are not DVC stages (validated and loaded the same way)
FLOW_SCHEMAS: dict[str, type[StageParams]] = {"continual": ContinualParams}

SCHEMAS: dict[str, type[StageParams]] = {
    "ingest": IngestParams,
    "validate": ValidateParams,
    "synthesize": SynthesizeParams,
    "pretrain": PretrainParams,
    "label_issues": LabelIssuesParams,
    "finetune": FinetuneParams,
    "evaluate": EvaluateParams,
    "compress": CompressParams,
}


class ParamsError(ValueError):
    """A params file or override is wrong; the message names the file and the field."""


def _explain(error: ValidationError, where: str) -> str:
    lines = [f"{where}: invalid parameters"]
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(file)"
        lines.append(f"  - {field}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def validate_params(stage: str, data: dict, where: str) -> StageParams:
    schema = SCHEMAS.get(stage) or FLOW_SCHEMAS.get(stage)
    if schema is None:
        raise ParamsError(f"unknown stage {stage!r}; stages: {list(SCHEMAS)}, flows: {list(FLOW_SCHEMAS)}")
    try:
        return schema.model_validate(data or {})
    except ValidationError as e:
        raise ParamsError(_explain(e, where)) from None


def load_params(stage: str, params_dir: str | Path) -> StageParams:
    file = Path(params_dir) / f"{stage}.yaml"
    if not file.is_file():
        raise ParamsError(f"{file}: missing params file of stage {stage!r}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{file}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{file}: expected a mapping of parameters, got {type(data).__name__}")
    return validate_params(stage, data, str(file))


def override_key(item: str, default_stage: str | None = None) -> tuple[str, str, str]:
    """(stage, dotted field, value text) of one override, in the one syntax every door takes:
    ``STAGE.FIELD=VALUE`` or DVC's ``params/STAGE.yaml:FIELD=VALUE`` (``STAGE.yaml:FIELD=VALUE``); where a
    command works on one stage (``mdpipe stage finetune``, the experiments), ``FIELD=VALUE`` means that stage."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ParamsError(f"override {item!r}: expected STAGE.FIELD=VALUE, e.g. finetune.epochs=3")
    if ":" in key:  # DVC's file:key form
        file, _, field = key.partition(":")
        stage = Path(file).name.removesuffix(".yaml").removesuffix(".yml")
        if Path(file).suffix not in (".yaml", ".yml") or stage not in SCHEMAS:
            raise ParamsError(f"override {item!r}: {file!r} is not a params file; files: "
                              f"{[f'params/{s}.yaml' for s in SCHEMAS]}")
    else:
        stage, dot, field = key.partition(".")
        if stage not in SCHEMAS and default_stage is not None:
            stage, field = default_stage, key
        elif not dot:
            raise ParamsError(f"override {item!r}: expected STAGE.FIELD=VALUE, e.g. finetune.epochs=3")
    if stage not in SCHEMAS:
        raise ParamsError(f"override {item!r}: unknown stage {stage!r}; stages: {list(SCHEMAS)}")
    if not field or any(not part for part in field.split(".")):
        raise ParamsError(f"override {item!r}: expected STAGE.FIELD=VALUE, e.g. finetune.epochs=3")
    if default_stage is not None and stage != default_stage:
        raise ParamsError(f"override {item!r}: this command sets {default_stage} params only "
                          f"({default_stage}.FIELD=VALUE)")
    return stage, field, value


def parse_overrides(items: list[str], default_stage: str | None = None) -> dict[str, dict]:
    """``["finetune.epochs=3", "params/validate.yaml:severity.min_images_per_class=warning"]`` ->
    ``{"finetune": {"epochs": 3}, "validate": {"severity": {"min_images_per_class": "warning"}}}``
    (values parsed as YAML; a dotted field reaches into a nested mapping). ``default_stage``: the only stage
    the command sets, which bare ``FIELD=VALUE`` items then name (see :func:`override_key`)."""
    out: dict[str, dict] = {}
    for item in items:
        stage, field, value = override_key(item, default_stage)
        *parents, leaf = field.split(".")
        here = out.setdefault(stage, {})
        for part in parents:
            here = here.setdefault(part, {})
            if not isinstance(here, dict):
                raise ParamsError(f"override {item!r}: {part!r} is set to a value and also used as a mapping")
        here[leaf] = yaml.safe_load(value) if value.strip() else None
    return out


PROFILES = "profiles"  # params/profiles/NAME.yaml: named sets of overrides, {stage: {field: value}}


def load_profile(params_dir: str | Path, name: str) -> dict[str, dict]:
    """The overrides of profile ``name`` (``params/profiles/NAME.yaml``, or a path to such a file), e.g. the
    demo's faster profile. Checked here for shape; each stage's values are validated with the run."""
    folder = Path(params_dir) / PROFILES
    file = Path(name) if name.endswith((".yaml", ".yml")) else folder / f"{name}.yaml"
    if not file.is_file():
        known = sorted(f.stem for f in folder.glob("*.yaml"))
        raise ParamsError(f"profile {name!r}: no file {file}; profiles: {known}")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{file}: a profile is a mapping of stage: {{field: value}}")
    for stage, fields in data.items():
        if stage not in SCHEMAS:
            raise ParamsError(f"{file}: unknown stage {stage!r}; stages: {list(SCHEMAS)}")
        if not isinstance(fields, dict):
            raise ParamsError(f"{file}: {stage}: expected a mapping of field: value")
    return data


def with_profile(params_dir: str | Path, profile: str | None, overrides: dict[str, dict]) -> dict[str, dict]:
    """A run's overrides: the profile's values (if one is named), with ``overrides`` (``-S``, a test's own
    values) laid over them."""
    layered = load_profile(params_dir, profile) if profile else {}
    for stage, fields in overrides.items():
        layered[stage] = merge_fields(layered.get(stage, {}), fields)
    return layered


def merge_fields(current: dict, fields: dict) -> dict:
    """``current`` with ``fields`` laid over it; nested mappings merge key by key (one nested override
    keeps the mapping's other keys)."""
    merged = dict(current)
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_fields(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_params(stage: str, params: StageParams, params_dir: str | Path) -> bool:
    """Write ``params`` into ``params/STAGE.yaml``, keeping its comments; returns whether anything changed."""
    from ruamel.yaml import YAML

    from mdcore.data.io import atomic_write_text

    file = Path(params_dir) / f"{stage}.yaml"
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(file.read_text()) if file.is_file() else None
    if doc is None:
        from ruamel.yaml.comments import CommentedMap

        doc = CommentedMap()
    new = params.model_dump(mode="json")
    changed = False
    for key, value in new.items():
        if key not in doc or doc[key] != value:
            doc[key] = value
            changed = True
    for key in [k for k in doc if k not in new]:
        del doc[key]
        changed = True
    if changed:
        import io

        buf = io.StringIO()
        rt.dump(doc, buf)
        atomic_write_text(file, buf.getvalue())
    return changed


def merged_params(params_dir: str | Path, overrides: dict[str, dict]) -> dict[str, StageParams]:
    """Each overridden stage's params file with its overrides laid over it, validated; nothing is written."""
    return {stage: validate_params(stage, merge_fields(load_params(stage, params_dir).model_dump(), fields),
                                   f"override of params/{stage}.yaml")
            for stage, fields in overrides.items()}


def apply_overrides(params_dir: str | Path, overrides: dict[str, dict]) -> dict[str, StageParams]:
    """Validate every override against its stage's schema, then (all valid) write them where DVC sees them."""
    updated = merged_params(params_dir, overrides)
    for stage, merged in updated.items():
        write_params(stage, merged, params_dir)
    return updated


@contextmanager
def params_kept_on_failure(params_dir: str | Path, log=None):
    """Inside: params files may be rewritten (a run's overrides, so DVC sees what ran). A failure or an
    interrupt inside puts every ``params/*.yaml`` back byte for byte: a run that did not finish never
    leaves its settings behind for the next plain ``mdpipe run``."""
    from mdcore.data.io import atomic_write_bytes

    files = {f: f.read_bytes() for f in sorted(Path(params_dir).glob("*.yaml"))}
    try:
        yield
    except BaseException:
        restored = []
        for f, data in files.items():
            if not f.is_file() or f.read_bytes() != data:
                atomic_write_bytes(f, data)
                restored.append(f.name)
        if restored and log is not None:
            log(f"the run did not finish: params files {restored} put back as they were before it")
        raise
