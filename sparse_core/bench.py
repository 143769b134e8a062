"""Kernel and decode benchmarks (filled in by the kernels work)."""


def add_arguments(parser):
    parser.add_argument("what", choices=["kernels", "decode"])


def run(args):
    raise SystemExit("bench is not implemented yet")
