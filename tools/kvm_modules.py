"""KVM modules with the project's KVM_[GS]ET_CLOCK_GUEST, built for the lane's own Debian kernel.

No kernel this project can reach has the (unmerged) clock ioctls, so `xen_lane.py --clock-guest`
builds its own kvm.ko and kvm-amd.ko: from linux-source-6.12 at exactly the lane kernel's package
version, with tools/clock_guest/kvm-clock-guest-6.12.patch applied, out of tree against Debian's own
headers packages (the lane kernel's config and release string, so the modules load into it). An
in-tree `make M=arch/x86/kvm` builds modules with the right vermagic that the kernel refuses
("Invalid relocation target"); the dkms-style build against the headers is what loads (issue 14).

Every package comes through the lane's isolated apt and is checked against the signed index like the
kernel. The result is cached, keyed by source version, kernel release, patch and recipe; a failure
names its step and keeps the whole log. Called by xen_lane.py with the lane module itself (`lane`),
whose helpers (apt_isolated, run_checked, LaneError, Kernel, ...) it uses.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
PATCH = HERE / "clock_guest" / "kvm-clock-guest-6.12.patch"
# Bumped when the build recipe below changes what it produces (part of the cache key).
RECIPE = "out-of-tree against linux-headers, arch/x86/kvm + virt/kvm, CONFIG_KVM_INTEL off, v1"
BUILT = ("kvm", "kvm_amd")
# The headers' .config differs from the image's /boot/config only in what signing and the build
# salt need at build time; anything else differing means the headers are not this kernel's.
CONFIG_BUILD_ONLY = {"CONFIG_BUILD_SALT", "CONFIG_MODULE_SIG_ALL", "CONFIG_MODULE_SIG_KEY",
                     "CONFIG_SYSTEM_TRUSTED_KEYS"}


# What the build runs, and the Debian package that has it (the headers' compiler is gcc-12).
TOOLS = {"make": "make", "patch": "patch", "pahole": "dwarves", "x86_64-linux-gnu-gcc-12": "gcc-12",
         "dpkg-deb": "dpkg", "tar": "tar", "xz": "xz-utils", "modinfo": "kmod"}


def missing_tools(which=shutil.which) -> list[str]:
    """The Debian packages to install for the programs the build needs and this host lacks."""
    return sorted({package for program, package in TOOLS.items() if which(program) is None})


def packages(release: str) -> list[str]:
    """The source and the three headers packages of kernel RELEASE (e.g. 6.12.95+deb12-amd64)."""
    base = release.removesuffix("-amd64")
    return ["linux-source-6.12", f"linux-headers-{release}", f"linux-headers-{base}-common",
            f"linux-kbuild-{base}"]


def cache_key(version: str, release: str, patch: bytes) -> str:
    return hashlib.sha256(f"{version}\n{release}\n{RECIPE}\n".encode() + patch).hexdigest()[:16]


def config_mismatch(headers_config: str, image_config: str, parse) -> list[str]:
    """Symbols on which the headers' config and the lane kernel's differ (build-only ones aside)."""
    a, b = parse(headers_config), parse(image_config)
    return sorted(k for k in a.keys() | b.keys()
                  if k not in CONFIG_BUILD_ONLY and a.get(k) != b.get(k))


@dataclasses.dataclass
class Build:
    """One build's log: every step's commands and output, kept on failure (and on success)."""
    log: Path
    lane: ModuleType

    def step(self, name: str, argv: list[str], timeout: float, **kwargs) -> None:
        with self.log.open("a") as log:
            log.write(f"\n== step {name}: {' '.join(argv)}\n")
            log.flush()
            try:
                proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=timeout, **kwargs)
            except FileNotFoundError as e:
                raise self.fail(name, f"{argv[0]} is not installed") from e
            except subprocess.TimeoutExpired as e:
                raise self.fail(name, f"took more than {timeout:.0f} s") from e
        if proc.returncode != 0:
            raise self.fail(name, f"{argv[0]} exited {proc.returncode}")

    def fail(self, name: str, why: str) -> Exception:
        return self.lane.LaneError(f"clock-guest module build failed at step '{name}': {why} "
                                   f"(log kept: {self.log})")


def cached(dest: Path, lane: ModuleType) -> bool:
    try:
        manifest = json.loads((dest / "manifest.json").read_text())
        return all(lane.sha256_file(dest / rel) == digest for rel, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def clock_guest_kernel(kernel, root: Path, lane: ModuleType):
    """The lane's cached Debian kernel with kvm/kvm-amd replaced by the patched build (cached)."""
    manifest = json.loads((root / "kernel" / "manifest.json").read_text())
    version, release = manifest["version"], manifest["release"]
    patch = PATCH.read_bytes()
    key = cache_key(version, release, patch)
    top = root / "clock-guest"
    dest = top / f"modules-{key}"
    label = f"{manifest['package']} {version} with the project's KVM_[GS]ET_CLOCK_GUEST modules"
    if cached(dest, lane):
        lane.progress(f"clock-guest modules: cached ({dest.name})")
        return dataclasses.replace(kernel, modules_dir=dest, label=f"{label} (cached {key})")
    need = missing_tools()
    if need:
        raise lane.LaneError("clock-guest module build failed at step 'tools': install "
                             + " ".join(need), lane.EXIT_USAGE)
    top.mkdir(parents=True, exist_ok=True)
    build = Build(top / f"build-{key}.log", lane)
    build.log.write_text(f"clock-guest module build {key}: {version} {release}, patch "
                         f"{hashlib.sha256(patch).hexdigest()}\n")
    t0 = time.monotonic()
    work = top / "work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "debs").mkdir(parents=True)
    try:
        stage = work / "stage"
        _fetch(build, top, version, release, work / "debs")
        lane.progress("clock-guest: extracting the headers and arch/x86/kvm, virt/kvm of the source")
        headers, common = _extract(build, work / "debs", stage, release)
        image_config = (root / "kernel" / "config").read_text()
        diff = config_mismatch((headers / ".config").read_text(), image_config,
                               lane.parse_kernel_config)
        found = (headers / "include" / "config" / "kernel.release").read_text().strip()
        if diff or found != release:
            raise build.fail("configure", f"the headers are not the lane kernel's: release {found}"
                             f", config differs in {', '.join(diff[:8]) or 'nothing'}")
        build.step("patch", ["patch", "-p1", "--forward", "-i", str(PATCH)], 60, cwd=common)
        lane.progress(f"clock-guest: compiling kvm.ko and kvm-amd.ko ({os.cpu_count()} jobs)")
        tb = time.monotonic()
        build.step("build", ["make", "-C", str(headers), f"M={common}/arch/x86/kvm",
                             f"-j{os.cpu_count() or 1}", "CONFIG_KVM_INTEL=", "modules"], 1800)
        compile_s = time.monotonic() - tb
        staged = work / "modules"
        shutil.copytree(kernel.modules_dir, staged)
        for name in BUILT:
            ko = common / "arch" / "x86" / "kvm" / f"{name.replace('_', '-')}.ko"
            vermagic = subprocess.run(["modinfo", "-F", "vermagic", str(ko)], capture_output=True,
                                      text=True).stdout.split()
            if not vermagic or vermagic[0] != release:
                raise build.fail("verify", f"{ko.name} vermagic {vermagic} is not {release}")
            debian = [p for p in staged.rglob("*.ko") if lane.module_name(p.stem) == name]
            if len(debian) != 1:
                raise build.fail("verify", f"{name}.ko not found once in the lane's modules")
            shutil.copy(ko, debian[0])
        files = {str(p.relative_to(staged)): lane.sha256_file(p)
                 for p in staged.rglob("*") if p.is_file()}
        (staged / "manifest.json").write_text(json.dumps({
            "version": version, "release": release, "patch": str(PATCH.relative_to(HERE.parent)),
            "patch_sha256": hashlib.sha256(patch).hexdigest(), "recipe": RECIPE,
            "compile_s": round(compile_s, 1), "files": files}, indent=1))
        shutil.rmtree(dest, ignore_errors=True)
        staged.rename(dest)
        for old in top.glob("modules-*"):  # builds of an older patch or source: never used again
            if old != dest:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lane.progress(f"clock-guest modules built in {time.monotonic() - t0:.1f} s (compiling "
                  f"{compile_s:.1f} s); cached as {dest.name}, log {build.log}")
    return dataclasses.replace(kernel, modules_dir=dest, label=f"{label} (built {key})")


def _fetch(build: Build, top: Path, version: str, release: str, debs: Path) -> None:
    """Download the four packages at VERSION through the isolated apt; size and SHA256 checked
    against the signed index, as the kernel package is."""
    lane = build.lane
    opts = lane.apt_isolated(top)
    lane.progress(f"clock-guest: fetching linux-source-6.12 and the headers of {release} ({version})")
    build.step("index", ["apt-get", "-q", *opts, "update"], 180)
    wanted = {}
    for name in packages(release):
        try:
            show = lane.run_checked(["apt-cache", *opts, "show", f"{name}={version}"],
                                    f"apt-cache show {name}", 60)
        except lane.LaneError as e:
            raise build.fail("index", f"{name} {version} is not in the index ({e})") from None
        wanted[name] = dict(re.findall(r"^(Filename|SHA256|Size): (.*)$",
                                       show.split("\n\n")[0], re.M))
    build.step("download", ["apt-get", "-q", *opts, "download",
                            *(f"{name}={version}" for name in wanted)], 900, cwd=debs)
    for name, fields in wanted.items():
        deb = debs / Path(fields["Filename"]).name.replace("%3a", ":")
        if (not deb.is_file() or deb.stat().st_size != int(fields["Size"])
                or lane.sha256_file(deb) != fields["SHA256"]):
            raise build.fail("verify download", f"{deb.name} does not match the archive's size/SHA256")


def _extract(build: Build, debs: Path, stage: Path, release: str) -> tuple[Path, Path]:
    """Headers and kbuild unpacked under STAGE (their symlinks are relative; the one absolute path,
    the headers Makefile's include of the -common tree, is pointed at the staged copy), and the
    source's arch/x86/kvm and virt/kvm placed inside the -common tree, so the kvm Makefile's
    $(srctree) paths and the trace headers' relative include find them unchanged."""
    stage.mkdir(parents=True)
    for deb in sorted(debs.glob("linux-[hk]*.deb")):
        build.step("extract", ["dpkg-deb", "-x", str(deb), str(stage)], 300)
    base = release.removesuffix("-amd64")
    headers = stage / "usr" / "src" / f"linux-headers-{release}"
    common = stage / "usr" / "src" / f"linux-headers-{base}-common"
    makefile = headers / "Makefile"
    text = makefile.read_text()
    absolute = f"include /usr/src/linux-headers-{base}-common/Makefile"
    if absolute not in text:
        raise build.fail("extract", f"{makefile} does not include {absolute[8:]}")
    makefile.write_text(text.replace(absolute, f"include {common}/Makefile"))
    source = next(debs.glob("linux-source-6.12_*.deb"))
    tarball = "./usr/src/linux-source-6.12.tar.xz"
    build.step("extract", ["sh", "-c", f'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" {tarball}',
                           "sh", str(source), str(debs)], 300)
    build.step("extract", ["tar", "-xJf", str(debs / tarball), "-C", str(common),
                           "--strip-components=1", "linux-source-6.12/arch/x86/kvm",
                           "linux-source-6.12/virt/kvm"], 600)
    return headers, common
