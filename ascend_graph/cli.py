"""The ascend-graph command line (build, inspect, verify, clear, bench)."""
import sys


def main(argv=None) -> int:
    print("ascend-graph: no commands yet", file=sys.stderr)
    return 2
