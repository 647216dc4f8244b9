"""``python sweep_script.py NAME ...``: the sweep command with the agent-layer TEST DOUBLES plugged in.

Runs the real CLI code path (options, signal handling, topology, output) in a
separate process, so tests can press Ctrl-C (SIGINT) and read the exit code.
FAKE_AGENT_SLEEP sets the fake migration's duration.
"""

import argparse
import os
import sys
from functools import partial

import trio
from fakes import FakeAgent, fake_dest_argv  # beside this script: sys.path[0]

from source_agent.sweep import cli

parser = argparse.ArgumentParser(prog="source-agent")
cli.add_parser(parser.add_subparsers(dest="command"))
args = parser.parse_args(["sweep", *sys.argv[1:]])
agent = FakeAgent(sleep=float(os.environ.get("FAKE_AGENT_SLEEP", "0")))
sys.exit(trio.run(partial(cli.run, args, run_point=agent, dest_argv=fake_dest_argv)))
