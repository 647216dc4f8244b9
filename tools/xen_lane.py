#!/usr/bin/env python3
"""The kernel Xen lane: boot a kernel with KVM Xen under QEMU/TCG and run a command inside it.

The machine's own kernel lacks CONFIG_KVM_XEN, but a Debian 6.12 kernel that has it boots under QEMU's
software emulation with AMD SVM exposed, and KVM (with Xen) works inside it. This tool fetches and
caches such a kernel, builds a small busybox initramfs (tools/lane_init.sh is its /init), shares
the host root read-only and a results directory read-write over 9p, and runs the command in a chroot of
the host root: the same paths, virtualenv and checkout as outside. The command's exit status is ours.

Exit status: the command's own; 2 for bad usage or an unsuitable kernel; 124 when --timeout passes
(QEMU is killed); 125 when the lane itself failed (a kernel oops twice, or no status written).
See docs/xen-lane.md.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import json
import lzma
import os
import pwd
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
INIT_SCRIPT = HERE / "lane_init.sh"

EXIT_USAGE, EXIT_TIMEOUT, EXIT_LANE = 2, 124, 125

# What the lane needs from a kernel: KVM Xen itself, and for each module /init loads (the dependency
# chain — irqbypass, ccp, netfs, 9pnet — comes from the modules' own `depends`), the config symbol
# that decides whether it is a module (=m, must be loaded) or built in (=y, nothing to load).
REQUIRED_BUILTIN = "CONFIG_KVM_XEN"
ROOT_MODULES = {
    "kvm_amd": "CONFIG_KVM_AMD",
    "9pnet_virtio": "CONFIG_NET_9P_VIRTIO",
    "9p": "CONFIG_9P_FS",
    "sch_netem": "CONFIG_NET_SCH_NETEM",
    "veth": "CONFIG_VETH",  # the agents' two-namespace topology (source_agent.netem.open_topology)
    "virtio_net": "CONFIG_VIRTIO_NET",  # the pair's link (tools/xen_pair.py); brings net_failover
}

DEBIAN_SUITE = "bookworm-backports"
# bookworm-backports names them 6.12.N+deb12-amd64, trixie 6.12.N+deb13-amd64; the newest build
# sometimes exists only as -unsigned (same kernel, no Secure Boot signature: irrelevant here).
KERNEL_PACKAGE = re.compile(r"^linux-image-6\.12\.(\d+)\+deb1[23]-amd64(-unsigned)?$")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

# Lines that mean the guest kernel is no longer trustworthy. WARN splats are left out on purpose:
# they do not stop the kernel, and a test may provoke one legitimately.
OOPS_PATTERNS = re.compile(
    r"Kernel panic - not syncing|\bOops\b|\bBUG: |general protection fault|invalid opcode:"
    r"|Unable to handle kernel|\bint3: 0000"
)


class LaneError(Exception):
    """A failure of the lane itself (not of the command); carries the exit status to use."""

    def __init__(self, message: str, status: int = EXIT_LANE) -> None:
        super().__init__(message)
        self.status = status


def progress(message: str) -> None:
    print(f"[xen-lane] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Pure parts (unit-tested in tests/xen/test_xen_lane_tool.py)


def parse_kernel_config(text: str) -> dict[str, str]:
    """CONFIG_X=value pairs of a kernel .config; `# CONFIG_X is not set` lines are simply absent."""
    config = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name.startswith("CONFIG_"):
            config[name] = value
    return config


def check_kernel_config(text: str) -> dict[str, bool]:
    """Verify a kernel config suits the lane; return, per root module, whether it must be loaded.

    Raises LaneError (status 2) naming every missing symbol: a kernel without CONFIG_KVM_XEN=y would
    boot fine and only fail deep inside the tests, so it is refused up front.
    """
    config = parse_kernel_config(text)
    problems = []
    if config.get(REQUIRED_BUILTIN) != "y":
        problems.append(f"{REQUIRED_BUILTIN}=y (found {config.get(REQUIRED_BUILTIN, 'not set')})")
    loadable = {}
    for module, symbol in ROOT_MODULES.items():
        value = config.get(symbol)
        if value not in ("y", "m"):
            problems.append(f"{symbol}=y or =m (found {value or 'not set'})")
        loadable[module] = value == "m"
    if problems:
        raise LaneError("kernel unsuitable for the Xen lane: needs " + ", ".join(problems), EXIT_USAGE)
    return loadable


def module_name(name: str) -> str:
    """The kernel treats '-' and '_' in module names alike; so do we (kvm-amd == kvm_amd)."""
    return name.replace("-", "_")


def module_load_order(depends: Mapping[str, Sequence[str]], roots: Iterable[str]) -> list[str]:
    """Modules to insmod, each after its dependencies (depth-first post-order over `depends`).

    `depends` maps a module to its direct dependencies (modinfo's `depends` field); a module missing
    from the mapping is an error, since insmod (unlike modprobe) resolves nothing by itself.
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise LaneError(f"module dependency cycle through {name}")
        if name not in depends:
            raise LaneError(f"module {name} not found")
        visiting.add(name)
        for dep in depends[name]:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for root in roots:
        visit(root)
    return order


def find_oops(console: str) -> str | None:
    """The first console line showing a kernel oops or panic, or None for a clean transcript."""
    for line in console.splitlines():
        if OOPS_PATTERNS.search(line):
            return line.strip()
    return None


MARKER = re.compile(r"XENLANE-(INIT|BEGIN|END|FAIL) ")
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[A-Za-z])")


def console_line(raw: bytes) -> str:
    """A console line as text, without the terminal resets SeaBIOS and the kernel emit."""
    return ANSI_ESCAPE.sub("", raw.decode(errors="replace")).rstrip("\r")


@dataclasses.dataclass
class ConsoleScanner:
    """Follows /init's markers on the console: when each first came (seconds since QEMU started),
    and which lines are the command's output (those between BEGIN and END)."""

    marks: dict[str, float] = dataclasses.field(default_factory=dict)
    streaming: bool = False

    def feed(self, line: str, elapsed: float) -> tuple[str | None, bool]:
        """(the marker on this line or None, whether the line is the command's output)."""
        # Before the command, a marker may follow BIOS output left without a newline; while it
        # runs, only a whole line is /init's END (the command may print the word itself).
        marker = (MARKER.match if self.streaming else MARKER.search)(line)
        if not marker:
            return None, self.streaming
        self.marks.setdefault(marker.group(1), elapsed)
        self.streaming = marker.group(1) == "BEGIN"
        return marker.group(1), False

    def times(self) -> tuple[float | None, float | None, float | None]:
        return self.marks.get("INIT"), self.marks.get("BEGIN"), self.marks.get("END")


def qemu_escape(path: str | Path) -> str:
    """QEMU option values separate on commas; a literal comma is written twice."""
    return str(path).replace(",", ",,")


def qemu_command(
    kernel: Path, initrd: Path, results: Path, *, qemu: str = "qemu-system-x86_64", smp: int = 2,
    memory_mb: int = 2048,
) -> list[str]:
    """The QEMU invocation of nested-xen-lane.md: TCG (host KVM cannot nest SVM here), -cpu max for
    SVM, -smp 2 (with one vCPU the vCPU thread is preempted and shows "runnable" time nobody expects),
    oops=panic so a broken guest stops at once (and QEMU exits: panic=-1 reboots, -no-reboot exits)."""
    return [
        qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(smp), "-m", str(memory_mb),
        "-machine", "q35", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 oops=panic quiet",
        "-nic", "none", "-nographic", "-no-reboot", "-serial", "mon:stdio",
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=results,path={qemu_escape(results)},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=results,mount_tag=results",
    ]


def lane_environment(host_env: Mapping[str, str], scratch: Path, pycache: Path) -> dict[str, str]:
    """The command's whole environment inside (it starts from nothing: `env -i`).

    The root is read-only in there: HOME and hypothesis' database go to the writable scratch dir,
    TMPDIR to the guest's tmpfs, and no bytecode is written; bytecode (pytest's assertion-rewritten
    modules included) is read from `pycache`, filled on the host beforehand (see warm_bytecode).
    KVM_TESTBED_LANE=xen tells the tests where they are; KVM_TESTBED_* and PYTEST_ADDOPTS pass
    through so a user can steer them.
    """
    env = {
        "PYTHONPYCACHEPREFIX": str(pycache),
        "PATH": host_env.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
        "HOME": str(scratch / "home"),
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "HYPOTHESIS_STORAGE_DIRECTORY": str(scratch / "hypothesis"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for name, value in host_env.items():
        if name.startswith("KVM_TESTBED_") or name in ("PYTHONPATH", "PYTEST_ADDOPTS"):
            env[name] = value
    env["KVM_TESTBED_LANE"] = "xen"
    env.pop("KVM_TESTBED_RUN_LANE", None)  # never boot a lane from inside the lane
    return env


def job_script(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    """The POSIX sh script /init runs in the chroot: cwd, a clean environment, then the command."""
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    return (
        "# Written by tools/xen_lane.py; run by /init inside the lane.\n"
        f"mkdir -p {shlex.quote(env['HOME'])} || exit 125\n"
        f"cd {shlex.quote(str(cwd))} || exit 125\n"
        f"exec env -i {assignments} {shlex.join(argv)}\n"
    )


def tmp_binds(paths: Iterable[str | Path]) -> list[str]:
    """The top-level directories of /tmp that ``paths`` live under. The lane gives the guest a
    fresh writable /tmp; these (a checkout, a virtualenv, results: CI may clone under /tmp) are
    bound back into it read-only, and nothing else of the host's /tmp is (a stale
    /tmp/pytest-of-root would be read-only inside and break pytest's tmp_path)."""
    names = []
    for path in paths:
        parts = Path(os.path.abspath(path)).parts
        if len(parts) > 2 and parts[:2] == ("/", "tmp") and parts[2] not in names:
            names.append(parts[2])
    return names


def default_command(python: str) -> list[str]:
    """The project's kernel-Xen tests. -P keeps the checkout off sys.path, so the installed package
    is tested (as ./dev test does); the root is read-only, hence no cache provider."""
    return [python, "-P", "-m", "pytest", "-m", "xen_lane", "tests/xen", "-q", "-rA",
            "-p", "no:cacheprovider"]


def debian_mirror(sources: Iterable[str]) -> str:
    """The Debian archive the machine already uses, from the text of its apt sources (one-line
    `deb URI suite ...` and deb822 `URIs:` forms); the security archive is not a mirror of it."""
    for text in sources:
        for match in re.finditer(r"^\s*(?:deb\s+(?:\[[^\]]*\]\s+)?|URIs:\s*)(\S+)", text, re.M):
            uri = match.group(1).rstrip("/")
            if uri.endswith("/debian"):
                return uri
    return DEFAULT_MIRROR


def newest_kernel_package(names: Iterable[str]) -> str | None:
    """The newest 6.12 amd64 kernel among package names (signed preferred over -unsigned)."""
    best: tuple[int, int, str] | None = None
    for name in names:
        match = KERNEL_PACKAGE.match(name.strip())
        if match:
            key = (int(match.group(1)), 0 if match.group(2) else 1, name.strip())
            best = max(best, key) if best else key
    return best[2] if best else None


def newc_archive(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """An initramfs (cpio "newc") from (path, mode, data) entries; for a character device, data is
    b"major:minor". Written here rather than with cpio(1) so /dev/console needs no mknod."""
    out = bytearray()

    def add(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        if mode & 0o170000 == 0o020000:
            major, minor = (int(x) for x in data.split(b":"))
            add(ino, name, mode, b"", (major, minor))
        else:
            add(ino, name, mode, data)
    add(0, "TRAILER!!!", 0, b"")
    return bytes(out)


def elf_is_static(head: bytes) -> bool:
    """True for an ELF64 executable without a PT_INTERP header (no dynamic loader needed): the
    initramfs has no libc, so a dynamically linked busybox would die as /init."""
    if head[:4] != b"\x7fELF" or head[4] != 2:
        return False
    phoff = int.from_bytes(head[0x20:0x28], "little")
    phentsize = int.from_bytes(head[0x36:0x38], "little")
    phnum = int.from_bytes(head[0x38:0x3A], "little")
    for i in range(phnum):
        start = phoff + i * phentsize
        if int.from_bytes(head[start:start + 4], "little") == 3:  # PT_INTERP
            return False
    return True


# ----------------------------------------------------------------------------------------------------
# Kernel: the cached Debian one, or the user's


@dataclasses.dataclass(frozen=True)
class Kernel:
    image: Path
    config_text: str
    modules_dir: Path | None
    label: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvm-testbed" / "xen-lane"


def run_checked(argv: Sequence[str], what: str, timeout: float, **kwargs) -> str:
    """Run a helper program; on failure, say what we were doing and show its stderr."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    except FileNotFoundError as e:
        raise LaneError(f"{what}: {argv[0]} is not installed (see .ci/xen-lane)", EXIT_USAGE) from e
    except subprocess.TimeoutExpired as e:
        raise LaneError(f"{what}: {argv[0]} took more than {timeout:.0f} s") from e
    if proc.returncode != 0:
        raise LaneError(f"{what}: {shlex.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def cached_kernel(root: Path) -> Kernel | None:
    """The cached kernel if every file still matches the manifest (else None: fetch again)."""
    manifest_path = root / "kernel" / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        kdir = manifest_path.parent
        for rel, digest in manifest["files"].items():
            if sha256_file(kdir / rel) != digest:
                progress(f"cached {rel} is corrupt: fetching again")
                return None
    except (OSError, ValueError, KeyError):
        return None
    kernel = Kernel(kdir / "vmlinuz", (kdir / "config").read_text(), kdir / "modules",
                    f"{manifest['package']} {manifest['version']} (cached)")
    try:
        module_files(kernel)
    except LaneError as e:  # cached by a version of the lane that loaded fewer modules
        progress(f"cached kernel lacks a module the lane loads ({e}): fetching again")
        return None
    return kernel


def apt_isolated(root: Path) -> list[str]:
    """apt options that confine it to our own sources list, lists, cache and (empty) status file,
    so the machine's apt state is neither read for sources nor written."""
    apt = root / "apt"
    for d in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    sources = [p.read_text(errors="replace") for p in
               [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
               if p.is_file()]
    if not DEBIAN_KEYRING.is_file():
        raise LaneError(f"{DEBIAN_KEYRING} missing (install debian-archive-keyring)", EXIT_USAGE)
    (apt / "sources.list").write_text(
        f"deb [signed-by={DEBIAN_KEYRING}] {debian_mirror(sources)} {DEBIAN_SUITE} main\n")
    return [
        "-o", f"Dir::Etc::SourceList={apt / 'sources.list'}",
        "-o", f"Dir::Etc::SourceParts={apt / 'sources.list.d'}",
        "-o", f"Dir::Etc::Preferences={apt / 'preferences'}",
        "-o", f"Dir::Etc::PreferencesParts={apt / 'preferences.d'}",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::State::status={apt / 'status'}",
        "-o", f"Dir::Cache={apt / 'cache'}",
        # Downloads into our own (user-owned) cache: no privilege drop to _apt needed.
        "-o", f"APT::Sandbox::User={pwd.getpwuid(os.geteuid()).pw_name}",
        "-o", "Acquire::Languages=none",
    ]


def fetch_debian_kernel(root: Path) -> Kernel:
    """Download the newest Debian 6.12 kernel package, verify it, and keep only what the lane uses:
    vmlinuz, config, and the needed modules decompressed (about 15 MB instead of 100+)."""
    opts = apt_isolated(root)
    progress(f"fetching the package index of {DEBIAN_SUITE}")
    run_checked(["apt-get", "-q", *opts, "update"], "apt-get update", 120)
    names = run_checked(["apt-cache", *opts, "pkgnames", "linux-image-6.12"], "apt-cache", 60)
    package = newest_kernel_package(names.splitlines())
    if package is None:
        raise LaneError(f"no linux-image-6.12.*-amd64 package in {DEBIAN_SUITE}")
    show = run_checked(["apt-cache", *opts, "show", package], "apt-cache show", 60)
    fields = dict(re.findall(r"^(Version|Filename|SHA256|Size): (.*)$", show.split("\n\n")[0], re.M))
    work = root / "download"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        progress(f"downloading {package} {fields['Version']} ({int(fields['Size']) >> 20} MiB)")
        run_checked(["apt-get", "-q", *opts, "download", f"{package}={fields['Version']}"],
                    "apt-get download", 600, cwd=work)
        deb = next(work.glob("*.deb"))
        if deb.stat().st_size != int(fields["Size"]) or sha256_file(deb) != fields["SHA256"]:
            raise LaneError(f"{deb.name} does not match the archive's size/SHA256")
        progress("extracting")
        run_checked(["dpkg-deb", "-x", str(deb), str(work / "x")], "dpkg-deb -x", 300)
        boot = work / "x" / "boot"
        release = next(boot.glob("vmlinuz-*")).name.removeprefix("vmlinuz-")
        config_text = (boot / f"config-{release}").read_text()
        check_kernel_config(config_text)  # refuse before caching anything
        mods = next(p for p in (work / "x" / "lib" / "modules" / release,
                                work / "x" / "usr" / "lib" / "modules" / release) if p.is_dir())
        staged = work / "kernel"
        (staged / "modules").mkdir(parents=True)
        shutil.copy(boot / f"vmlinuz-{release}", staged / "vmlinuz")
        (staged / "config").write_text(config_text)
        for path in module_files(Kernel(staged / "vmlinuz", config_text, mods, package)):
            rel = path.relative_to(mods)
            dest = staged / "modules" / rel.with_name(rel.name.removesuffix(".xz"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(read_module(path))
        files = {str(p.relative_to(staged)): sha256_file(p) for p in staged.rglob("*") if p.is_file()}
        (staged / "manifest.json").write_text(json.dumps({
            "package": package, "version": fields["Version"], "release": release,
            "deb_sha256": fields["SHA256"], "files": files}, indent=1))
        shutil.rmtree(root / "kernel", ignore_errors=True)
        staged.rename(root / "kernel")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kernel = cached_kernel(root)
    assert kernel is not None, "freshly cached kernel fails its own manifest"
    return dataclasses.replace(kernel, label=f"{package} {fields['Version']} (fetched)")


def user_kernel(image: Path, modules_dir: Path | None, config: Path | None) -> Kernel:
    """The user's kernel (e.g. one carrying the KVM_[GS]ET_CLOCK_GUEST series). Its config is
    needed to verify CONFIG_KVM_XEN: --config, or the usual places next to the image or modules."""
    if not image.is_file():
        raise LaneError(f"--kernel {image}: no such file", EXIT_USAGE)
    candidates = [config] if config else [
        image.with_name(image.name.replace("vmlinuz", "config")),
        image.parent / ".config", image.parents[min(3, len(image.parents) - 1)] / ".config",
        *([modules_dir / "build" / ".config", modules_dir / "config"] if modules_dir else []),
    ]
    found = next((c for c in candidates if c and c != image and c.is_file()), None)
    if found is None:
        raise LaneError(f"cannot verify CONFIG_KVM_XEN of {image}: pass its config with --config",
                        EXIT_USAGE)
    return Kernel(image, found.read_text(), modules_dir, f"{image} (config {found})")


def module_files(kernel: Kernel) -> list[Path]:
    """The module files to insmod, in dependency order (from each module's modinfo `depends`)."""
    loadable = check_kernel_config(kernel.config_text)
    roots = [m for m, load in loadable.items() if load]
    if not roots:
        return []
    if kernel.modules_dir is None or not kernel.modules_dir.is_dir():
        raise LaneError(f"{', '.join(roots)} are modules in this kernel: pass --modules DIR", EXIT_USAGE)
    index = {}
    for path in kernel.modules_dir.rglob("*.ko*"):
        if path.name.endswith((".ko", ".ko.xz")):
            index[module_name(path.name.split(".ko")[0])] = path
    depends: dict[str, list[str]] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in depends or name not in index:
            continue  # a missing module is reported by module_load_order, naming it
        out = run_checked(["modinfo", "-F", "depends", str(index[name])], f"modinfo {name}", 30)
        depends[name] = [module_name(d) for d in out.strip().split(",") if d]
        pending.extend(depends[name])
    try:
        return [index[name] for name in module_load_order(depends, roots)]
    except LaneError as e:
        raise LaneError(f"{e} under {kernel.modules_dir}", EXIT_USAGE) from None


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed (busybox insmod hands the file to init_module as is)."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def build_initramfs(kernel: Kernel, dest: Path, busybox: Path) -> None:
    head = busybox.read_bytes() if busybox.is_file() else b""
    if not elf_is_static(head[:65536]):
        raise LaneError(f"{busybox} is missing or not statically linked (install busybox-static)",
                        EXIT_USAGE)
    entries = [(d, 0o040755, b"") for d in
               ("bin", "dev", "proc", "sys", "tmp", "newroot", "results", "lib", "lib/lane-modules")]
    entries += [("dev/console", 0o020600, b"5:1"), ("bin/busybox", 0o100755, head),
                ("init", 0o100755, INIT_SCRIPT.read_bytes())]
    for i, path in enumerate(module_files(kernel)):
        name = module_name(path.name.split(".ko")[0])
        entries.append((f"lib/lane-modules/{i:02d}-{name}.ko", 0o100644, read_module(path)))
    dest.write_bytes(newc_archive(entries))


# ----------------------------------------------------------------------------------------------------
# Booting


@dataclasses.dataclass
class Boot:
    console: str
    timed_out: bool
    init_after: float | None  # seconds from QEMU start to /init's first line
    began_after: float | None  # ... to the command's start
    ended_after: float | None  # ... to the command's end


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILL if we die, even by SIGKILL, so no QEMU outlives the tool."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def boot(argv: Sequence[str], deadline: float, console_log: Path, *, echo: bool = True,
         started: Callable[[subprocess.Popen], None] | None = None) -> Boot:
    """Run QEMU until it exits or the deadline passes; log the console and stream the command's
    output (between /init's BEGIN and END markers) to our stdout as it comes (unless not `echo`).
    `started` gets the QEMU process (the pair kills a machine with it)."""
    start = time.monotonic()
    scanner = ConsoleScanner()
    buffer = b""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    except FileNotFoundError as e:
        raise LaneError(f"{argv[0]} is not installed (qemu-system-x86; see .ci/xen-lane)",
                        EXIT_USAGE) from e
    if started is not None:
        started(proc)
    try:
        with console_log.open("wb") as log, selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return Boot(log_text(console_log), True, *scanner.times())
                if not sel.select(min(remaining, 1.0)):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    line = console_line(raw)
                    marker, is_output = scanner.feed(line, time.monotonic() - start)
                    if is_output:
                        if echo:
                            print(line, flush=True)
                    elif not echo:
                        continue
                    elif marker == "INIT":
                        progress(f"/init reached {scanner.marks['INIT']:.1f} s after starting QEMU")
                    elif marker == "BEGIN":
                        progress("running the command")
                    elif marker == "FAIL":
                        progress(f"/init failed: {line}")
        proc.wait(timeout=30)
        return Boot(log_text(console_log), False, *scanner.times())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def log_text(path: Path) -> str:
    return path.read_bytes().decode(errors="replace").replace("\r", "")


# ----------------------------------------------------------------------------------------------------
# The command


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    timings: dict[str, float | int | str | None] = {}

    if args.kernel:
        kernel = user_kernel(args.kernel, args.modules, args.config)
        check_kernel_config(kernel.config_text)  # refuse before anything else is done
    else:
        root = cache_root()
        kernel = cached_kernel(root)
        if kernel is None:
            kernel = fetch_debian_kernel(root)
        timings["fetch_s"] = round(time.monotonic() - t0, 2)
        if args.clock_guest:  # the project's KVM_[GS]ET_CLOCK_GUEST modules (tools/kvm_modules.py)
            sys.path.insert(0, str(HERE))
            import kvm_modules
            kernel = kvm_modules.clock_guest_kernel(kernel, root, sys.modules[__name__])
            os.environ["KVM_TESTBED_CLOCK_GUEST"] = "patched"  # the tests expect clock_guest: true
            timings["clock_guest_s"] = round(time.monotonic() - t0 - timings["fetch_s"], 2)
            deadline += timings["clock_guest_s"]  # --timeout is the lane's; a build is not
    progress(f"kernel: {kernel.label}")

    results = args.results.resolve()
    scratch = results / "lane"  # job, initramfs, HOME: removed at the end
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        progress("building the initramfs")
        t = time.monotonic()
        initrd = scratch / "initrd.cpio"
        build_initramfs(kernel, initrd, args.busybox)
        timings["initramfs_s"] = round(time.monotonic() - t, 2)

        argv = args.command or default_command(args.python)
        pycache = cache_root() / "pycache"
        if not args.command:
            warm_bytecode(argv, pycache, deadline)
        cwd = Path.cwd() if args.command else REPO
        (scratch / "path").write_text(f"{results}\n")
        (scratch / "tmp-binds").write_text(
            "".join(f"{name}\n" for name in tmp_binds([cwd, argv[0], results])))
        (scratch / "job.sh").write_text(job_script(argv, cwd,
                                                   lane_environment(os.environ, scratch, pycache)))
        qemu = qemu_command(kernel.image, initrd, results, qemu=args.qemu)

        for attempt in (1, 2):
            for name in ("status", "output.log"):
                (results / name).unlink(missing_ok=True)
            progress(f"booting (attempt {attempt}/2): {shlex.join(argv)}")
            b = boot(qemu, deadline, results / "console.log")
            timings.update(attempts=attempt, boot_to_init_s=b.init_after and round(b.init_after, 2),
                           command_s=(round(b.ended_after - b.began_after, 2)
                                      if b.ended_after and b.began_after else None))
            oops = find_oops(b.console)
            if oops:
                shutil.copy(results / "console.log", results / f"console-oops-{attempt}.log")
                timings[f"oops_{attempt}"] = oops
            if b.timed_out:
                raise LaneError(f"timed out after {args.timeout:.0f} s; QEMU killed "
                                f"(console: {results / 'console.log'})", EXIT_TIMEOUT)
            if oops and attempt == 1:
                progress(f"kernel oops/panic on the console, retrying once: {oops}")
                continue
            if oops:
                raise LaneError(f"kernel oops/panic on the console twice: {oops} "
                                f"(console: {results / 'console.log'})")
            try:
                status = int((results / "status").read_text())
            except (OSError, ValueError):
                tail = "\n".join(b.console.splitlines()[-15:])
                raise LaneError(f"the lane wrote no exit status; console tail:\n{tail}") from None
            timings["total_s"] = round(time.monotonic() - t0, 2)
            progress(f"command exited {status}; boot to /init {b.init_after or 0:.1f} s, "
                     f"command {timings['command_s']} s, total {timings['total_s']} s "
                     f"(results in {results})")
            return status
        raise AssertionError("unreachable")
    finally:
        timings["total_s"] = round(time.monotonic() - t0, 2)
        (results / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
        shutil.rmtree(scratch, ignore_errors=True)


def warm_bytecode(argv: Sequence[str], pycache: Path, deadline: float) -> None:
    """Collect the tests once on the host, with the lane's PYTHONPYCACHEPREFIX, so the guest finds
    compiled and assertion-rewritten modules ready. Inside, the root is read-only and pytest would
    rewrite every plugin module afresh on each run: measured 45 s of a 53 s collection under TCG,
    against about 1 s natively here. A failure only costs that time; the lane reports the real one."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    progress("compiling the tests' bytecode on the host (pytest --collect-only)")
    try:
        subprocess.run([*argv, "--collect-only"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=max(1.0, min(120.0, deadline - time.monotonic())))
    except (OSError, subprocess.TimeoutExpired) as e:
        progress(f"warning: could not pre-compile on the host ({e}); the lane will be slower")


def fetch(args: argparse.Namespace) -> int:
    root = cache_root()
    t0 = time.monotonic()
    kernel = cached_kernel(root) or fetch_debian_kernel(root)
    progress(f"kernel: {kernel.label} in {root} ({time.monotonic() - t0:.1f} s)")
    return 0


EPILOG = """\
examples:
  python3 tools/xen_lane.py                      # the kernel-Xen tests (pytest -m xen_lane tests/xen)
  python3 tools/xen_lane.py -- /bin/sh -c 'exit 7'   # exits 7
  python3 tools/xen_lane.py --kernel ~/linux/arch/x86/boot/bzImage \\
      --modules /lib/modules/6.17.0-clockguest --config ~/linux/.config -- uname -r
  python3 tools/xen_lane.py fetch                # only fetch and cache the Debian kernel

Results (console.log, output.log, status, timings.json) go to --results. The Debian kernel is cached
in ${XDG_CACHE_HOME:-~/.cache}/kvm-testbed/xen-lane/ (delete it to refetch).
exit status: the command's; 2 unsuitable kernel or usage; 124 timeout; 125 lane failure (oops twice).
"""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(
        prog="xen_lane.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Boot a kernel with KVM Xen under QEMU/TCG (-smp 2, nested SVM) and run a "
                    "command inside, in a chroot of this machine's root (read-only) with a "
                    "read-write results directory. Default command: the project's kernel-Xen tests.")
    parser.add_argument("action", nargs="?", choices=("run", "fetch"), default="run")
    parser.add_argument("--kernel", type=Path, help="your kernel image instead of Debian's")
    parser.add_argument("--modules", type=Path,
                        help="its modules directory (like /lib/modules/RELEASE; .ko or .ko.xz)")
    parser.add_argument("--config", type=Path, help="its .config (else looked for next to it)")
    parser.add_argument("--clock-guest", action="store_true",
                        help="load kvm/kvm-amd built with the project's KVM_[GS]ET_CLOCK_GUEST "
                             "(tools/kvm_modules.py; built once, cached; docs/clock-guest.md)")
    parser.add_argument("--results", type=Path, default=REPO / "results" / "xen-lane",
                        help="read-write results directory (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=270,
                        help="seconds for the whole run, retry included; then QEMU is killed "
                             "(default: %(default)s)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the default command, e.g. a virtualenv's bin/python "
                             "(default: the one running this, %(default)s)")
    parser.add_argument("--qemu", default="qemu-system-x86_64", help=argparse.SUPPRESS)
    parser.add_argument("--busybox", type=Path, default=Path("/bin/busybox"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.modules and not args.kernel:
        parser.error("--modules needs --kernel")
    if args.clock_guest and args.kernel:
        parser.error("--clock-guest builds modules for the Debian kernel: not with --kernel")
    args.command = command
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the finally blocks kill QEMU and clean up.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    try:
        return fetch(args) if args.action == "fetch" else run(args)
    except LaneError as e:
        progress(f"error: {e}")
        return e.status
    except KeyboardInterrupt:
        progress("interrupted; QEMU killed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
