"""Typed run configuration: dataclasses, YAML loading, dotted overrides, strict validation.

A config is built from defaults, then one YAML file, then ``key=value`` overrides whose values are
read as YAML (``train.global_batch=4096``, ``data.train_urls=[a.tar,b.tar]``). Every key is
checked against the dataclasses; every value is coerced to the field's type or rejected. Errors
name the key, the value, what was expected and where the value came from, and they happen before
any worker starts. ``deepspeed`` is the one free-form section: its keys pass through to DeepSpeed.

This module imports no stage: the names a stage resolves (losses, models) are checked by that stage,
which registers its check (`register_check`) when imported. The CLI and every worker import the
stages, so their checks always run there; a script that imports only this module checks the schema.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import fsspec
import yaml

from pipeline.layout import TOWERS

DEFAULTS = "defaults"
COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A config value that cannot be used; the message says which, why and where it came from."""


# --------------------------------------------------------------------------------------- sections
@dataclass
class SynthConfig:
    """What `contrast run` synthesises when `data.train_urls` has no shards yet."""
    samples: int = 0                       # 0: never synthesise
    eval_samples: int = 1000               # per evaluation set
    image_size: int = 64               # side of the synthesised images, pixels
    shard_size: int = 1000             # samples per synthesised shard
    seed: int = 0                      # seed of the synthesised data (not of the run)
    captions: int = 1                  # phrasings per training sample, one a line (several: data.captions_per_image)


@dataclass
class SourceConfig:
    """One source of a mixture (`data.sources`): its shards, its share of every batch, how it ends."""
    name: str = ""                         # names its scalars (data/<name>/...) and its position in the state
    # its shards: URLs, brace patterns, dataset folders or manifest.json files
    urls: list[str] = field(default_factory=list)
    weight: float = 1.0                    # share of every global batch: weight / sum of the weights
    resampled: Optional[bool] = None       # None: data.resampled
    on_end: Literal["restart", "stop"] = "restart"   # after an epoch: the next one, or the data stream ends


@dataclass
class DataConfig:
    # the one-source case (named train): shard URLs, patterns, folders, manifests
    train_urls: list[str] = field(default_factory=list)
    sources: list[SourceConfig] = field(default_factory=list)   # a weighted mixture, instead of train_urls
    eval_dir: Optional[str] = None         # folder of evaluation sets (classnames.txt, templates, shards)
    image_size: int = 64                   # model input side, pixels
    context_length: int = 77           # text tokens per caption, end token included
    tokenizer: Optional[str] = None        # tokenizer.json URL; default: the one beside the manifest
    num_workers: int = 0                   # loader processes per rank
    shuffle_buffer: int = 1000         # samples each virtual stream shuffles among
    streams: int = 0                       # virtual streams S (0: from global_batch); W must divide S, S divide G
    resampled: bool = False                # stream without epochs
    max_bad_fraction: float = 0.01     # over this fraction of bad samples read, the run stops
    allow_pipe: bool = False               # allow `pipe:` URLs (they run shell commands)
    format: Literal["image_text", "text_pairs"] = "image_text"   # text_pairs: KEY.query.txt, KEY.pos.txt, KEY.neg.json
    hard_negatives: int = 0                # text pairs: hard negatives per row in each batch (k)
    # image-caption: captions per row (k lines of KEY.txt or the JSON's "captions"; fewer: repeated); k > 1: polyview
    captions_per_image: int = 1
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class TowerConfig:
    hf_path: Optional[str] = None          # local Hugging Face model directory for a pretrained tower
    lock: bool = False                     # freeze the tower (LiT)
    unlock_last: int = 0                   # with lock: train the last n blocks
    pool: Optional[Literal["mean", "cls", "last"]] = None   # hf_path towers; None: mean (text), cls (image)
    patch_dropout: float = 0.0             # image only: training drops this fraction of the patches (FLIP)


@dataclass
class ModelConfig:
    # tiny, small, ViT-B-32, ViT-B-16, ViT-L-14 (the built-in dual encoders), or text: the text–text dual encoder
    # of model.text.hf_path
    name: str = "tiny"
    dropout: float = 0.0               # dropout probability in the towers' blocks (training only)
    grad_checkpointing: bool = False   # recompute the blocks' activations in backward (memory for time)
    shared_tower: bool = True              # text model: one encoder for queries and passages (false: two)
    projection_dim: int = 0                # text model: project the pooled state to this size (0: no projection)
    image: TowerConfig = field(default_factory=TowerConfig)
    text: TowerConfig = field(default_factory=TowerConfig)
    # Start from a checkpoint (docs: Models, "Start from a pretrained model"): an open_clip folder or epoch_N.pt,
    # a Hugging Face CLIPModel/SiglipModel folder, or a published checkpoint; its architecture, not `name`'s.
    init_from: Optional[str] = None
    init_from_config: Optional[str] = None  # an open_clip checkpoint file's model config: a name or a JSON
    init_towers: list[str] = field(default_factory=lambda: list(TOWERS))   # the towers taken from init_from

    def tower(self, name: str) -> TowerConfig:
        if name not in TOWERS:
            raise ValueError(f"unknown tower {name!r}; expected one of {TOWERS}")
        return getattr(self, name)

    def frozen_towers(self) -> list[str]:
        """The towers locked whole (``lock`` with no ``unlock_last``): they run without a graph."""
        return [t for t in TOWERS if self.tower(t).lock and not self.tower(t).unlock_last]


def _hyper(default: Any = None) -> Any:
    """A loss hyper-parameter field: passed to `get_loss` when set (None: the loss's own default)."""
    return field(default=default, metadata={"hyper": True})


@dataclass
class MixNegativesConfig:
    """mochi's hard-negative mixing (docs/losses-family-ii.md); a key left at None takes the loss default."""
    n: Optional[int] = None                # the n hardest gathered negatives of each anchor it mixes (default 16)
    s: Optional[int] = None                # synthetic negatives mixed from two of them, per anchor (default 16)
    s_prime: Optional[int] = None          # synthetic negatives mixed from the anchor and one of them (default 8)


@dataclass
class TemperaturesConfig:
    """isogclr's individualized temperatures (docs/losses-family-ii.md); a key left at None takes the loss default
    (the paper's code's bimodal run)."""
    gamma: Optional[float] = None          # γ of the per-sample moving average u of the inner function (0.8)
    rho: Optional[float] = None            # ρ, the KL-DRO radius: larger ρ, larger temperatures (8)
    tau_init: Optional[float] = None       # every sample's first temperature (0.07; the paper's 0.01)
    eta: Optional[float] = None            # η, the temperatures' step size (0.03)
    beta_u: Optional[float] = None         # β of the temperatures' gradient momentum (0.9)
    tau_min: Optional[float] = None        # the temperatures' lower bound (0.005)
    tau_max: Optional[float] = None        # their upper bound (1.0)
    grad_clip: Optional[float] = None      # the temperature gradient is clipped to ±grad_clip (5)


@dataclass
class LossConfig:
    """The loss and its hyper-parameters (LOSSES.md); a hyper left at None takes the loss default."""
    # clip, siglip, supcon, tcl, dcl, dclw, hcl, cwcl, clip_gap; family II (docs/losses-family-ii.md): cacr, mochi,
    # polyview (several captions per image: data.captions_per_image), isogclr (a temperature per sample)
    name: str = "clip"
    tiled: bool = False                # compute the loss in column tiles (memory O(local rows × tile))
    tile_size: int = 1024              # tiled: at most tile_size² pairs a tile (narrower with many rows)
    init_temperature: Optional[float] = None   # None: the loss family's default
    learn_temperature: bool = True     # false: the logit scale stays at its initial value
    k1: Optional[float] = _hyper()             # tcl: weight k1 of the positives' exp(−z·z⁺) term (default 5000)
    k2: Optional[float] = _hyper()             # tcl: weight k2 of the negatives in the denominator (default 1)
    sigma: Optional[float] = _hyper()          # dclw: temperature σ of the positive weights (default 0.5)
    beta: Optional[float] = _hyper()           # hcl: hardness β of the negatives' weights (default 1)
    tau_plus: Optional[float] = _hyper()       # hcl: class prior τ⁺ of the debiasing (default 0.1)
    cross_uniformity: Optional[bool] = _hyper()  # clip_gap: add the cross-modal uniformity term (default false)
    symmetric: Optional[bool] = _hyper()       # clip: false keeps only query→passage (image→text)
    matryoshka_dims: list[int] = field(default_factory=list)   # e.g. [384, 128, 64]: loss summed over truncations
    duplicates: Literal["mask", "off"] = "mask"  # mask: pairs with identical captions are not each other's negatives
    mix_negatives: MixNegativesConfig = field(default_factory=MixNegativesConfig)  # mochi: {n, s, s_prime}
    temperatures: TemperaturesConfig = field(default_factory=TemperaturesConfig)  # isogclr: {gamma, rho, eta, ...}
    caption_weight: float = 2.0            # CoCa models: weight of the captioning token cross-entropy (CoCa's 2.0)
    caption_label_smoothing: float = 0.0   # CoCa models: label smoothing of that cross-entropy

    def hyper(self) -> dict[str, Any]:
        """The hyper-parameters explicitly set, as keyword arguments for `get_loss` (mix_negatives' and
        temperatures' keys too: a loss other than mochi, or isogclr, then refuses them by name)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.metadata.get("hyper") and getattr(self, f.name) is not None}
        for group in (self.mix_negatives, self.temperatures):
            out.update({f.name: getattr(group, f.name) for f in dataclasses.fields(group)
                        if getattr(group, f.name) is not None})
        return out


@dataclass
class TrainConfig:
    steps: int = 100                   # optimizer steps of the whole run (a resume continues to it)
    global_batch: int = 256            # pairs per optimizer step over all workers: every row a negative of every other
    lr: float = 5e-4                   # peak learning rate, after the linear warm-up
    min_lr: float = 0.0                # where the cosine ends
    warmup_steps: int = 10             # steps of linear warm-up from 0 to lr
    weight_decay: float = 0.2          # AdamW decoupled weight decay (not on norms, biases, embeddings, logit scale)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW's β1, β2
    eps: float = 1e-6                  # AdamW's ε
    grad_clip: float = 1.0                 # 0 disables clipping
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 where the hardware has it
    # auto: continue from the newest complete checkpoint; never: refuse a run_dir with one
    resume: Literal["auto", "never"] = "auto"
    allow_loss_change: bool = False        # resume a run under another loss.name on purpose
    log_every: int = 10                # steps between console lines, progress.json and TensorBoard scalars
    compile: bool = False                  # torch.compile the towers (inductor; on CPU it needs a C++ compiler)


@dataclass
class GradCacheConfig:
    chunk_size: int = 0                    # 0: no gradient cache (one plain backward per step)
    text_chunk_size: int = 0               # 0: same as chunk_size


@dataclass
class ClusterConfig:
    address: Optional[str] = None          # Ray address; None starts a local Ray
    num_workers: int | list[int] = 1       # a count, or [min, max]: as many as the cluster offers (elastic)
    use_gpu: bool = False              # one GPU (gpus_per_worker) per worker, NCCL; false: CPU and gloo
    cpus_per_worker: float = 1.0       # CPUs Ray reserves per worker (loader processes need one each)
    gpus_per_worker: float = 1.0       # GPUs Ray reserves per worker with use_gpu
    # Ray placement group strategy of the workers
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # worker-group restarts (from the newest checkpoint) before the run fails; -1: no limit
    max_failures: int = 0
    auth: Literal["token", "disabled"] = "token"   # Ray's token authentication (docs: Security)
    collective_timeout_s: float = 600.0    # a collective waiting longer fails the step, naming it (no hang)
    lease_ttl_s: float = 60.0              # a run_dir lease not renewed for this long is taken to be abandoned

    @property
    def elastic(self) -> bool:
        """True when `num_workers` is a range [min, max]."""
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if self.elastic else self.num_workers


@dataclass
class CheckpointConfig:
    every_steps: int = 50              # steps between resume checkpoints (each also published)
    keep: int = 2                          # resume checkpoints kept; published ones are all kept
    publish_initial: bool = False          # publish the starting weights as step 0 (evaluate the "before")
    grace_s: float = 60.0                  # on SIGTERM/SIGINT: time to checkpoint at the next step before stopping


@dataclass
class EvalConfig:
    # off, every published checkpoint (every_k), or only the latest
    schedule: Literal["off", "every", "latest"] = "every"
    every_k: int = 1                       # with `every`: evaluate every k-th published checkpoint
    sets: list[str] = field(default_factory=list)   # eval set names under data.eval_dir
    batch_size: int = 256              # images or texts encoded at once
    linear_probe_train_fraction: float = 0.8  # without a train split: the share of test/ the probe is fitted on
    claim_ttl_s: float = 1800.0            # a claim older than this is taken to be abandoned
    retry_s: float = 60.0                  # wait before retrying a checkpoint whose evaluation failed
    max_attempts: int = 3                  # evaluations tried per checkpoint before giving up on it
    cpus: float = 1.0                      # resources of the eval actor beside training
    poll_s: float = 5.0                # seconds between looks for new published checkpoints
    captioning: bool = True                # a CoCa checkpoint: also caption every set with captions (task `captioning`)
    caption_strategy: Literal["greedy", "beam"] = "greedy"   # how `captioning` decodes
    caption_max_len: int = 0               # tokens of a generated caption, start and end included; 0: context length
    caption_samples: int = 0               # images `captioning` captions per set (the first ones); 0: all


@dataclass
class LoggingConfig:
    # debug also shows Ray's, Ray Train's and DeepSpeed's own lines (`contrast -v`)
    level: Literal["debug", "info", "warning", "error"] = "info"
    tensorboard: bool = True           # write TensorBoard event files under run_dir/tensorboard
    progress: bool = True                  # a progress bar for training when the console is a terminal


@dataclass
class Config:
    run_dir: str = "runs/default"      # folder or URL of everything the run writes (local, s3://, gs://, …)
    seed: int = 0                      # seeds the data order, the initial weights and dropout
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gradcache: GradCacheConfig = field(default_factory=GradCacheConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)   # raw DeepSpeed keys, passed through
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def local_batch(self) -> int:
        """Rows per rank; with an elastic worker range, on its largest count (the smallest local batch)."""
        return self.train.global_batch // self.cluster.max_workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def problem(self, key: str, expected: str) -> str:
        """One validation message: the key, its value, where it came from, what was expected."""
        return f"{key} = {_get(self, key)!r} (from {self.origin(key)}): expected {expected}"

    def origin(self, key: str) -> str:
        """Where the value of a dotted key came from: a file, the command line, or the defaults."""
        sources: dict[str, str] = getattr(self, "_sources", {})
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in sources:
                return sources[".".join(parts[:n])]
        return DEFAULTS


FREE_FORM_SECTIONS = ("deepspeed",)


# ------------------------------------------------------------------------------------- building
def load_config(path: str | Path | None = None, overrides: list[str] = (), validate: bool = True) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides; validated unless told not."""
    cfg = Config()
    sources: dict[str, str] = {}
    if path is not None:
        text = _read_text(path)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
        for key, value in _flatten(raw):
            _set(cfg, key, value, str(path), sources)
    for item in overrides:
        key, value = parse_override(item)
        _set(cfg, key, value, COMMAND_LINE, sources)
    object.__setattr__(cfg, "_sources", sources)
    if validate:
        validate_config(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], origin: str = "dict", validate: bool = True,
                     overrides: Sequence[str] = ()) -> Config:
    """Rebuild a config from `to_dict()` output (a run's manifest, a checkpoint), then `key=value` overrides."""
    cfg = Config()
    sources: dict[str, str] = {}
    for key, value in _flatten(data):
        _set(cfg, key, value, origin, sources)
    for item in overrides:
        key, value = parse_override(item)
        _set(cfg, key, value, COMMAND_LINE, sources)
    object.__setattr__(cfg, "_sources", sources)
    if validate:
        validate_config(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """`train.global_batch=4096` → ("train.global_batch", 4096); the value is read as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.global_batch=4096")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:      # not YAML, e.g. brace patterns: `[a.tar, s3://b/{0..9}.tar]`
        value = _plain_list(text) if text.strip().startswith("[") and text.strip().endswith("]") else text
    return key, value


def _plain_list(text: str) -> list[str]:
    """`[a, b/{0..9}.tar, c/{x,y}.tar]` → its items, split on the commas outside braces."""
    items, depth, current = [], 0, ""
    for ch in text.strip()[1:-1]:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    return [i for i in items + [current.strip()] if i]


def _read_text(path: str | Path) -> str:
    try:
        with fsspec.open(str(path), "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None


def _flatten(raw: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings → dotted keys; free-form sections stay whole so their keys pass through."""
    out: list[tuple[str, Any]] = []
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in FREE_FORM_SECTIONS and _is_section(key):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def _is_section(dotted: str) -> bool:
    obj: Any = Config
    for part in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
        if part not in fields:
            return False
        obj = _hints(obj)[part]
    return dataclasses.is_dataclass(obj)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _set(cfg: Config, key: str, value: Any, origin: str, sources: dict[str, str]) -> None:
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if isinstance(obj, dict):                      # inside a free-form section
            if i == len(parts) - 1:
                obj[part] = _merge(obj.get(part), value)
                sources[key] = origin
            else:
                obj = obj.setdefault(part, {})
                if not isinstance(obj, dict):
                    raise ConfigError(f"{origin}: {here} is a value, not a section; cannot set {key}")
            continue
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            valid = ", ".join(names)
            raise ConfigError(f"{origin}: unknown key {here!r}; valid keys of {where}: {valid}")
        hint = _hints(type(obj))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hint):
                if not isinstance(value, dict):
                    raise ConfigError(f"{origin}: {here} is a section; expected a mapping, got {value!r}")
                for k, v in _flatten(value, here + "."):
                    _set(cfg, k, v, origin, sources)
                return
            current = getattr(obj, part)
            if isinstance(current, dict):
                if not isinstance(value, dict):
                    raise ConfigError(f"{origin}: {here} expects a mapping of raw keys, got {value!r}")
                setattr(obj, part, _merge(current, value))
            else:
                setattr(obj, part, _coerce(here, value, hint, origin))
            sources[here] = origin
            return
        obj = getattr(obj, part)


def _merge(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        out = dict(old)
        for k, v in new.items():
            out[k] = _merge(out.get(k), v)
        return out
    return new


def _coerce(key: str, value: Any, hint: Any, origin: str) -> Any:
    """Coerce a YAML value to a field's type, or raise a ConfigError naming key, value and type."""
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{origin}: {key} = {value!r} ({type(value).__name__}); expected {expected}")

    origin_t = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin_t in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        expected = []
        for option in (a for a in args if a is not type(None)):     # the first type that takes the value
            try:
                return _coerce(key, value, option, origin)
            except ConfigError as e:
                expected.append(str(e).rsplit("; expected ", 1)[-1])
        raise fail(" or ".join(expected))
    if origin_t is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:
            value = "on" if value else "off"          # YAML 1.1 reads a bare off/on as a boolean
        if value not in args:
            raise fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin_t is list:
        (item_t,) = args
        if isinstance(value, (str, int, float)) and item_t is str:
            value = [value]                           # a single URL is a list of one
        if not isinstance(value, (list, tuple)):
            raise fail(f"a list of {item_t.__name__}")
        return [_coerce(f"{key}[{i}]", v, item_t, origin) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):                # an item of a list of sections (data.sources)
        return _coerce_section(key, value, hint, origin)
    if hint is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise fail("an integer")
        return value
    if hint is float:
        if isinstance(value, str):             # YAML 1.1 reads `1e-3` as a string
            try:
                return float(value)
            except ValueError:
                raise fail("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise fail("a string")
        return str(value)
    if hint is Any:
        return value
    raise fail(str(hint))


def _coerce_section(key: str, value: Any, cls: type, origin: str) -> Any:
    """A mapping → the dataclass `cls`, every key checked and coerced like a top-level one."""
    if isinstance(value, cls):
        return value
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(value, dict):
        raise ConfigError(f"{origin}: {key} = {value!r}; expected a mapping with keys {', '.join(names)}")
    unknown = [k for k in value if k not in names]
    if unknown:
        raise ConfigError(f"{origin}: unknown key {key}.{unknown[0]}; valid keys of {key}: {', '.join(names)}")
    hints = _hints(cls)
    return cls(**{k: _coerce(f"{key}.{k}", v, hints[k], origin) for k, v in value.items()})


# ------------------------------------------------------------------------------------ validation
StageCheck = Callable[[Config], list[str]]
_STAGE_CHECKS: list[StageCheck] = []


def register_check(check: StageCheck) -> StageCheck:
    """Add a stage's own check of its section (the names it resolves, the rules it owns) to
    `validate_config`. Stages register when imported, so this module needs none of them."""
    if check not in _STAGE_CHECKS:
        _STAGE_CHECKS.append(check)
    return check


def validate_config(cfg: Config) -> None:
    """Check every number (finite, in range) and the combinations; raise one ConfigError listing every
    problem found, each naming its key."""
    problems = [cfg.problem(key, "a finite number") for key in _numeric_keys(cfg)
                if not math.isfinite(_get(cfg, key))]
    bad = {p.split(" ", 1)[0] for p in problems}
    for key, ok, expected in _RANGES:
        value = _get(cfg, key)
        if key not in bad and value is not None and not ok(value):
            problems.append(cfg.problem(key, expected))
    if not problems:
        problems += _combinations(cfg)
    for check in _STAGE_CHECKS:
        problems.extend(check(cfg))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _at_least(n: float) -> Callable[[float], bool]:
    return lambda v: v >= n


def _positive(v: float) -> bool:
    return v > 0


def _fraction(v: float) -> bool:
    return 0 <= v <= 1


# (key, rule, what is expected): every numeric key has one.
_RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("data.image_size", _at_least(8), "at least 8 pixels"),
    ("data.context_length", _at_least(2), "at least 2 tokens"),
    ("data.num_workers", _at_least(0), "0 or more loader processes"),
    ("data.shuffle_buffer", _at_least(1), "at least 1 (1: no shuffling)"),
    ("data.streams", _at_least(0), "0 (chosen from the global batch) or a positive count"),
    ("data.max_bad_fraction", _fraction, "a fraction in [0, 1]"),
    ("data.hard_negatives", _at_least(0), "0 or more hard negatives per row"),
    ("data.synth.samples", _at_least(0), "0 (never synthesise) or a count"),
    ("data.synth.eval_samples", _at_least(1), "at least 1"),
    ("data.synth.image_size", _at_least(16), "at least 16 pixels"),
    ("data.synth.shard_size", _at_least(1), "at least 1"),
    ("data.synth.captions", _at_least(1), "at least 1"),
    ("model.dropout", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    ("model.image.unlock_last", _at_least(0), "0 or more blocks"),
    ("model.text.unlock_last", _at_least(0), "0 or more blocks"),
    ("model.image.patch_dropout", lambda v: 0 <= v < 1, "a fraction of the patches in [0, 1), e.g. 0.5"),
    ("model.text.patch_dropout", lambda v: v == 0, "0: patches are an image tower's (set model.image.patch_dropout)"),
    ("loss.tile_size", _at_least(1), "at least 1"),
    ("loss.init_temperature", _positive, "a positive temperature (CLIP starts at 0.07)"),
    ("train.steps", _at_least(1), "at least 1"),
    ("train.global_batch", _at_least(2), "at least 2 (a contrastive batch needs negatives)"),
    ("train.lr", _positive, "a positive learning rate"),
    ("train.min_lr", _at_least(0), "0 or a positive learning rate (the end of the cosine)"),
    ("train.warmup_steps", _at_least(0), "0 or more"),
    ("train.weight_decay", _at_least(0), "0 or more"),
    ("train.betas", lambda b: len(b) == 2 and all(0 <= x < 1 for x in b), "two numbers in [0, 1)"),
    ("train.eps", _positive, "a small positive number (e.g. 1e-6)"),
    ("train.grad_clip", _at_least(0), "0 (off) or a positive norm"),
    ("train.log_every", _at_least(1), "at least 1"),
    ("gradcache.chunk_size", _at_least(0), "0 (off) or a positive chunk size"),
    ("gradcache.text_chunk_size", _at_least(0), "0 (same as chunk_size) or a positive chunk size"),
    ("cluster.num_workers", lambda v: v >= 1 if isinstance(v, int) else len(v) == 2 and 1 <= v[0] <= v[1],
     "at least 1, or a range [min, max] with 1 <= min <= max"),
    ("cluster.cpus_per_worker", _positive, "a positive number of CPUs"),
    ("cluster.gpus_per_worker", _positive, "a positive number of GPUs"),
    ("cluster.max_failures", _at_least(-1), "-1 (unlimited) or a count >= 0"),
    ("cluster.collective_timeout_s", _positive, "a positive number of seconds"),
    ("cluster.lease_ttl_s", _positive, "a positive number of seconds"),
    ("checkpoint.every_steps", _at_least(1), "at least 1"),
    ("checkpoint.keep", _at_least(1), "at least 1"),
    ("checkpoint.grace_s", _at_least(0), "0 (stop at once) or more seconds"),
    ("eval.every_k", _at_least(1), "at least 1"),
    ("eval.batch_size", _at_least(1), "at least 1"),
    ("eval.linear_probe_train_fraction", lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    ("eval.claim_ttl_s", _positive, "a positive number of seconds"),
    ("eval.retry_s", _at_least(0), "0 or more seconds"),
    ("eval.max_attempts", _at_least(1), "at least 1"),
    ("eval.cpus", _positive, "a positive number of CPUs"),
    ("eval.poll_s", _positive, "a positive number of seconds"),
    ("eval.caption_max_len", lambda v: v == 0 or v >= 2, "0 (the context length) or at least 2 (start and end)"),
    ("eval.caption_samples", _at_least(0), "0 (all) or a positive number of images"),
]


def _numeric_keys(cfg: Config, obj: Any = None, prefix: str = "") -> list[str]:
    """Every int/float field (and number list) of the schema, as dotted keys."""
    obj = cfg if obj is None else obj
    keys: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _numeric_keys(cfg, value, f"{prefix}{f.name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            keys.append(f"{prefix}{f.name}")
    return keys


def _combinations(cfg: Config) -> list[str]:
    """Rules between keys: an empty run_dir, the lr floor, the batch split, chunk sizes, DeepSpeed's stage."""
    t, c = cfg.train, cfg.cluster
    problems = []
    if not cfg.run_dir.strip():
        problems.append(cfg.problem("run_dir", "a folder or URL for everything the run writes (e.g. runs/demo)"))
    if t.min_lr > t.lr:
        problems.append(cfg.problem("train.min_lr", f"at most train.lr = {t.lr:g}: the cosine decays to it"))
    if cfg.data.hard_negatives and cfg.data.format != "text_pairs":
        problems.append(cfg.problem("data.hard_negatives", "0 unless data.format = text_pairs (image-caption "
                                    "samples carry no hard negatives)"))
    k = cfg.data.captions_per_image
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        problems.append(cfg.problem("data.captions_per_image", "an integer >= 1 (captions per image in each row)"))
    elif k > 1 and cfg.data.format != "image_text":
        problems.append(cfg.problem("data.captions_per_image", "1 unless data.format = image_text (a text pair "
                                    "has one positive)"))
    stage = _get_dict(cfg.deepspeed, "zero_optimization.stage")
    if stage is not None and (isinstance(stage, bool) or stage not in (0, 1, 2, 3)):
        problems.append(cfg.problem("deepspeed.zero_optimization.stage", "a ZeRO stage: 0, 1, 2 or 3"))
    counts = [w for w in range(c.min_workers, c.max_workers + 1) if t.global_batch % w == 0]
    if not counts:
        which = (f"any worker count in cluster.num_workers = {c.num_workers}" if c.elastic
                 else f"cluster.num_workers = {c.num_workers}")
        problems.append(
            f"train.global_batch = {t.global_batch} (from {cfg.origin('train.global_batch')}) is not divisible by "
            f"{which} (from {cfg.origin('cluster.num_workers')}): every rank needs the same local batch; pick a "
            f"multiple of {c.min_workers}")
    else:
        local = t.global_batch // counts[-1]
        for key in ("gradcache.chunk_size", "gradcache.text_chunk_size"):
            size = _get(cfg, key)
            if size > local:
                problems.append(
                    f"{key} = {size} (from {cfg.origin(key)}) is larger than the local batch {local} "
                    f"(train.global_batch {t.global_batch} / {counts[-1]} workers, cluster.num_workers "
                    f"{c.num_workers}); use at most {local}")
    if not c.use_gpu and _get_dict(cfg.deepspeed, "fp16.enabled"):
        problems.append(f"deepspeed.fp16.enabled = true (from {cfg.origin('deepspeed.fp16')}): DeepSpeed refuses fp16 "
                        "on CPU; use train.precision=bf16 or fp32, or cluster.use_gpu=true")
    return problems


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _get_dict(d: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d
