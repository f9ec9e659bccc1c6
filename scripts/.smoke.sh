#!/bin/sh
set -x
ip link add br0 type bridge
ip addr add 10.0.0.1/24 dev br0
ip link set br0 up
K=${K:-guest-images/out/minimal/bzImage}
timeout 120 target/release/rvm run --kernel $K --initrd guest-images/out/initramfs.cpio.gz \
  --cmdline "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd quiet rvm.scenario=net_ping" \
  --cpus 2 --mem 256M --tap tap0 --bridge br0
echo "rvm exit $?"
ip link show
