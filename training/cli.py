"""`dspark gen-data`, `dspark synth-prompts`, `dspark train-drafter`, `dspark eval-drafter` and
`dspark ablation-report` (subcommands of `dspark`)."""

from __future__ import annotations

import argparse
import json
import sys


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from e


def cmd_gen_data(args: argparse.Namespace) -> int:
    import torch

    from .data import GenDataConfig, gen_data, manifest_summary

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    cfg = GenDataConfig(
        out=args.out, model=args.model, prompts=args.prompts, num_prompts=args.num_prompts, shard_size=args.shard_size,
        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, temperature=args.temperature,
        top_p=args.top_p, val_fraction=args.val_fraction, target_layer_ids=args.target_layers, top_k=args.top_k,
        dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs, num_threads=args.num_threads,
        seed=args.seed, time_budget_s=args.time_budget, first_prompt=args.first_prompt, responses=args.responses,
        match=args.match, min_prompt_tokens=args.min_prompt_tokens,
    )
    manifest = gen_data(cfg)
    print(json.dumps(manifest_summary(manifest)))
    return 0


def cmd_train_drafter(args: argparse.Namespace) -> int:
    import torch

    from dspark_serve.engine.cpu_alloc import keep_freed_memory

    from .trainer import TrainConfig, train_drafter

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    keep_freed_memory()
    cfg = TrainConfig(
        data=args.data, out=args.out, model=args.model, num_layers=args.num_layers, block_size=args.block_size,
        markov_rank=args.markov_rank, markov_head_type=args.markov_head, confidence_head=not args.no_confidence_head,
        draft_vocab_size=args.draft_vocab_size or None, steps=args.steps, seqs_per_step=args.seqs_per_step,
        anchors_per_seq=args.anchors_per_seq, lr=args.lr, warmup_frac=args.warmup_frac, decay=args.decay,
        ce_weight=args.ce_weight, ce_label=args.ce_label, tv_weight=args.tv_weight, conf_weight=args.conf_weight,
        init_from_target=not args.no_init_from_target, autocast_bf16=args.bf16, eval_every=args.eval_every,
        eval_seqs=args.eval_seqs, save_every=args.save_every, seed=args.seed, max_train_seqs=args.max_train_seqs,
        time_budget_s=args.time_budget, init_drafter=args.init_drafter, grow_layers=args.grow_layers,
        grow_vocab=args.grow_vocab, gate_head=args.gate_head, device=args.device, context_window=args.context_window,
    )
    summary = train_drafter(cfg)
    print(json.dumps(summary))
    return 0


EVAL_SETS = ("gsm8k", "humaneval", "mbpp", "arena-hard-v2")


def cmd_eval_drafter(args: argparse.Namespace) -> int:
    import os

    import torch

    from .evaluate import eval_drafter, summary_table

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    sets = {}
    for item in args.datasets:
        if os.path.exists(item):
            sets[os.path.splitext(os.path.basename(item))[0]] = item
        else:
            path = os.path.join(args.eval_dir, f"{item}.jsonl")
            if not os.path.exists(path):
                print(f"no prompt set {item!r}: not a file, and no {path}", file=sys.stderr)
                return 2
            sets[item] = path
    report = eval_drafter(args.drafter, sets, args.out, num_prompts=args.num_prompts, max_tokens=args.max_tokens,
                          temperatures=tuple(args.temperatures), gamma=args.gamma, model=args.model, dtype=args.dtype,
                          max_num_seqs=args.max_num_seqs, seed=args.seed, num_threads=args.num_threads,
                          context_window=args.draft_context_window, prompt_lookup_max=args.prompt_lookup_max)
    for row in summary_table(report):
        print(json.dumps(row))
    return 0


def _arm(value: str) -> tuple[str, str]:
    label, sep, run = value.partition("=")
    if not sep or not label or not run:
        raise argparse.ArgumentTypeError(f"expected LABEL=RUN_DIR, got {value!r}")
    return label, run


def cmd_ablation_report(args: argparse.Namespace) -> int:
    from .ablation import ablation_report, markdown_table

    runs = dict(args.arm)
    if len(runs) != len(args.arm):
        print("each --arm label must be unique", file=sys.stderr)
        return 2
    try:
        result = ablation_report(runs, args.out, name=args.name)
    except (OSError, KeyError, ValueError) as e:
        print(f"ablation-report: {e}", file=sys.stderr)
        return 2
    print(markdown_table(result["table"]))
    return 0


def cmd_synth_prompts(args: argparse.Namespace) -> int:
    from .prompts import write_prompts

    try:
        n = write_prompts(args.out, args.num, args.seed)
    except (OSError, ValueError) as e:
        print(f"synth-prompts: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"prompts": n, "out": args.out}))
    return 0


def add_training_parsers(sub) -> None:
    p = sub.add_parser("synth-prompts", help="write templated math and Python prompts (JSONL) for gen-data --prompts")
    p.add_argument("--out", required=True, help="JSONL file to write ({'turns': [prompt]} per line)")
    p.add_argument("--num", type=int, default=6000, help="distinct prompts to write")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth_prompts)

    g = sub.add_parser("gen-data", help="regenerate responses with the target and cache the drafter's training data")
    g.add_argument("--out", required=True, help="dataset directory (resumed when it exists)")
    g.add_argument("--model", default=None, help="target model (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--prompts", default=None, help="JSONL of prompts ({'turns': [...]} or {'prompt': ...}); default ShareGPT")
    g.add_argument("--num-prompts", type=int, default=4096, help="prompts to read (skipped ones count)")
    g.add_argument("--shard-size", type=int, default=128)
    g.add_argument("--first-prompt", type=int, default=0, help="skip the prompts before this index")
    g.add_argument("--max-prompt-tokens", type=int, default=384)
    g.add_argument("--min-prompt-tokens", type=int, default=0,
                   help="skip prompts shorter than this (chat template included): long contexts only")
    g.add_argument("--max-tokens", type=int, default=320, help="most response tokens per prompt")
    g.add_argument("--temperature", type=float, default=0.2)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--responses", default="target", choices=["target", "dataset"],
                   help="target: regenerate the responses with the target (the recipe); dataset: teacher-force "
                        "the dataset's own responses (ShareGPT's gpt turn; no generation, ~8x the tokens per hour)")
    g.add_argument("--match", default=None, metavar="REGEX",
                   help="use only prompts whose user message matches this regular expression (re.search; "
                        "e.g. '(?i)python|def |equation' for code and math)")
    g.add_argument("--val-fraction", type=float, default=0.03)
    g.add_argument("--target-layers", type=_ints, default=(1, 10, 19, 28), help="target layers whose hidden states are kept")
    g.add_argument("--top-k", type=int, default=64, help="target probabilities kept per position")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default="auto")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--num-threads", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--time-budget", type=float, default=None,
                   help="seconds: stop admitting prompts after this long (a later run resumes)")
    g.set_defaults(func=cmd_gen_data)

    t = sub.add_parser("train-drafter", help="train a DSpark drafter on a gen-data dataset (DeepSpec recipe)")
    t.add_argument("--data", required=True, help="dspark gen-data directories, comma-separated")
    t.add_argument("--out", required=True, help="run directory: checkpoint.pt (resumed), train_log.jsonl, drafter/")
    t.add_argument("--model", default=None, help="the target (default: the embedded SmolLM2-135M-Instruct)")
    t.add_argument("--num-layers", type=int, default=1, help="draft layers")
    t.add_argument("--block-size", type=int, default=7, help="gamma: tokens per block")
    t.add_argument("--markov-rank", type=int, default=128)
    t.add_argument("--markov-head", default="vanilla", choices=["vanilla", "gated", "rnn", "none"],
                   help="sequential head; none = DFlash-style parallel drafter")
    t.add_argument("--no-confidence-head", action="store_true")
    t.add_argument("--draft-vocab-size", type=int, default=8192, help="restricted draft vocabulary (0: full)")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--seqs-per-step", type=int, default=4)
    t.add_argument("--anchors-per-seq", type=int, default=192)
    t.add_argument("--lr", type=float, default=1.5e-3)
    t.add_argument("--warmup-frac", type=float, default=0.04)
    t.add_argument("--decay", type=float, default=4.0, help="position weight decay: w_k = exp(-(k-1)/decay)")
    t.add_argument("--ce-weight", type=float, default=0.1)
    t.add_argument("--ce-label", default="data", choices=["data", "target"],
                   help="CE label: the next token of the data (the recipe), or the target's top-1 there "
                        "(for --responses dataset data, whose tokens the target did not choose)")
    t.add_argument("--tv-weight", type=float, default=0.9)
    t.add_argument("--conf-weight", type=float, default=1.0)
    t.add_argument("--no-init-from-target", action="store_true", help="random init instead of the target's last layer")
    t.add_argument("--init-drafter", default=None,
                   help="warm start: continue from this saved drafter directory (its architecture and draft "
                        "vocabulary replace the architecture options)")
    t.add_argument("--grow-layers", type=int, default=None,
                   help="with --init-drafter: add draft layers up to N (copies of the target's last layer with "
                        "zeroed output projections: training starts from the saved drafter's exact function)")
    t.add_argument("--grow-vocab", type=int, default=None,
                   help="with --init-drafter: widen the draft vocabulary to N tokens with the most frequent "
                        "response tokens of --data it lacks (their Markov bias starts at zero)")
    t.add_argument("--gate-head", action="store_true",
                   help="with --init-drafter: turn its vanilla Markov head into the gated head (the gate starts "
                        "constant and W2 compensates: training starts from the saved drafter's exact function)")
    t.add_argument("--context-window", type=int, default=None,
                   help="blocks attend to the last N context positions only, in training and when served "
                        "(stored in config.json as draft_context_window; 0: the whole context; default: "
                        "the --init-drafter's, else the whole context)")
    t.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (GPUs; CPUs with fast bf16 kernels: check with models.loader.probe_cpu_bf16)")
    t.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N, or auto (CUDA when torch sees a GPU); the cached data stays in host memory")
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--eval-seqs", type=int, default=64)
    t.add_argument("--save-every", type=int, default=250)
    t.add_argument("--max-train-seqs", type=int, default=None, help="use only the first N training sequences")
    t.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training: the schedule follows max(step, time) progress and ends its decay on time")
    t.add_argument("--num-threads", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train_drafter)

    e = sub.add_parser("eval-drafter", help="measure a drafter's acceptance with real speculative decoding")
    e.add_argument("--drafter", required=True, help="drafter directory (config.json + model.safetensors)")
    e.add_argument("--datasets", nargs="+", default=list(EVAL_SETS),
                   help="JSONL files, or names of sets in --eval-dir")
    e.add_argument("--eval-dir", default="../shared/eval_datasets")
    e.add_argument("--out", required=True, help="directory for eval.json and the plots")
    e.add_argument("--model", default=None)
    e.add_argument("--num-prompts", type=int, default=40)
    e.add_argument("--max-tokens", type=int, default=256)
    e.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    e.add_argument("--gamma", type=int, default=None, help="verification length (default: the drafter's block size)")
    e.add_argument("--draft-context-window", type=int, default=None,
                   help="serve the drafter with this context window (0: the whole context; default: its config.json's)")
    e.add_argument("--prompt-lookup-max", type=int, default=None,
                   help="context lookup's longest n-gram (0: the drafter alone; default: the serving default)")
    e.add_argument("--dtype", default="float32")
    e.add_argument("--max-num-seqs", type=int, default=16)
    e.add_argument("--num-threads", type=int, default=None)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_eval_drafter)

    a = sub.add_parser("ablation-report", help="tabulate and plot train-drafter runs side by side (head ablation)")
    a.add_argument("--arm", type=_arm, action="append", required=True,
                   help="LABEL=RUN_DIR (a train-drafter run with eval-drafter's report in RUN_DIR/eval); the first "
                        "is the baseline")
    a.add_argument("--out", required=True, help="directory for NAME.json and NAME.png")
    a.add_argument("--name", default="ablation")
    a.set_defaults(func=cmd_ablation_report)
