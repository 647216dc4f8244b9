"""TEST DOUBLE for the destination agent program (``dest-agent serve``), used until/unless the
real agents run: same argv shape (``serve --listen HOST:PORT [--psk-file F]``), same startup
line on stderr, and it echoes bytes so the fake run_point can measure the RTT through the
injector. It never touches /dev/kvm; it stands in for the agent layer only.

Environment knobs for failure tests:
  FAKE_DEST_EXIT_AFTER=N   exit with status 7 after N connections (a destination dying mid-sweep)
  FAKE_DEST_REFUSE=1       exit with status 2 before serving (a destination that cannot start)
"""

import os
import socket
import sys
import threading


def echo(connection):
    with connection:
        while data := connection.recv(65536):
            connection.sendall(data)


def main():
    args = sys.argv[1:]
    assert args[0] == "serve", args
    host, port = args[args.index("--listen") + 1].rsplit(":", 1)
    if "--psk-file" in args:
        with open(args[args.index("--psk-file") + 1]) as key:
            assert len(key.read().strip()) >= 16
    if os.environ.get("FAKE_DEST_REFUSE"):
        print("dest-agent: error: refusing to start (FAKE_DEST_REFUSE)", file=sys.stderr, flush=True)
        sys.exit(2)
    exit_after = int(os.environ.get("FAKE_DEST_EXIT_AFTER", "0"))
    server = socket.create_server((host, int(port)))
    bound = server.getsockname()
    print(f"dest-agent: serving on {bound[0]}:{bound[1]} (fake, max 4 sessions)", file=sys.stderr,
          flush=True)
    served = 0
    while True:
        connection, _ = server.accept()
        threading.Thread(target=echo, args=(connection,), daemon=True).start()
        served += 1
        if exit_after and served >= exit_after:
            print("dest-agent: fake exiting", file=sys.stderr, flush=True)
            os._exit(7)


if __name__ == "__main__":
    main()
