#!/usr/bin/env bash
# dm-clone's example, with fuseclone: clone an image from a slow NBD server, use it at once,
# fstrim it, hydrate it, then switch to the destination alone. Run as root from the repo:
#     ./run setup && PATH=$PWD/.venv/bin:$PATH examples/walkthrough.sh
set -euo pipefail
work=$(mktemp -d /var/tmp/fuseclone-walkthrough.XXXXXX)
loop="" ; nbd_pid=""
cleanup() {
    set +e
    mountpoint -q "$work/fs" && umount "$work/fs"
    [[ -n $loop ]] && losetup -d "$loop" 2>/dev/null
    fuseclone unmount "$work/mnt" 2>/dev/null
    [[ -n $nbd_pid ]] && kill "$nbd_pid" 2>/dev/null && wait "$nbd_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/mnt" "$work/fs" "$work/files"

# A source: a 128 MiB ext4 image with some files, served read-only by nbdkit with 2 ms latency.
head -c 32M /dev/urandom > "$work/files/data.bin"
echo "hello from the source" > "$work/files/hello.txt"
mkfs.ext4 -q -d "$work/files" "$work/source.img" 128M
nbdkit -f -r -U "$work/nbd.sock" --filter=delay file "$work/source.img" rdelay=2ms &
nbd_pid=$!
while [[ ! -S $work/nbd.sock ]]; do sleep 0.05; done

# 1. Create the clone with hydration off and use it at once.
fuseclone mount "nbd+unix:///?socket=$work/nbd.sock" "$work/dest.img" "$work/clone.meta" "$work/mnt" --no-hydration
loop=$(losetup -f --show "$work/mnt/image")
mount "$loop" "$work/fs"
cat "$work/fs/hello.txt"

# 2. Discard unused blocks: they are never copied.
fstrim -v "$work/fs"
fuseclone status "$work/mnt"

# 3. Hydrate, and wait.
fuseclone message "$work/mnt" enable_hydration
fuseclone wait "$work/mnt"
fuseclone status "$work/mnt" --dmsetup

# 4. Switch to the destination alone.
umount "$work/fs"; losetup -d "$loop"; loop=""
fuseclone unmount "$work/mnt"
fuseclone check "$work/clone.meta"
mount -o loop "$work/dest.img" "$work/fs"
cat "$work/fs/hello.txt"
cmp "$work/files/data.bin" "$work/fs/data.bin" && echo "data.bin identical in the destination"
