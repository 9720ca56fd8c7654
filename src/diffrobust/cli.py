"""Command-line entry point: `diffrobust <subcommand>` (or `python -m diffrobust`).

Every Snakemake rule is one call of one subcommand; all logic lives in the library modules. Structured arguments
(settings blocks of the config, notebook parameters) travel as JSON strings. Errors meant for the user exit with
status 1 and a one-paragraph message instead of a traceback.
"""

import argparse
import json
import logging
import sys

log = logging.getLogger("diffrobust")


def _json(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None


# --- subcommands -------------------------------------------------------------------------------------------------


def cmd_prepare_dataset(args):
    from diffrobust import data
    from diffrobust.provenance import run_record

    settings = args.settings
    with run_record(args.run_record, config={"dataset": args.dataset, "settings": settings, "subsets": args.subsets},
                    seed=settings.get("split_seed")) as record:
        if args.dataset == "mnist":
            meta = data.prepare_mnist(args.out_dir, settings["test_per_class"], settings["split_seed"], settings["pad_to"])
        elif args.dataset == "cifar10":
            meta = data.prepare_cifar10(args.out_dir, args.source, settings.get("md5"))
        else:
            indices = data.all_subset_indices(args.subsets, data.EVAL_SPLIT_SIZE["imagenet"])
            meta = data.prepare_imagenet(args.out_dir, settings["val_dir"], indices, settings["image_size"])
        record["splits"] = meta["splits"]
    log.info("prepared %s in %s: %s", args.dataset, args.out_dir,
             {name: split["count"] for name, split in meta["splits"].items()})


def cmd_fetch(args):
    from diffrobust.download import fetch
    from diffrobust.provenance import run_record

    with run_record(args.run_record, config=vars(args) | {"func": None}) as record:
        record["verified"] = fetch(args.url, args.dest, sha256=args.sha256, md5=args.md5, size=args.size,
                                   lock=args.lock, lock_key=args.lock_key, manual_hint=args.manual)
    log.info("verified %s", args.dest)


def cmd_render_notebook(args):
    from diffrobust.provenance import run_record
    from diffrobust.reports import render_notebook

    with run_record(args.run_record, config={"notebook": args.notebook, "parameters": args.parameters}):
        render_notebook(args.notebook, args.parameters, args.ipynb, args.html)
    log.info("rendered %s -> %s", args.notebook, args.html)


def cmd_check_config(args):
    from diffrobust.config import load_config

    overrides = {"preset": args.preset} | args.overrides
    config = load_config(overrides)
    print(json.dumps(config, indent=2))


# --- parser ------------------------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(prog="diffrobust", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = commands.add_parser("prepare-dataset", help="write a dataset's splits.npz and meta.json")
    prepare.add_argument("--dataset", required=True, choices=["mnist", "cifar10", "imagenet"])
    prepare.add_argument("--out-dir", required=True)
    prepare.add_argument("--settings", type=_json, default={}, help="the datasets.<name> config block (JSON)")
    prepare.add_argument("--subsets", type=_json, default={}, help="the subsets config block (JSON; ImageNet keeps only these)")
    prepare.add_argument("--source", help="input file (CIFAR-10 tarball)")
    prepare.add_argument("--run-record", help="where to write the run record (JSON)")
    prepare.set_defaults(func=cmd_prepare_dataset)

    fetch = commands.add_parser("fetch", help="download one file with resume, retries and checksum verification")
    fetch.add_argument("--url", action="append", default=[], help="URL (repeat for mirrors); none = place by hand")
    fetch.add_argument("--dest", required=True)
    fetch.add_argument("--sha256")
    fetch.add_argument("--md5")
    fetch.add_argument("--size", type=int)
    fetch.add_argument("--lock", help="lock file recording the sha256 seen at first download")
    fetch.add_argument("--lock-key")
    fetch.add_argument("--manual", help="what to do by hand if the file cannot be fetched")
    fetch.add_argument("--run-record")
    fetch.set_defaults(func=cmd_fetch)

    render = commands.add_parser("render-notebook", help="execute a notebook with papermill and render HTML")
    render.add_argument("--notebook", required=True)
    render.add_argument("--parameters", type=_json, default={})
    render.add_argument("--ipynb", required=True)
    render.add_argument("--html", required=True)
    render.add_argument("--run-record")
    render.set_defaults(func=cmd_render_notebook)

    check = commands.add_parser("check-config", help="print the merged, validated config of a preset")
    check.add_argument("--preset", default="mini")
    check.add_argument("--overrides", type=_json, default={})
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv=None):
    from diffrobust.config import ConfigError
    from diffrobust.data import DataError
    from diffrobust.download import DownloadError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except (ConfigError, DataError, DownloadError) as error:
        print(f"diffrobust {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0
