"""Build steps pyproject.toml cannot express (metadata lives there).

1. ``cffi_modules``: kvmcore's ioctl bindings (kvmcore/_build.py), compiled
   in API mode against <linux/kvm.h>.
2. The guest program: kvmcore/guest_program/*.{S,c} assembled, compiled freestanding
   and linked into a flat image ``kvmcore/guest.bin`` (package data). It is
   built by ``build_ext`` so that both ``pip install .`` (into build_lib) and
   ``pip install -e .`` (in place, next to the sources) get it.
"""

from __future__ import annotations

import os
import subprocess

from setuptools import setup
from setuptools.command.build_ext import build_ext

GUEST_SRC = os.path.join("kvmcore", "guest_program")
GUEST_CFLAGS = [
    "-ffreestanding", "-fno-builtin", "-fno-pic", "-fno-pie", "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables", "-fcf-protection=none",
    # No red zone: nothing may write below %rsp unannounced. General registers
    # only: the guest then has no FPU/SSE state that migration must carry.
    "-mno-red-zone", "-mgeneral-regs-only",
    "-O2", "-Wall", "-Wextra", "-Werror",
]


def build_guest(temp_dir: str, out_path: str) -> None:
    """Compile and link guest.bin; commands are echoed, failures stop the install."""
    os.makedirs(temp_dir, exist_ok=True)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)

    def src(name: str) -> str:
        return os.path.join(GUEST_SRC, name)

    def tmp(name: str) -> str:
        return os.path.join(temp_dir, name)

    steps = [
        ["gcc", *GUEST_CFLAGS, "-c", src("entry.S"), "-o", tmp("entry.o")],
        ["gcc", *GUEST_CFLAGS, "-c", src("guest.c"), "-o", tmp("guest.o")],
        ["cpp", "-P", "-undef", "-D__ASSEMBLER__", "-I", GUEST_SRC, src("guest.lds.S"),
         "-o", tmp("guest.lds")],
        ["ld", "-nostdlib", "-static", "-no-pie", "--build-id=none", "-T", tmp("guest.lds"),
         tmp("entry.o"), tmp("guest.o"), "-o", tmp("guest.elf")],
        ["objcopy", "-O", "binary", tmp("guest.elf"), out_path],
    ]
    for argv in steps:
        print(" ".join(argv))
        subprocess.run(argv, check=True)


class BuildExtWithGuest(build_ext):
    """build_ext that also builds the guest image beside the extension."""

    def run(self) -> None:
        super().run()
        targets = [os.path.join(self.build_lib, "kvmcore", "guest.bin")]
        if self.inplace or getattr(self, "editable_mode", False):
            targets.append(os.path.join("kvmcore", "guest.bin"))
        build_guest(os.path.join(self.build_temp, "guest"), targets[0])
        for extra in targets[1:]:
            self.copy_file(targets[0], extra)

    def get_outputs(self) -> list[str]:
        return [*super().get_outputs(), os.path.join(self.build_lib, "kvmcore", "guest.bin")]


setup(
    cffi_modules=["kvmcore/_build.py:ffi"],
    cmdclass={"build_ext": BuildExtWithGuest},
)
