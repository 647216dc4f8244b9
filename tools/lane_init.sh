#!/bin/busybox sh
# /init of the Xen lane's initramfs (built by tools/xen_lane.py; static, no templating).
#
# The host shares two 9p trees: "hostroot" (its / read-only) and "results" (read-write). The host
# writes results/lane/job.sh (the command, its cwd and environment) and results/lane/path (the
# results directory's path on the host, so it appears at the same path inside). We load the modules
# the host put in /lib/lane-modules (named NN-name.ko, already in dependency order), chroot into the
# host's root and run the job there. Markers on the console let the host time the boot and stream
# the command's output; the exit status goes to results/status (the host trusts only that file).
/bin/busybox --install -s /bin
export PATH=/bin

mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
echo "XENLANE-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"

# Never return from /init: the kernel would panic, which looks like an oops to the host.
fail() {
    echo "XENLANE-FAIL $*"
    sync
    poweroff -f
    sleep 60
}

for m in /lib/lane-modules/*.ko; do
    [ -e "$m" ] || break
    insmod "$m" || fail "insmod $m"
done
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm and kvm-amd (no SVM in the emulated CPU?)"
ip link set lo up || fail "cannot bring up loopback"

opts=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "$opts" results /results || fail "cannot mount the results share"
# cache=loose: the host root does not change under us during a run, and Python's imports do
# thousands of lookups that would otherwise each cost a 9p round trip through the emulator.
mount -t 9p -o "$opts,ro,cache=loose" hostroot /newroot || fail "cannot mount the host root"
read -r rpath < /results/lane/path || fail "no results/lane/path"

mount -o bind /proc /newroot/proc
mount -o bind /sys /newroot/sys
mkdir -p /dev/shm /dev/pts
mount -o bind /dev /newroot/dev
mount -t tmpfs shm /newroot/dev/shm
# A fresh writable /tmp. The host's /tmp directories the job needs (a checkout or virtualenv under
# /tmp: CI clones into any folder) are bound back read-only; the host lists them in lane/tmp-binds.
mkdir -p /hosttmp
mount -o bind /newroot/tmp /hosttmp || fail "cannot bind the host's /tmp"
mount -t tmpfs tmp /newroot/tmp || fail "cannot mount a tmpfs on /tmp"
while read -r name; do
    [ -n "$name" ] || continue
    mkdir -p "/newroot/tmp/$name" && mount -o bind "/hosttmp/$name" "/newroot/tmp/$name" \
        || fail "cannot bind /tmp/$name"
done < /results/lane/tmp-binds
# /run (and /var/run, its symlink) writable: `ip netns add` keeps its namespaces under /run/netns.
mount -t tmpfs run /newroot/run || fail "cannot mount a tmpfs on /run"
# After the tmpfs, so a results directory under /tmp is not hidden by it (mkdir: only there can
# its mount point be missing; everywhere else the read-only root already has it).
mkdir -p "/newroot$rpath" 2>/dev/null
mount -o bind /results "/newroot$rpath" || fail "cannot bind the results share at $rpath"

echo "XENLANE-BEGIN uptime=$(cut -d' ' -f1 /proc/uptime)"
# The subshell writes the status before tee sees EOF, so no pipefail is needed.
{
    chroot /newroot /bin/sh "$rpath/lane/job.sh" < /dev/null
    echo $? > /results/status
} 2>&1 | tee /results/output.log
echo "XENLANE-END status=$(cat /results/status 2>/dev/null) uptime=$(cut -d' ' -f1 /proc/uptime)"

sync
umount "/newroot$rpath" 2>/dev/null
umount /results 2>/dev/null
poweroff -f
sleep 60
