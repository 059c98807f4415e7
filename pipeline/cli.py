"""The `contrast` command: one subcommand per stage, each a thin call into its library module."""
from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading
from typing import Sequence

from pipeline.cluster import connect, stop_ray
from pipeline.config import Config, ConfigError, load_config
from pipeline.curate import Rules, embed, filter_pool
from pipeline.data import DataError, layout_world_sizes, load_tokenizer, run_streams, synthesize, world_sizes
from pipeline.data.evalsets import read_lines
from pipeline.data.inspection import format_mixture, format_reports, inspect_mixture, inspect_shards
from pipeline.data.pack import folder_items, img2dataset_items, pack, pack_zeroshot_set, table_items
from pipeline.data.pydoc_pairs import write_pydoc_dataset
from pipeline.data.shards import dataset_dir
from pipeline.data.text_pairs import pack_jsonl
from pipeline.eval.evaluate import evaluate_checkpoint, format_metrics, run_dir_of, write_result
from pipeline.eval.report import write_report
from pipeline.eval.scheduler import watch
from pipeline.eval.sets import EvalSetError
from pipeline.layout import EVAL_SPLITS, EVAL_TEST
from pipeline.log import get_logger, setup_logging
from pipeline.models import CheckpointError, ConversionError, check_source, run_parameter_counts, weight_sources
from pipeline.models.export import export
from pipeline.models.export_st import export_text, is_text_checkpoint
from pipeline.orchestrate import TrainingError, TrainingInterrupted, train
from pipeline.run import run_pipeline
from pipeline.status import format_status, run_status, status_json
from pipeline.storage import OutOfSpace
from pipeline.train.checkpoint import checkpoint_statuses, latest_checkpoint
from pipeline.train.integrity import DamagedCheckpoint
from pipeline.train.lease import LeaseHeld
from pipeline.train.lease import holder as lease_holder

log = get_logger("cli")


# ------------------------------------------------------------------------------------- handlers
def cmd_data_synth(args: argparse.Namespace) -> int:
    summary = synthesize(args.out, args.samples, eval_samples=args.eval_samples, image_size=args.image_size,
                         shard_size=args.shard_size, seed=args.seed, workers=args.workers, progress=not args.quiet,
                         noise=args.noise, duplicates=args.duplicates)
    print(f"train: {summary['train']} ({summary['samples']} samples, tokenizer.json beside the manifest)")
    if summary["planted"]:
        print("planted noise: " + ", ".join(f"{n} {k}" for k, n in sorted(summary["planted"].items()))
              + " (train/planted_noise.json)")
    for name, url in summary["eval"].items():
        print(f"eval {name}: {url}")
    print("held out of training: " + ", ".join(summary["held_out"]))
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    if args.jsonl:
        print(pack_jsonl(args.jsonl, args.out, shard_size=args.shard_size, progress=not args.quiet).text())
        return 0
    if args.clip_benchmark:
        return _pack_zeroshot_set(args)
    if args.templates or args.split != EVAL_TEST:
        raise DataError("--templates and --split describe a zero-shot eval set: add --clip-benchmark")
    if args.folder:
        source, items = args.folder, folder_items(args.folder)
    elif args.img2dataset:
        source, items = args.img2dataset, img2dataset_items(args.img2dataset)
    else:
        source = args.csv or args.parquet
        items = table_items(source, args.image_column, args.caption_column)
    summary = pack(items, args.out, shard_size=args.shard_size, progress=not args.quiet, source=source)
    print(summary.text())
    return 0


def cmd_data_pydoc(args: argparse.Namespace) -> int:
    summary = write_pydoc_dataset(args.out, shard_size=args.shard_size, seed=args.seed)
    print(f"train: {summary['train']} ({summary['train_pairs']} pairs with hard negatives)")
    print(f"eval {summary['eval'].rsplit('/', 1)[-1]}: {summary['eval']} ({summary['eval_queries']} queries; "
          f"held-out packages: {', '.join(summary['held_out_packages'])})")
    return 0


def _pack_zeroshot_set(args: argparse.Namespace) -> int:
    if not args.folder:
        raise DataError("--clip-benchmark packs a folder of class subfolders: give --folder DIR (DIR/CLASS/IMAGE)")
    templates = [t for t in read_lines(args.templates) if t] if args.templates else None
    summary = pack_zeroshot_set(args.folder, args.out, split=args.split, templates=templates,
                                shard_size=args.shard_size, progress=not args.quiet)
    print(summary.text())
    print(f"zero-shot set: {args.out} (CLIP_benchmark: --dataset wds/NAME --dataset_root {args.out}; "
          f"contrast: data.eval_dir = its parent folder, eval.sets = [its folder name])")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    overrides = [f"cluster.address={args.address}"] if args.address else []
    cfg = load_config(None, [*overrides, f"cluster.auth={args.auth}"])
    started = connect(cfg)
    try:
        summary = embed(args.model, args.urls, args.out, workers=args.workers, batch_size=args.batch_size,
                        cpus_per_worker=args.cpus_per_worker, progress=not args.quiet)
    finally:
        stop_ray(started)
    print(summary.text())
    return 1 if summary.broken else 0


def cmd_data_filter(args: argparse.Namespace) -> int:
    rules = Rules(min_score=args.min_score, top_fraction=args.top_fraction, dedup=args.dedup, dedup_on=args.dedup_on,
                  balance=args.balance, balance_cap=args.balance_cap, seed=args.seed)
    print(filter_pool(args.urls, args.out, rules, shard_size=args.shard_size, progress=not args.quiet).text())
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    if args.config:
        cfg = load_config(args.config, args.items)
        print(format_mixture(inspect_mixture(cfg), cfg))
        return 0
    if not args.items:
        raise ConfigError("contrast data inspect: expected shard URLs, or --config CONFIG for a run's sources")
    reports = inspect_shards(args.items, allow_pipe=args.allow_pipe)
    print(format_reports(reports))
    return 1 if any(r.problems for r in reports) else 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        out = (export_text if is_text_checkpoint(args.checkpoint) else export)(args.checkpoint, args.format, args.out)
    except ValueError as e:                   # a checkpoint this format cannot hold
        print(f"contrast export: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_source(cfg)
    print(cfg.to_yaml(), end="")
    print(_parameter_line(cfg))
    print(_worker_counts_line(cfg))
    for what, source in weight_sources(cfg).items():
        print(f"# {what}: {source}")
    return 0


def _worker_counts_line(cfg: Config) -> str:
    """The worker counts the data layout allows: those a run (or a resume, or an elastic range) may use."""
    streams = run_streams(cfg)
    sizes = world_sizes(cfg, streams)
    used = (f"cluster.num_workers = {cfg.cluster.num_workers} trains on {', '.join(map(str, sizes))} workers"
            if cfg.cluster.elastic else f"cluster.num_workers = {cfg.cluster.num_workers}")
    return (f"# worker counts the data layout allows ({streams} virtual streams, data.streams): "
            f"{', '.join(map(str, layout_world_sizes(streams)))}; a resume may change to any of them; {used}")


def _parameter_line(cfg: Config) -> str:
    """Parameter counts of the configured model, built on the meta device (no memory, no weights)."""
    where = cfg.data.tokenizer or dataset_dir(cfg.data.train_urls)
    vocab, source = 49408, "vocabulary 49408 assumed: no tokenizer.json yet"
    if cfg.model.init_from and "text" in cfg.model.init_towers:
        source = "vocabulary of model.init_from"
    elif where is not None:
        try:
            vocab, source = load_tokenizer(where, cfg.data.context_length).vocab_size, f"tokenizer {where}"
        except FileNotFoundError:
            pass
    try:
        n = run_parameter_counts(cfg, vocab)
    except ValueError as e:                   # e.g. a pretrained tower's folder not written yet
        return f"# parameters: not counted ({e})"
    return f"# parameters ({source}): " + ", ".join(f"{part} {count:,}" for part, count in n.items())


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.config) if args.config else None
    result = evaluate_checkpoint(args.checkpoint, cfg)
    url = write_result(run_dir_of(args.checkpoint), result)
    print(format_metrics(result["metrics"]))
    print(f"result: {url}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides) if args.config else None
    outcome = watch(args.run_dir, cfg, once=args.once, overrides=args.overrides)
    print(f"evaluated steps: {', '.join(map(str, outcome.evaluated)) or 'none'}")
    for step, error in sorted(outcome.failed.items()):
        print(f"step {step} failed (retried later): {error}", file=sys.stderr)
    return 1 if outcome.failed else 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    run_dir = args.run_dir
    holder = lease_holder(run_dir)
    if holder is None:
        print(f"run_dir {run_dir}: no trainer holds it")
    else:
        print(f"run_dir {run_dir}: {'held by' if holder.alive() else 'stale lease of'} {holder.describe()}")
    rows = checkpoint_statuses(run_dir)
    if not rows:
        print("no resume checkpoints")
        return 0
    print(f"{'step':>8}  {'state':<11}  {'workers':>7}  {'ZeRO':>4}  {'size':>9}  notes")
    for r in rows:
        notes = "; ".join(n for n in (r.detail, "universal form kept" if r.universal else "") if n)
        print(f"{r.step:>8}  {r.state:<11}  {r.world_size if r.world_size else '-':>7}  "
              f"{r.zero_stage if r.zero_stage is not None else '-':>4}  {r.bytes / 2**20:>7.1f} MB  {notes}")
    usable = [r.step for r in rows if r.state == "complete"]
    print(f"a resume starts from step {usable[-1]}" if usable else "no usable checkpoint: a resume would be refused"
          if any(r.state == "damaged" for r in rows) else "no complete checkpoint: training would start from step 0")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = run_status(args.run_dir)
    print(json.dumps(status_json(status), indent=2, default=str) if args.json else format_status(status))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    print(write_report(args.run_dir))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    out = run_pipeline(_run_config(args))
    print(f"report: {out['report']}")
    print(f"final metrics (step {out['step']}; {out['seconds']:.0f} s in all):")
    print(format_metrics(out["metrics"]))
    if out["initial"]:
        print("before training (step 0):")
        print(format_metrics(out["initial"]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
    trained = train(cfg)
    print(f"trained to step {cfg.train.steps}; resume checkpoint: {latest_checkpoint(cfg.run_dir)}")
    if trained.evaluated:
        print(f"evaluated beside training: steps {', '.join(map(str, trained.evaluated))}")
    for step, error in sorted(trained.eval_failed.items()):
        print(f"evaluation of step {step} failed: {error} (retry with `contrast watch {cfg.run_dir} --once`)",
              file=sys.stderr)
    return 0


def _run_config(args: argparse.Namespace) -> Config:
    """The run config of `train`/`run`: `-v` and `-q` set the workers' `logging.level` too."""
    level = ["logging.level=debug"] if args.verbose else ["logging.level=warning"] if args.quiet else []
    return load_config(args.config, [*args.overrides, *level])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# Errors that are the user's to fix (config, data, checkpoints, eval sets, training refusals):
# printed as one message, never a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, ConversionError, EvalSetError, TrainingError,
               FileNotFoundError, PermissionError, OutOfSpace, DamagedCheckpoint, LeaseHeld)


# ------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="contrast",
        description="Distributed contrastive image-text pretraining: data → train → eval → report.",
        epilog="Overrides are dotted keys with YAML values, e.g. train.global_batch=4096 loss.name=siglip. "
               "`contrast config CONFIG` prints the resolved config.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, in the workers too (with Ray's, Ray Train's and DeepSpeed's own lines)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def config_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", metavar="CONFIG", help="YAML run config, e.g. configs/demo.yaml")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides read as YAML, e.g. train.steps=200 cluster.num_workers=4")

    # data
    data = sub.add_parser("data", help="make, pack and inspect WebDataset shards",
                          description="Make, pack and inspect WebDataset shards (tars + manifest.json).")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = dsub.add_parser("synth", help="generate a synthetic image-caption dataset and eval sets (no download)",
                            description="Render coloured shapes with captions into shards, plus evaluation sets "
                                        "(zero-shot on seen and held-out combinations, retrieval, relations).")
    synth.add_argument("--out", required=True, help="output URL (folder); train/ and eval/ are written inside")
    synth.add_argument("--samples", type=_positive_int, required=True, help="number of training samples")
    synth.add_argument("--eval-samples", type=_positive_int, default=1000,
                       help="samples per evaluation set (default 1000)")
    synth.add_argument("--image-size", type=_positive_int, default=64, help="image side in pixels (default 64)")
    synth.add_argument("--shard-size", type=_positive_int, default=1000, help="samples per shard (default 1000)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    synth.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    synth.add_argument("--noise", type=float, default=0.0,
                       help="fraction of training pairs whose caption is replaced by another pair's (default 0)")
    synth.add_argument("--duplicates", type=float, default=0.0,
                       help="fraction of training pairs that are copies of another pair (default 0); what was "
                            "planted is in each sample's json and train/planted_noise.json")
    synth.set_defaults(func=cmd_data_synth)

    pack = dsub.add_parser("pack", help="pack a folder, CSV, parquet or img2dataset output into shards",
                           description="Pack image-caption pairs (or, with --jsonl, text pairs with hard negatives) "
                                       "into tars of a chosen size plus manifest.json. Bad inputs are skipped and "
                                       "counted by reason.")
    src = pack.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="class subfolders, or x.jpg beside x.txt")
    src.add_argument("--csv", help="table with image path and caption columns")
    src.add_argument("--parquet", help="table with image path and caption columns")
    src.add_argument("--img2dataset", help="img2dataset output folder (re-shard)")
    src.add_argument("--jsonl", help='text pairs, one JSON a line: {"query", "pos", "neg": [...]} (text-text training)')
    pack.add_argument("--out", required=True, help="output URL (folder)")
    pack.add_argument("--shard-size", type=_positive_int, default=1000, help="samples per shard (default 1000)")
    pack.add_argument("--image-column", default="image", help="table column with image paths (default image)")
    pack.add_argument("--caption-column", default="caption", help="table column with captions (default caption)")
    pack.add_argument("--clip-benchmark", action="store_true",
                      help="with --folder of class subfolders: write a zero-shot eval set in CLIP_benchmark's layout "
                           "(OUT/test/{0..N-1}.tar with KEY.cls labels, nshards.txt, classnames.txt, templates)")
    pack.add_argument("--templates", metavar="FILE",
                      help="with --clip-benchmark: zero-shot templates, one a line with {c} for the class name "
                           "(default: a built-in list of 8)")
    pack.add_argument("--split", choices=EVAL_SPLITS, default=EVAL_TEST,
                      help="with --clip-benchmark: the split to write, test (scored) or train (fits the linear "
                           "probe; same classes as the set's other split); default test")
    pack.set_defaults(func=cmd_data_pack)

    pydoc = dsub.add_parser("pydoc", help="text pairs from the Python standard library's docstrings (text demo)",
                            description="Parse the standard library's sources (nothing is imported) into "
                                        "query/passage pairs with hard negatives from the same module; whole "
                                        "packages are held out as a BEIR-style retrieval set.")
    pydoc.add_argument("--out", required=True, help="output URL (folder); train/ and eval/pydoc_heldout/ inside")
    pydoc.add_argument("--shard-size", type=_positive_int, default=250, help="pairs per shard (default 250)")
    pydoc.add_argument("--seed", type=int, default=0, help="seed of the hard negatives and order (default 0)")
    pydoc.set_defaults(func=cmd_data_pydoc)

    inspect = dsub.add_parser("inspect", help="counts, bytes, sample keys and corrupt members of shards; "
                                              "a run's mixture of sources",
                              description="Read shards (any fsspec URL, brace pattern, folder or manifest.json) "
                                          "and print counts, bytes, keys per sample and corrupt members. With "
                                          "--config, print the run's sources instead: weight, expected share of "
                                          "every batch, samples, epochs over the run, what happens at the end.")
    inspect.add_argument("items", nargs="*", metavar="URL | KEY=VALUE",
                         help="shard URLs; with --config, dotted overrides of the config")
    inspect.add_argument("--config", help="a run config: show the expected share of each of its data sources")
    inspect.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run shell commands)")
    inspect.set_defaults(func=cmd_data_inspect)

    filt = dsub.add_parser("filter", help="keep the pairs of embedded shards that pass curation rules, as new shards",
                           description="Read `contrast embed` outputs, apply the rules (in this order: --min-score, "
                                       "--top-fraction, --dedup, --balance) and write the kept pairs as shards with "
                                       "manifest.json lineage and decisions.parquet (docs: Curation).")
    filt.add_argument("urls", nargs="+", metavar="URL", help="embedding folders (the --out of contrast embed) or files")
    filt.add_argument("--out", required=True, help="output URL (folder) of the filtered shards")
    filt.add_argument("--min-score", type=float, help="drop pairs whose CLIP score (image-text cosine) is below this")
    filt.add_argument("--top-fraction", type=float, help="keep this fraction of the pool, the highest-scored pairs")
    filt.add_argument("--dedup", type=float, metavar="COSINE",
                      help="near-duplicates: of each group linked by cosine >= COSINE keep the best-scored pair "
                           "(exact copies: 0.999999; the cosine is recomputed in float64)")
    filt.add_argument("--dedup-on", choices=["image", "text"], default="image",
                      help="which embedding --dedup compares (default image)")
    filt.add_argument("--balance", metavar="VOCABULARY",
                      help="MetaCLIP-style balance over a vocabulary file (one entry a line)")
    filt.add_argument("--balance-cap", type=_positive_int, default=20000,
                      help="with --balance: pairs kept per vocabulary entry, about (default 20000)")
    filt.add_argument("--seed", type=int, default=0, help="seed of --balance's sampling (default 0)")
    filt.add_argument("--shard-size", type=_positive_int, default=1000, help="samples per shard (default 1000)")
    filt.set_defaults(func=cmd_data_filter)

    emb = sub.add_parser("embed", help="image and text embeddings and CLIP scores of shards, on Ray Data",
                         description="Embed every sample of the shards with a model (a published checkpoint or any "
                                     "model.init_from source) on Ray Data actors: one Parquet file per shard at OUT "
                                     "(key, shard, caption, float16 embeddings, score); a rerun skips finished shards.")
    emb.add_argument("model", metavar="MODEL", help="published checkpoint folder, open_clip or Hugging Face folder")
    emb.add_argument("urls", nargs="+", metavar="URL",
                     help="shards: dataset folder, manifest.json, tars, brace pattern")
    emb.add_argument("--out", required=True, help="output URL (folder) of the Parquet files")
    emb.add_argument("--workers", type=_positive_int, default=2, help="actors, each holding the model (default 2)")
    emb.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor (default 1)")
    emb.add_argument("--batch-size", type=_positive_int, default=256, help="samples encoded at once (default 256)")
    emb.add_argument("--address", help="Ray cluster address (cluster.address); default: a local Ray")
    emb.add_argument("--auth", choices=["token", "disabled"], default="token",
                     help="Ray token authentication (cluster.auth; default token)")
    emb.set_defaults(func=cmd_embed)

    # stages
    train = sub.add_parser("train", help="train with Ray + DeepSpeed (local Ray when no cluster.address)",
                           description="Train with Ray Train + DeepSpeed. Resumes from the latest checkpoint in "
                                       "run_dir unless train.resume=never.")
    config_args(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate one published checkpoint",
                        description="Zero-shot, retrieval and linear probe on a published checkpoint; writes "
                                    "run_dir/eval/step_N.json and TensorBoard scalars.")
    ev.add_argument("checkpoint", metavar="CHECKPOINT", help="published checkpoint folder (run_dir/published/step_N)")
    ev.add_argument("--config", help="run config for the eval sets (default: the one in the checkpoint)")
    ev.set_defaults(func=cmd_eval)

    watch = sub.add_parser("watch", help="evaluate new published checkpoints as they appear",
                           description="Scheduled evaluation: each complete published checkpoint is evaluated "
                                       "exactly once, following eval.schedule.")
    watch.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (local or any fsspec URL)")
    watch.add_argument("--config", help="run config (default: the one in the newest checkpoint)")
    watch.add_argument("--once", action="store_true", help="evaluate what is pending, then exit")
    watch.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted overrides of the run config, e.g. eval.sets=[zeroshot_heldout] eval.every_k=2")
    watch.set_defaults(func=cmd_watch)

    run = sub.add_parser("run", help="the whole pipeline: data if missing, train, eval, report",
                         description="Synthesise data when missing, train, evaluate on schedule, write the report.")
    config_args(run)
    run.set_defaults(func=cmd_run)

    export = sub.add_parser("export", help="export a published checkpoint to open_clip, Hugging Face, "
                                           "sentence-transformers or safetensors",
                            description="Export a published checkpoint with its tokenizer (sentence_transformers: "
                                        "text–text checkpoints).")
    export.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="published checkpoint folder (run_dir/published/step_N)")
    export.add_argument("--format", required=True, choices=["open_clip", "hf", "safetensors", "sentence_transformers"],
                        help="open_clip: local-dir: folder; hf: AutoModel folder; sentence_transformers: "
                             "SentenceTransformer folder; safetensors: our state dict and config")
    export.add_argument("--out", required=True, help="output folder")
    export.set_defaults(func=cmd_export)

    ckpts = sub.add_parser("checkpoints", help="list a run's resume checkpoints: complete, damaged, in progress",
                           description="List the resume checkpoints of RUN_DIR with their state (every file checked "
                                       "against its manifest: sizes and sha256), and who trains into it now.")
    ckpts.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (local or any fsspec URL)")
    ckpts.set_defaults(func=cmd_checkpoints)

    status = sub.add_parser("status", help="where a run stands: trainer, progress and ETA, checkpoints, evals, events",
                            description="Read RUN_DIR's artifacts (local or any fsspec URL; no Ray needed): who "
                                        "trains into it, the newest logged step with its ETA, the data read per "
                                        "source, resume and published checkpoints, eval results and failures, and "
                                        "every start, resume, failure and stop of the run.")
    status.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (local or any fsspec URL)")
    status.add_argument("--json", action="store_true", help="print everything as one JSON object")
    status.set_defaults(func=cmd_status)

    report = sub.add_parser("report", help="write run_dir/report.html with training and eval plots",
                            description="Plots of training curves and eval metrics vs step, into report.html.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (local or any fsspec URL)")
    report.set_defaults(func=cmd_report)

    cfg = sub.add_parser("config", help="print the fully resolved, validated config",
                         description="Load CONFIG, apply overrides, validate, print the result as YAML.")
    config_args(cfg)
    cfg.set_defaults(func=cmd_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("debug" if args.verbose else "warning" if args.quiet else "info")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"contrast {args.command}: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"contrast {args.command}: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(e.exit_code)             # Ray's exit hooks would wait on processes the signal already ended
    except KeyboardInterrupt:
        print("contrast: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `contrast` command: `main`, then Python's exit without its last part. Its threads are joined and
    its exit handlers run (logging's, Ray's) as usual; only the teardown of every imported module (torch,
    Ray, DeepSpeed: 1-1.5 s here) is skipped, once everything is written and closed."""
    try:
        code = main()
        threading._shutdown()             # what Python's exit does first: wait for the non-daemon threads
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:               # `contrast config … | head`: the reader has what it wanted
        code = 0
    os._exit(code)


if __name__ == "__main__":
    entry()
