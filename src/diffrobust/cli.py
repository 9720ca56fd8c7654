"""Command-line entry point: `diffrobust <subcommand>`; the Snakemake rules call these."""

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="diffrobust")
    parser.add_subparsers(dest="command", required=True)
    args = parser.parse_args(argv)
    return 0
