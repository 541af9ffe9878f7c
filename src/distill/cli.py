"""The ``distill`` command line: ``distill run CONFIG``, ``distill demo``, ``distill methods``."""

from __future__ import annotations

import argparse
import gc
import sys
from importlib import resources
from pathlib import Path

from rich.console import Console

from distill._version import __version__
from distill.core.errors import DistillError

DEMO_QUICK_OVERRIDES = [
    # the demo's story in miniature (about a minute): the same label budget and unlabeled images, a smaller
    # teacher trained for 2 epochs, one epoch for the students (distilled ahead of scratch on seeds 0, 1, 2:
    # benchmarks/fashion_mnist.py --quick)
    "teacher.model.channels=[16,32,64]",
    "teacher.train.epochs=2",
    "train.epochs=1",
    "eval.latency_repeats=10",
]

DEMO_TEXT_QUICK_OVERRIDES = [
    # a smoke test of the text path: short texts, one epoch each, fewer timing repeats
    "data.max_length=64",
    "teacher.train.epochs=1",
    "train.epochs=1",
    "eval.latency_repeats=5",
]

DEMO_LM_QUICK_OVERRIDES = [
    # a smoke test of the language-model path: 32 blocks of 64 tokens, 8 held-out blocks
    "data.block_length=64",
    "data.limit_train=32",
    "data.limit_eval=8",
    "eval.latency_repeats=3",
]

DEMOS = {  # `distill demo WHICH`: the config, its --quick overrides, the run's name
    "image": ("demo.yaml", DEMO_QUICK_OVERRIDES, "demo"),
    "text": ("demo_text.yaml", DEMO_TEXT_QUICK_OVERRIDES, "demo-text"),
    "lm": ("demo_lm.yaml", DEMO_LM_QUICK_OVERRIDES, "demo-lm"),
}


def _add_max_memory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-memory",
        metavar="SIZE",
        default=None,
        help="memory budget, e.g. 8GB or 6GiB: models and batches that would not fit are refused before anything "
        "is built (default: the memory available now; same as max_memory: in the config)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill", description="Knowledge distillation: teacher → student, measured honestly."
    )
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run an experiment from a YAML config")
    run.add_argument("config", type=Path, help="experiment config (YAML)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )
    run.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    run.add_argument(
        "--processes",
        type=int,
        default=None,
        metavar="N",
        help="train in N local processes (DDP through Accelerate; one per GPU, or gloo on CPU)",
    )
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    run.add_argument("--quiet", action="store_true", help="print only the final table")
    _add_max_memory(run)

    demo = sub.add_parser(
        "demo", help="distil a CNN on Fashion-MNIST (or, with `text`, MiniLM on BBC News) and compare with scratch"
    )
    demo.add_argument(
        "which", nargs="?", choices=("image", "text", "lm"), default="image",
        help="image: a CNN on Fashion-MNIST (default); text: all-MiniLM-L6-v2 on BBC News, a 2-layer student cut "
        "from it (needs the text extra); lm: SmolLM2-135M on BBC News text, a 6-layer student cut from it "
        "(needs `make setup`)",
    )  # fmt: skip
    demo.add_argument(
        "--quick", action="store_true", help="a smoke test (well under 2 minutes) instead of the full demo"
    )
    demo.add_argument("--out", type=Path, default=Path("runs"), help="parent directory of the run (default: runs)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--quiet", action="store_true")
    _add_max_memory(demo)

    cache = sub.add_parser(
        "cache", help="run the teacher once and store its top-k signals, so students train without it"
    )
    cache.add_argument("config", type=Path, help="experiment config (YAML) with a train or checkpoint teacher")
    cache.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cache.add_argument("--overwrite", action="store_true", help="rebuild a cache made with another teacher or data")
    cache.add_argument("--quiet", action="store_true")
    _add_max_memory(cache)

    generate = sub.add_parser(
        "generate", help="a teacher LM answers a prompt file: JSONL training data for sequence-level distillation"
    )
    generate.add_argument("--teacher", required=True, help="causal-LM directory or builtin:SmolLM2-135M-Instruct")
    generate.add_argument(
        "--prompts", type=Path, required=True, help=".txt (one per line) or .jsonl (prompt or messages)"
    )
    generate.add_argument(
        "--out", type=Path, required=True, help="output JSONL (a .manifest.json is written beside it)"
    )
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1.0)")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0, help="0: off")
    generate.add_argument("--samples", type=int, default=1, help="responses per prompt")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--batch-size", type=int, default=8, help="prompts per generation call")
    generate.add_argument("--max-prompt-tokens", type=int, default=1024)
    generate.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                          help="apply the chat template to plain prompts (default: when the tokenizer has one)")  # fmt: skip
    generate.add_argument("--prompt-column", default="prompt")
    generate.add_argument("--messages-column", default="messages")
    generate.add_argument("--keep-duplicates", action="store_true", help="keep identical responses to one prompt")
    generate.add_argument("--keep-empty", action="store_true", help="keep empty responses")
    generate.add_argument("--drop-truncated", action="store_true", help="drop responses cut off by --max-new-tokens")
    generate.add_argument(
        "--signals", type=int, default=0, metavar="K",
        help="also store the teacher's top-K logits of every response token, for `distill cache` (0: off)",
    )  # fmt: skip
    generate.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda:1, ...")
    generate.add_argument(
        "--processes", type=int, default=None, metavar="N",
        help="generate in N local processes (one per GPU, or CPU slots); the output is the same as one process's",
    )  # fmt: skip
    generate.add_argument("--trust-remote-code", action="store_true", help="run the model directory's own code")
    generate.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    generate.add_argument("--quiet", action="store_true")

    sub.add_parser("methods", help="list the available loss terms and their parameters")

    export = sub.add_parser("export", help="a finished text run's student as a Hugging Face directory or ONNX")
    export.add_argument("run", type=Path, metavar="RUN", help="the run directory")
    export.add_argument("--format", choices=("hf", "onnx"), default="hf")
    export.add_argument("--out", type=Path, default=None, help="where to write (default: RUN/export-FORMAT)")

    comp = sub.add_parser(
        "compare", help="one table across finished runs, and a report with the accuracy–latency front"
    )
    comp.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    comp.add_argument(
        "--out", type=Path, default=Path("runs/compare.html"), help="comparison report (default: runs/compare.html)"
    )

    for name, text, example in (
        ("chain", "distil through teacher assistants (config section chain:), beside direct KD", "chain.assistants=2"),
        ("sweep", "distil a family of students (section sweep:), mark the Pareto fronts", "sweep.widths=[0.5,1,2]"),
        ("tune", "search temperature, alpha, weights, lr on validation (section tune:)", "tune.trials=10"),
    ):
        many = sub.add_parser(name, help=text)
        many.add_argument("config", type=Path, help=f"experiment config (YAML) with a {name}: section")
        many.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=f"e.g. --set {example}"
        )
        if name != "tune":
            many.add_argument("--resume", action="store_true", help="continue, reusing the finished experiments")
        many.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
        many.add_argument("--quiet", action="store_true", help="print only the final table")
        _add_max_memory(many)
    return parser


def _methods(console: Console) -> None:
    from distill.core.losses import TERMS

    for name, cls in sorted(TERMS.items()):
        params = ", ".join(_describe_parameter(field, info) for field, info in cls.Params.model_fields.items())
        console.print(
            f"[bold]{name}[/]  {cls.summary}" + (f"\n    parameters: {params}" if params else ""), highlight=False
        )


def _generate_spec(args: argparse.Namespace):
    """``distill generate``'s options as a :class:`GenerateSpec`; a bad value is one line naming its option."""
    from pydantic import ValidationError

    from distill.tasks.lm_generate import GenerateSpec

    values = {
        "teacher": args.teacher, "prompts": args.prompts, "prompt_column": args.prompt_column,
        "messages_column": args.messages_column, "chat": args.chat, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "samples": args.samples,
        "seed": args.seed, "batch_size": args.batch_size, "max_prompt_tokens": args.max_prompt_tokens,
        "dedupe": not args.keep_duplicates, "drop_empty": not args.keep_empty, "drop_truncated": args.drop_truncated,
        "trust_remote_code": args.trust_remote_code, "signals": args.signals, "device": args.device,
    }  # fmt: skip
    try:
        return GenerateSpec(**values)
    except ValidationError as err:
        first = err.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "generate"
        raise DistillError(f"{option}: {first['msg'].removeprefix('Value error, ')}") from None


def _describe_parameter(field: str, info) -> str:
    """``temperature=4.0``, or for a required one ``student (required: student module to tap, e.g. features.1)``."""
    if info.is_required():
        return f"{field} (required{': ' + info.description if info.description else ''})"
    return f"{field}={info.default!r}"


def _run_workflow(
    command: str,
    config_path: Path,
    overrides: list[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console,
    summary_console: Console | None = None,
) -> Path:
    """``distill chain|sweep|tune CONFIG``: load, run, print the summary; returns the run directory."""
    from distill.workflows.common import load_with_section

    summary_console = summary_console or console
    if command == "chain":
        from distill.workflows.chain import ChainSpec, print_chain, run_chain

        config, spec = load_with_section(config_path, overrides, "chain", ChainSpec)
        result = run_chain(config, spec, resume=resume, overwrite=overwrite, console=console)
        print_chain(summary_console, result)
    elif command == "sweep":
        from distill.workflows.sweep import SweepSpec, print_sweep, run_sweep

        config, spec = load_with_section(config_path, overrides, "sweep", SweepSpec)
        result = run_sweep(config, spec, resume=resume, overwrite=overwrite, console=console)
        print_sweep(summary_console, result)
    elif command == "tune":
        from distill.workflows.tune import TuneSpec, print_tune, run_tune

        config, spec = load_with_section(config_path, overrides, "tune", TuneSpec)
        result = run_tune(config, spec, overwrite=overwrite, console=console)
        print_tune(summary_console, result)
    else:
        raise ValueError(f"unknown command {command!r}")
    return result.run_dir


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _without_processes(argv: list[str]) -> list[str]:
    """The command line minus ``--processes N`` (each launched process runs as one of N)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def script() -> int:
    """The ``distill`` command: :func:`main`, then a quicker exit.

    Why ``gc.freeze()``: the interpreter's last garbage collections at exit walk every object
    that torch and its imports created, about a second on a 2-core machine; frozen, they are
    skipped (0.25 s). Objects are still released and every atexit handler still runs. Not in
    :func:`main`, which a long-lived process (a notebook, a test session) may call many times."""
    code = main()
    gc.freeze()
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "max_memory", None) is not None:  # a config setting like any other
        args.overrides = [*args.overrides, f"max_memory={args.max_memory}"]
    # logs and pipes get long lines rather than rich's default of 80 folded columns
    console = Console(quiet=getattr(args, "quiet", False), width=None if sys.stdout.isatty() else 160)
    try:
        if args.command in ("cache", "chain", "sweep", "tune"):
            from distill.train.distributed import launched_distributed

            if launched_distributed():
                raise DistillError(
                    f"distill {args.command} runs in one process; launch it without torchrun or accelerate "
                    f"(only `distill run` and `distill generate` run in several processes)"
                )
        if args.command == "methods":
            _methods(console)
            return 0
        if args.command == "generate":
            from distill.tasks.lm_generate import generate_dataset
            from distill.train.distributed import Parallel, launch, launched_distributed

            spec = _generate_spec(args)  # a bad option fails here, before any launch
            if args.processes is not None and args.processes < 1:
                raise DistillError("--processes must be at least 1")
            if args.processes is not None and args.processes > 1:
                return launch(args.processes, _without_processes(argv if argv is not None else sys.argv[1:]))
            parallel = Parallel(cpu=not torch_cuda()) if launched_distributed() else None
            if parallel is not None and not parallel.is_main:
                console = Console(quiet=True)
            try:
                generate_dataset(
                    spec, args.out, overwrite=args.overwrite, console=console,
                    **({"rank": parallel.rank, "world": parallel.world, "barrier": parallel.barrier}
                       if parallel is not None else {}),
                )  # fmt: skip
                if parallel is not None:
                    parallel.finish()
            except KeyboardInterrupt:
                print("distill: interrupted; run the same command again to continue", file=sys.stderr)
                return 130
            return 0
        if args.command == "export":
            from distill.pipeline.export import export_hf, export_onnx

            out = args.out or args.run / f"export-{args.format}"
            if args.format == "hf":
                console.print(f"exported: {export_hf(args.run, out)} (loads with transformers alone)")
            else:
                facts = export_onnx(args.run, out)
                console.print(
                    f"exported: {out}/model.onnx; largest difference from PyTorch {facts['max_abs_difference']:.1e}; "
                    + ", ".join(
                        f"{k.replace('_ms_', ' ms ').replace('_', ' ')} {v:.2f}"
                        for k, v in facts.items()
                        if "_ms_" in k
                    )
                )
            return 0
        if args.command == "compare":
            from distill.report.compare import compare

            compare(args.runs, args.out, console)
            return 0
        if args.command in ("chain", "sweep", "tune"):
            try:
                _run_workflow(
                    args.command, args.config, args.overrides, resume=getattr(args, "resume", False),
                    overwrite=args.overwrite, console=console,
                    summary_console=Console(width=None if sys.stdout.isatty() else 160) if args.quiet else None,
                )  # fmt: skip
            except KeyboardInterrupt:
                again = "start over with --overwrite" if args.command == "tune" else "continue with --resume"
                print(f"distill: interrupted; {again}", file=sys.stderr)
                return 130
            return 0
        from distill.pipeline.config import load_config
        from distill.pipeline.experiment import run_experiment

        if args.command == "cache":
            from distill.pipeline.experiment import cache_teacher

            config = load_config(args.config, args.overrides)
            path = cache_teacher(config, overwrite=args.overwrite, console=console)
            print(
                f"teacher cache ready: {path}\ntrain from it with: distill run {args.config} "
                f"--set teacher='{{kind: cache, path: {path}}}'"
            )
            return 0

        if args.command == "run":
            config = load_config(args.config, args.overrides)  # a bad config fails here, before any launch
            if args.processes is not None and args.processes > 1:
                from distill.train.distributed import launch

                return launch(args.processes, _without_processes(argv if argv is not None else sys.argv[1:]))
            result = run_experiment(config, resume=args.resume, overwrite=args.overwrite, console=console)
        else:
            file, quick, name = DEMOS[args.which]
            demo_file = resources.files("distill") / "configs" / file
            with resources.as_file(demo_file) as path:
                config = load_config(path, (quick if args.quick else []) + args.overrides)
            name += "-quick" if args.quick else ""
            config.output.dir, config.output.name = args.out.resolve(), name
            # the demo resumes an interrupted demo by itself and replaces an earlier one
            result = run_experiment(config, resume=True, overwrite=True, console=console)
        if args.quiet and result.metrics:  # empty in the non-main processes of a distributed run
            from distill.report.markdown import print_summary

            print_summary(Console(width=None if sys.stdout.isatty() else 160), result.metrics, result.run_dir)
        return 0
    except DistillError as err:
        print(f"distill: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unreadable paths, full disks: say which file, no traceback
        print(f"distill: error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "run `distill demo` again" if args.command == "demo" else "continue with `distill run CONFIG --resume`"
        print(f"distill: interrupted; {again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
