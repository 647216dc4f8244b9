"""The pair: two lane machines ("src" and "dst") with their own kernels, clocks and TSCs.

tools/pair.py is the command (`./dev pair`); docs/pair.md explains it. Modules: `timeref` (the
time reference, pure), `scenario` (options and scripts, pure), `machine` (one QEMU machine and its
control channel), `run` (booting the pair and running scenarios), `cli` (the command),
`guest_agent` (runs inside each machine).
"""
