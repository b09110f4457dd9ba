"""Microseconds per ``parse()`` of sipp's OPTIONS, in-process: the worker's largest per-message cost.

    python3 bench/parsebench.py                 # this checkout
    python3 bench/parsebench.py --repo CLONE    # another checkout (a clone at another commit)

Prints the median of a few rounds, so two checkouts can be compared on one machine in one sitting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

#: What sipp's built-in OPTIONS scenario sends (bench/scenarios/options_uac.xml), as framed bytes.
OPTIONS = (
    b"OPTIONS sip:service@127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:5090;branch=z9hG4bK-1234-1-0;rport\r\n"
    b"From: sipp <sip:sipp@127.0.0.1:5090>;tag=1234SIPpTag001\r\n"
    b"To: sut <sip:service@127.0.0.1:5060>\r\n"
    b"Call-ID: 1-1234@127.0.0.1\r\nCSeq: 1 OPTIONS\r\n"
    b"Contact: sip:sipp@127.0.0.1:5090;transport=tcp\r\nMax-Forwards: 70\r\n"
    b"Subject: Performance Test\r\nContent-Length: 0\r\n\r\n"
)
#: Parses per round and rounds: about a second in all on this project's machines.
PARSES = 20000
ROUNDS = 5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent, help="checkout to time")
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo))
    from sipwire.transport.sip import parse  # from the checkout named on the command line

    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(PARSES):
            parse(OPTIONS)
        rounds.append((time.perf_counter() - started) / PARSES * 1e6)
    print(f"parse() of an OPTIONS: {statistics.median(rounds):.1f} us (median of {ROUNDS} x {PARSES}), {args.repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
