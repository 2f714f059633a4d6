#!/bin/busybox sh
# shellcheck shell=dash
# /init of the VM tier's guest (PID 1): mounts the kernel file systems, loads the modules,
# configures QEMU's user network, runs /guest-test.sh and powers off.
#
# Kernel command line:
#   hs.engine=IP:PORT   the engine as the guest reaches it (QEMU forwards it to the host)
#   hs.deadline=SECS    uptime at which a hung test is cut short, its logs printed, and the
#                       guest powered off (before the host's own timeout kills QEMU)
#   hs.shell=1          no test: a shell on the serial console, for debugging by hand

/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

# load-order lists every module after its dependencies.
while read -r m; do
  insmod "/lib/modules/$m.ko" || echo "GVM-INFO insmod $m failed"
done </lib/modules/load-order

# QEMU's user network has a fixed layout: the guest is 10.0.2.15/24 behind 10.0.2.2.
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
echo "GVM-INFO booted in $(cut -d' ' -f1 /proc/uptime)s, kernel $(uname -r)"

if grep -q 'hs\.shell=1' /proc/cmdline; then
  exec setsid cttyhack sh
fi

# Cuts a hung test short. A device whose server is gone can hang sync() for good, so this
# powers off without syncing (-n): only the serial log matters by then.
watchdog() {
  deadline=$(sed -n 's/.*hs\.deadline=\([0-9]*\).*/\1/p' /proc/cmdline)
  [ -n "$deadline" ] || return 0
  while [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ]; do sleep 1; done
  echo "GVM-FAIL guest-deadline (the test still ran after ${deadline}s of uptime)"
  sed 's/^/GVM-LOG /' /tmp/agent.log 2>/dev/null
  dmesg | tail -n 40 | sed 's/^/GVM-DMESG /'
  poweroff -f -n
}
watchdog &

sh /guest-test.sh
echo "GVM-INFO guest test exited with $?"
sync
poweroff -f
