"""The guest image part of vmft: the small Linux guest that the FT pair runs.

The guest is made only of Debian packages plus the files under `images/`:

* `vmlinuz`: the kernel of bookworm's `linux-image-amd64` (its dependency, the
  real `linux-image-6.1.0-*-amd64` package), fetched with `apt-get download` and
  unpacked with `dpkg-deb -x` into the cache, never installed on the host;
* `initrd.img`: a gzip newc cpio, written here in Python, with busybox from
  `busybox-static`, the virtio/ext4 kernel modules in load order and
  `images/initramfs/init`, which loads them, mounts the root disk and
  switch_roots into it;
* `root.ext4`: the guest's raw 64 MiB ext4 root disk, made with `mke2fs -d`
  (no mount) from busybox with its applet links and `images/rootfs/` (its
  /sbin/init, the counter service and its state, the web pages).  Each side
  of the FT pair runs on its own qcow2 copy of it.

Every output is reproducible: fixed timestamps, owners, UUID and hash seed,
sorted archive members.  Outputs live in `<cache>/guest-<key>/`, where the key
hashes the package versions, the guest files and this builder; `<cache>/current`
points at the newest build.  A build with nothing changed is a cache hit that
returns in milliseconds (the apt resolution is cached too, keyed by the apt
index files' sizes and mtimes).

    python -m vmft_qemu.images build [--cache DIR] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

BUILDER_VERSION = "2"
DEFAULT_CACHE = Path(os.environ.get("VMFT_IMAGE_CACHE", "/var/cache/vmft/images"))
GUEST_FILES = Path(__file__).resolve().parent.parent / "images"

ARCH = "amd64"
KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
# Modules the guest needs, loaded after their dependencies in this order.  The
# Debian kernel builds virtio, virtio_pci, virtio_blk, virtio_net and ext4 as
# modules.  ext4/jbd2 ask for crc32c by softdep only; the generic one is named
# here because crc32c-intel needs SSE4.2, which `-cpu qemu64` does not have.
MODULES = ("crc32c_generic", "virtio_pci", "virtio_blk", "virtio_net", "ext4")

EPOCH = 1700000000  # every timestamp inside the outputs (2023-11-14)
DISK_MIB = 64
DISK_UUID = "76d6f7a0-5f0e-4c3e-9a51-000000000001"
DISK_LABEL = "vmft-root"

KERNEL, INITRD, ROOTFS, MANIFEST = "vmlinuz", "initrd.img", "root.ext4", "manifest.json"
SBIN_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"

MKE2FS_CONF = """\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
\tsmall = {
\t}
"""


@dataclass(frozen=True)
class GuestImage:
    """The three files a VM boots from."""

    kernel: Path
    initrd: Path
    rootfs: Path  # raw ext4 root disk; give each VM its own qcow2 overlay on top


class ImageMissing(RuntimeError):
    """No built guest image in the cache."""


class ImageBuildError(RuntimeError):
    """The guest image could not be built."""


@dataclass(frozen=True)
class Package:
    """One Debian package at the exact version the index offers."""

    name: str
    version: str
    size: int
    sha256: str

    @property
    def deb_name(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_{ARCH}.deb"


# ---------------------------------------------------------------- helpers


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tool(name: str) -> str:
    found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SBIN_PATH}")
    if not found:
        raise ImageBuildError(f"`{name}` is not installed on this host")
    return found


def _run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
         what: str = "") -> subprocess.CompletedProcess[str]:
    log.debug("running %s", " ".join(args))
    proc = subprocess.run([_tool(args[0]), *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise ImageBuildError(f"{what or args[0]} failed ({proc.returncode}): {detail}")
    return proc


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ------------------------------------------------------ package resolution

APT_MISSING = ("the package index looks missing or stale: run `apt-get update` "
               "(the ansible playbook does) and try again")


def _apt_show(*specs: str) -> list[dict[str, str]]:
    """`apt-cache show` of the candidate version of each spec, as dicts."""
    proc = subprocess.run([_tool("apt-cache"), "show", "--no-all-versions", *specs],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageBuildError(f"apt-cache show {' '.join(specs)}: "
                              f"{proc.stderr.strip()}; {APT_MISSING}")
    stanzas: list[dict[str, str]] = []
    for block in proc.stdout.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if "Package" in fields:
            stanzas.append(fields)
    if len(stanzas) != len(specs):
        raise ImageBuildError(f"apt-cache knows {len(stanzas)} of {' '.join(specs)}: "
                              f"{APT_MISSING}")
    return stanzas


def _package(fields: dict[str, str]) -> Package:
    if not {"Version", "Size", "SHA256"} <= fields.keys():
        raise ImageBuildError(f"{fields['Package']} is in no package list: {APT_MISSING}")
    return Package(fields["Package"], fields["Version"], int(fields["Size"]), fields["SHA256"])


def _real_kernel(meta: dict[str, str]) -> str:
    """`name=version` of the linux-image-6.1.0-*-amd64 the metapackage pins."""
    for alternative in meta.get("Depends", "").split(","):
        dep = alternative.split("|")[0].strip()
        if dep.startswith("linux-image-") and "(=" in dep:
            name, version = dep.split("(=", 1)
            return f"{name.strip()}={version.rstrip(')').strip()}"
    raise ImageBuildError(f"{KERNEL_META} {meta.get('Version')} pins no kernel package: "
                          f"Depends: {meta.get('Depends')!r}")


def resolve_packages() -> list[Package]:
    """The kernel and busybox packages at the versions apt would take now."""
    meta, busybox = _apt_show(KERNEL_META, BUSYBOX)
    if meta.get("Package") != KERNEL_META or busybox.get("Package") != BUSYBOX:
        raise ImageBuildError(f"unexpected apt-cache answer for {KERNEL_META} {BUSYBOX}")
    (kernel,) = _apt_show(_real_kernel(meta))
    return [_package(kernel), _package(busybox)]


def _apt_fingerprint() -> str:
    """Changes whenever apt's view of the archive may have changed."""
    digest = hashlib.sha256()
    for root in (Path("/var/lib/apt/lists"), Path("/etc/apt")):
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if "partial" in path.parts or path.name == "lock" or not path.is_file():
                continue
            st = path.stat()
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _packages(cache_root: Path, fresh: bool) -> list[Package]:
    """resolve_packages(), remembered in the cache while the apt index is unchanged."""
    memo = cache_root / "resolved.json"
    fingerprint = _apt_fingerprint()
    if not fresh and memo.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            saved = json.loads(memo.read_text())
            if saved["fingerprint"] == fingerprint:
                return [Package(**p) for p in saved["packages"]]
    packages = resolve_packages()
    cache_root.mkdir(parents=True, exist_ok=True)
    _write_atomic(memo, json.dumps({"fingerprint": fingerprint,
                                    "packages": [asdict(p) for p in packages]}).encode())
    return packages


# ------------------------------------------------------------- cache key


def _guest_file_mode(path: Path) -> int:
    return 0o755 if path.stat().st_mode & 0o111 else 0o644


def _guest_tree(subdir: str) -> list[tuple[str, Path]]:
    """(relative path, file) of every file under images/<subdir>, sorted."""
    root = GUEST_FILES / subdir
    if not root.is_dir():
        raise ImageBuildError(f"guest files not found: {root} (run from a vmft checkout)")
    return sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())


def _guest_digest() -> str:
    digest = hashlib.sha256()
    for subdir in ("initramfs", "rootfs"):
        for rel, path in _guest_tree(subdir):
            digest.update(f"{subdir}/{rel}\0{_guest_file_mode(path):o}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def cache_key(packages: Sequence[Package], guest_digest: str) -> str:
    inputs = {
        "builder": BUILDER_VERSION,
        "builder_source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "packages": [f"{p.name}={p.version}:{p.sha256}" for p in packages],
        "guest": guest_digest,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


# -------------------------------------------------------------- downloads


def _download(pkg: Package, debs: Path, progress: Progress) -> Path:
    """The package's .deb in the cache, fetched with `apt-get download` if needed."""
    target = debs / pkg.deb_name
    if target.exists() and _sha256_file(target) == pkg.sha256:
        progress(f"using cached {pkg.deb_name} ({_mib(pkg.size)})")
        return target
    progress(f"downloading {pkg.name} {pkg.version} ({_mib(pkg.size)})")
    debs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".download-", dir=debs) as tmp:
        proc = subprocess.run(
            [_tool("apt-get"), "download", "-q", "-o", "APT::Sandbox::User=root",
             f"{pkg.name}={pkg.version}"], cwd=tmp, capture_output=True, text=True)
        got = sorted(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or len(got) != 1:
            raise ImageBuildError(f"apt-get download {pkg.name}={pkg.version} failed: "
                                  f"{proc.stderr.strip()}; {APT_MISSING}")
        if _sha256_file(got[0]) != pkg.sha256:
            raise ImageBuildError(f"{got[0].name}: SHA256 differs from the package index")
        os.replace(got[0], target)
    progress(f"  got {_mib(target.stat().st_size)} in {time.monotonic() - started:.1f} s")
    return target


def _unpack(deb: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    _run("dpkg-deb", "-x", str(deb), str(dest), what=f"dpkg-deb -x {deb.name}")
    return dest


# --------------------------------------------------------- kernel modules


def _elf_section(data: bytes, wanted: bytes) -> bytes:
    """The contents of one section of a little-endian ELF64 file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ImageBuildError("kernel module is not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    strtab = header(shstrndx)[1]
    for i in range(shnum):
        name, offset, size = header(i)
        end = data.index(b"\0", strtab + name)
        if data[strtab + name:end] == wanted:
            return data[offset:offset + size]
    return b""


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The `.modinfo` key=value strings of a kernel module (what modinfo(8) shows)."""
    info: dict[str, list[str]] = {}
    for item in _elf_section(data, b".modinfo").split(b"\0"):
        if b"=" in item:
            key, value = item.decode(errors="replace").split("=", 1)
            info.setdefault(key, []).append(value)
    return info


def module_bytes(path: Path) -> bytes:
    """A module file's contents, decompressed (busybox insmod is given plain .ko)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subprocess.run([_tool("zstd"), "-dc"], input=data, capture_output=True,
                              check=True).stdout
    return data


def _module_name(path: Path) -> str:
    return path.name.split(".ko", 1)[0].replace("-", "_")


@dataclass
class ModuleTree:
    """The modules of one unpacked kernel (lib/modules/<release>)."""

    root: Path
    files: dict[str, Path] = field(init=False)
    builtin: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.files = {_module_name(p): p for p in sorted(self.root.rglob("*.ko*"))
                      if ".ko" in p.name}
        builtin = self.root / "modules.builtin"
        self.builtin = ({_module_name(Path(line)) for line in builtin.read_text().split()}
                        if builtin.exists() else set())

    def depends(self, name: str) -> list[str]:
        info = modinfo(module_bytes(self.files[name]))
        return [d for d in ",".join(info.get("depends", [])).split(",") if d]

    def load_order(self, wanted: Sequence[str]) -> list[str]:
        """`wanted` and their dependencies (modules.dep's relation), dependencies first.

        The package ships no modules.dep (depmod makes it at install time), so the
        relation comes from each module's own `depends=` field, as depmod does it.
        """
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str, needed_by: str) -> None:
            if name in order or name in self.builtin:
                return
            if name not in self.files:
                raise ImageBuildError(f"kernel module {name} (for {needed_by}) not in {self.root}")
            if name in visiting:
                raise ImageBuildError(f"kernel module dependency cycle at {name}")
            visiting.add(name)
            for dep in self.depends(name):
                visit(dep, name)
            visiting.discard(name)
            order.append(name)

        for name in wanted:
            visit(name, "the guest")
        return order


# ----------------------------------------------------------------- cpio


@dataclass(frozen=True)
class _Member:
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class Cpio:
    """A newc ("070701") archive built in memory; reproducible by construction."""

    def __init__(self) -> None:
        self._members: dict[str, _Member] = {}

    def _add(self, path: str, member: _Member) -> None:
        path = path.strip("/")
        parent = path.rpartition("/")[0]
        if parent and parent not in self._members:
            self.directory(parent)
        self._members[path] = member

    def directory(self, path: str, mode: int = 0o755) -> None:
        self._add(path, _Member(stat.S_IFDIR | mode))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(path, _Member(stat.S_IFREG | mode, data))

    def symlink(self, path: str, target: str) -> None:
        self._add(path, _Member(stat.S_IFLNK | 0o777, target.encode()))

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(path, _Member(stat.S_IFCHR | mode, rdev=(major, minor)))

    def __len__(self) -> int:
        return len(self._members)

    @staticmethod
    def _record(ino: int, name: str, member: _Member) -> bytes:
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(member.mode) else 1
        fields = (ino, member.mode, 0, 0, nlink, EPOCH, len(member.data), 0, 0,
                  member.rdev[0], member.rdev[1], len(encoded), 0)
        head = b"070701" + b"".join(b"%08X" % value for value in fields) + encoded
        head += b"\0" * (-len(head) % 4)
        return head + member.data + b"\0" * (-len(member.data) % 4)

    def pack(self) -> bytes:
        records = [self._record(ino, name, self._members[name])
                   for ino, name in enumerate(sorted(self._members), start=1)]
        trailer = self._record(0, "TRAILER!!!", _Member(0))
        return b"".join(records) + trailer

    def write_gzip(self, path: Path) -> int:
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                   compresslevel=9, mtime=0) as gz:
            gz.write(self.pack())
        return path.stat().st_size


def _busybox_applets(busybox: Path) -> list[str]:
    """Where busybox wants its applet links (bin/sh, sbin/insmod, ...)."""
    out = _run(str(busybox), "--list-full", what="busybox --list-full").stdout.split()
    return sorted(p for p in out if "/" in p and p != "bin/busybox")


def make_initramfs(busybox_root: Path, modules: ModuleTree,
                   order: Sequence[str], out: Path) -> tuple[int, int]:
    """Write initrd.img; returns (members, compressed bytes)."""
    cpio = Cpio()
    for path in ("dev", "proc", "sys", "root", "etc/vmft", "lib/modules", "bin", "sbin",
                 "usr/bin", "usr/sbin"):
        cpio.directory(path)
    cpio.char_device("dev/console", 5, 1)
    busybox = busybox_root / "bin" / "busybox"
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _busybox_applets(busybox):
        cpio.symlink(applet, "/bin/busybox")
    for name in order:
        cpio.file(f"lib/modules/{name}.ko", module_bytes(modules.files[name]))
    cpio.file("etc/vmft/modules", "".join(f"{name}\n" for name in order).encode())
    for rel, path in _guest_tree("initramfs"):
        cpio.file(rel, path.read_bytes(), _guest_file_mode(path))
    return len(cpio), cpio.write_gzip(out)


# ----------------------------------------------------------------- rootfs


# Directories of the root disk besides those images/rootfs has files in.
ROOT_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "root",
             "var/log")


def _stage_rootfs(stage: Path, busybox: Path) -> list[str]:
    """Busybox, its applet links and images/rootfs in `stage`, with fixed modes and
    times; returns the guest paths, sorted."""
    paths = ["/", "/lost+found"]
    for directory in ROOT_DIRS:
        (stage / directory).mkdir(parents=True)
    shutil.copyfile(busybox, stage / "bin" / "busybox")
    (stage / "bin" / "busybox").chmod(0o755)
    for applet in _busybox_applets(busybox):
        # Relative links, so nothing here ever follows one out of the stage.
        link = stage / applet
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(stage / "bin" / "busybox", link.parent))
    for rel, src in _guest_tree("rootfs"):
        if any(c.isspace() for c in rel):
            raise ImageBuildError(f"rootfs file name with white space: {rel!r}")
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)  # a guest file may replace an applet link (sbin/init)
        dst.write_bytes(src.read_bytes())
        dst.chmod(_guest_file_mode(src))
    for path in sorted(stage.rglob("*"), reverse=True) + [stage]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)
        if path != stage:
            paths.append("/" + path.relative_to(stage).as_posix())
    return sorted(set(paths))


def make_rootfs(work: Path, busybox_root: Path, out: Path) -> None:
    """The root disk: a raw ext4 image of DISK_MIB MiB, made without mounting."""
    stage = work / "rootfs"
    stage.mkdir()
    paths = _stage_rootfs(stage, busybox_root / "bin" / "busybox")
    conf = work / "mke2fs.conf"
    conf.write_text(MKE2FS_CONF)
    env = {**os.environ, "MKE2FS_CONFIG": str(conf), "E2FSPROGS_FAKE_TIME": str(EPOCH)}
    # Inode tables and journal zeroed now: no lazy-init thread writing in the guest.
    _run("mke2fs", "-q", "-F", "-t", "ext4", "-L", DISK_LABEL, "-U", DISK_UUID,
         "-E", f"hash_seed={DISK_UUID},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0",
         "-d", str(stage),
         str(out), f"{DISK_MIB}M", env=env, what="mke2fs")
    # mke2fs -d copies each inode's ctime (and owner) from the staged file; pin them.
    commands = work / "debugfs.cmd"
    commands.write_text("".join(
        f"set_inode_field {p} {fld} {val}\n" for p in paths
        for fld, val in (("uid", 0), ("gid", 0), ("atime", f"@{EPOCH}"),
                         ("mtime", f"@{EPOCH}"), ("ctime", f"@{EPOCH}"),
                         ("crtime", f"@{EPOCH}"))))
    proc = _run("debugfs", "-w", "-f", str(commands), str(out), env=env, what="debugfs")
    errors = [line for line in (proc.stdout + proc.stderr).splitlines()
              if line.startswith("set_inode_field:")]
    if errors:
        raise ImageBuildError(f"debugfs on {out.name}: {errors[0]}")
    _run("e2fsck", "-fn", str(out), env=env, what="e2fsck of the new rootfs")


# ------------------------------------------------------------------ build


def _image_in(directory: Path) -> GuestImage:
    return GuestImage(kernel=directory / KERNEL, initrd=directory / INITRD,
                      rootfs=directory / ROOTFS)


def _complete(directory: Path) -> bool:
    image = _image_in(directory)
    return all(p.is_file() for p in (image.kernel, image.initrd, image.rootfs,
                                     directory / MANIFEST))


def _point_current(cache_root: Path, directory: Path) -> None:
    current = cache_root / "current"
    if current.is_symlink() and os.readlink(current) == directory.name:
        return
    tmp = cache_root / f".current.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(directory.name)
    os.replace(tmp, current)


@contextlib.contextmanager
def _locked(cache_root: Path) -> Iterator[None]:
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove_leftovers(cache_root: Path) -> None:
    """Temporary directories of builds that died (we hold the lock)."""
    for stale in [*cache_root.glob(".build-*"), *cache_root.glob("debs/.download-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _log_progress(message: str) -> None:
    log.info("%s", message)


def _assemble(packages: Sequence[Package], key: str, guest_digest: str,
              cache_root: Path, out: Path, progress: Progress) -> dict[str, object]:
    """Download, unpack and write the three outputs into `out`; returns the manifest."""
    debs = {p.name: _download(p, cache_root / "debs", progress) for p in packages}
    kernel_pkg, busybox_pkg = packages
    work = out / "work"
    progress(f"unpacking {kernel_pkg.name} and {busybox_pkg.name} (dpkg-deb -x)")
    kroot = _unpack(debs[kernel_pkg.name], work / "kernel")
    broot = _unpack(debs[busybox_pkg.name], work / "busybox")

    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    releases = sorted(p.name for p in (kroot / "lib" / "modules").iterdir())
    if len(vmlinuz) != 1 or len(releases) != 1:
        raise ImageBuildError(f"{kernel_pkg.name}: expected one kernel, found "
                              f"{[p.name for p in vmlinuz]} / {releases}")
    shutil.copyfile(vmlinuz[0], out / KERNEL)
    progress(f"kernel {releases[0]}: {_mib((out / KERNEL).stat().st_size)}")

    modules = ModuleTree(kroot / "lib" / "modules" / releases[0])
    order = modules.load_order(MODULES)
    builtin = [m for m in MODULES if m in modules.builtin]
    progress("modules (load order): " + " ".join(order)
             + (f"; built in: {' '.join(builtin)}" if builtin else ""))

    members, size = make_initramfs(broot, modules, order, out / INITRD)
    progress(f"initramfs: {members} entries, {_mib(size)} gzip")
    make_rootfs(work, broot, out / ROOTFS)
    progress(f"root disk: {DISK_MIB} MiB ext4 from busybox and images/rootfs (mke2fs -d)")
    shutil.rmtree(work)
    return {
        "key": key, "builder": BUILDER_VERSION, "guest_files": guest_digest,
        "packages": [asdict(p) for p in packages], "kernel_release": releases[0],
        "modules": order,
        "sha256": {name: _sha256_file(out / name) for name in (KERNEL, INITRD, ROOTFS)},
    }


def build(cache_root: Path = DEFAULT_CACHE, force: bool = False,
          progress: Progress = _log_progress) -> GuestImage:
    """Build the guest into `cache_root` (or find it there) and return it."""
    cache_root = Path(cache_root).resolve()
    guest_digest = _guest_digest()
    if not force:
        packages = _packages(cache_root, fresh=False)
        final = cache_root / f"guest-{cache_key(packages, guest_digest)}"
        if _complete(final):
            _point_current(cache_root, final)
            progress(f"up to date: {final}")
            return _image_in(final)
    with _locked(cache_root):
        _remove_leftovers(cache_root)
        progress("resolving packages (apt-cache)")
        packages = _packages(cache_root, fresh=True)
        for p in packages:
            progress(f"  {p.name} {p.version} ({_mib(p.size)})")
        key = cache_key(packages, guest_digest)
        final = cache_root / f"guest-{key}"
        if _complete(final) and not force:
            _point_current(cache_root, final)
            progress(f"up to date: {final}")
            return _image_in(final)
        started = time.monotonic()
        out = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_root))
        try:
            manifest = _assemble(packages, key, guest_digest, cache_root, out, progress)
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            out.chmod(0o755)
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=".build-old-", dir=cache_root))
                os.replace(final, old / final.name)
                shutil.rmtree(old)
            os.replace(out, final)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        _point_current(cache_root, final)
        progress(f"built {final} in {time.monotonic() - started:.1f} s")
        return _image_in(final)


def locate(cache_root: Path = DEFAULT_CACHE) -> GuestImage:
    """The most recently built guest in `cache_root`; ImageMissing if there is none."""
    cache_root = Path(cache_root)
    current = cache_root / "current"
    if not current.is_dir() or not _complete(current.resolve()):
        hint = "" if cache_root == DEFAULT_CACHE else f" --cache {cache_root}"
        raise ImageMissing(f"no guest image in {cache_root}: run `vmft image build{hint}` first")
    directory = current.resolve()
    with contextlib.suppress(OSError, ValueError, ImageBuildError):
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("guest_files") != _guest_digest():
            log.warning("guest image %s is older than the files in %s: "
                        "run `vmft image build`", directory, GUEST_FILES)
    return _image_in(directory)


# -------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmft image", description="Build the vmft guest (Debian kernel, busybox "
                                       "initramfs, ext4 root disk) into a cache.")
    parser.add_argument("action", choices=["build", "locate"],
                        help="build: build or reuse; locate: print the built files")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"cache directory (default {DEFAULT_CACHE}, or $VMFT_IMAGE_CACHE)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    def show(message: str) -> None:
        print(f"vmft image: {message}", flush=True)

    try:
        if args.action == "build":
            image = build(args.cache, force=args.force, progress=show)
        else:
            image = locate(args.cache)
    except (ImageMissing, ImageBuildError, OSError) as exc:
        print(f"vmft image: error: {exc}", file=sys.stderr)
        return 1
    for name, path in asdict(image).items():
        print(f"{name:7} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
