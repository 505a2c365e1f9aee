# shellcheck shell=bash
# Shared by testnet/setup, testnet/run and testnet/bench-datapath: paths, the
# kernel cache layout, the ESP probe and booting the VM.

TESTNET_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_DIR=$(cd "$TESTNET_DIR/.." && pwd)
# Outside the repo so that every clone (and CI on the same machine) reuses
# the ~70 MB kernel package; everything in it can be rebuilt from empty.
CACHE_DIR=${MESHSEC_TESTNET_CACHE:-/var/cache/meshsec-testnet}

# Kernel modules the guest loads, in dependency order once resolved by
# modprobe --show-depends. drbg is easy to forget: without the default RNG the
# IV generators (seqiv/echainiv) fail and every ESP SA add is refused with
# "Kernel was unable to initialize cryptographic operations".
GUEST_MODULES=(
    virtio_pci 9pnet_virtio 9p
    xfrm_user esp4 esp6 aesni_intel gcm ghash_clmulni_intel seqiv echainiv
    authenc cbc drbg chacha20poly1305 chacha_x86_64 poly1305_x86_64
    veth bridge sch_netem tun wireguard
    sch_ingress cls_u32 act_gact
)

# Modules the guest can load but does not load at boot: they sit with
# modules.dep/modules.alias under /lib/modules/VERSION in the initramfs, where
# the kernel's own module autoload (request_module runs /sbin/modprobe, busybox
# there, in the initramfs root) finds them. esp4_offload/esp6_offload give ESP
# GSO; left out at boot so that scenarios can show the agent loading them
# (testnet/scenarios/esp-offload.sh) and bench-datapath can measure ESP with
# and without them.
GUEST_LOADABLE=(esp4_offload esp6_offload)

# The guest's kernel module tree as the host sees it (kmod's modprobe in the
# guest's chroot has no /lib/modules of the guest kernel: use
# `modprobe -d "$(guest_module_root)" NAME` there).
guest_module_root() { echo "$CACHE_DIR/kernel/$(uname -r)"; }

# Host packages the bed, the VM path and the benchmark need (Debian names).
# Each entry is "package:command-that-proves-it".
HOST_PACKAGES=(
    qemu-system-x86:qemu-system-x86_64 busybox-static:/bin/busybox cpio:cpio
    lintian:lintian man-db:man systemd:systemd-analyze binutils:readelf
    kmod:depmod iproute2:ip iperf3:iperf3 tcpdump:tcpdump iputils-ping:ping
    wireguard-tools:wg tinc:tincd procps:pgrep util-linux:unshare
    coreutils:timeout socat:socat python3:python3 prometheus:promtool
)

say() { printf '%s\n' "$*" >&2; }
die() { printf 'testnet: %s\n' "$*" >&2; exit 2; }

# The packaged kernel version recorded by setup (e.g. 6.1.0-56-amd64).
cached_kernel_version() {
    [[ -r $CACHE_DIR/current ]] && cat "$CACHE_DIR/current"
}

# Identifies what an initramfs is built from (init script, module list,
# busybox). Part of its file name, so checkouts with different versions of
# testnet/ share the cache without rebuilding each other's initramfs.
initrd_stamp() {
    { cat "$TESTNET_DIR/lib/guest-init"; printf '%s\n' "${GUEST_MODULES[@]}" -- "${GUEST_LOADABLE[@]}"; md5sum /bin/busybox; } \
        | md5sum | cut -c1-12
}
initrd_path() { echo "$CACHE_DIR/initrd-$1-$(initrd_stamp).gz"; }

kernel_ready() {
    local v
    v=$(cached_kernel_version) || return 1
    [[ -n $v && -r $CACHE_DIR/kernel/$v/boot/vmlinuz-$v && -r $(initrd_path "$v") ]]
}

# Tries a transport-mode rfc4106(gcm(aes)) SA in a throwaway namespace that
# disappears with the unshare'd shell. Succeeds only on a kernel with a real
# ESP datapath.
esp_probe() {
    unshare --net sh -c '
        ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 \
            reqid 1 mode transport \
            aead "rfc4106(gcm(aes))" 0x0102030405060708090a0b0c0d0e0f1011121314 128
    ' >/dev/null 2>&1
}

# vm_boot RUN_DIR TIMEOUT_S GUEST_SCRIPT
# Boots the cached Debian kernel under qemu TCG with this machine's root and
# the repository shared read-only and RUN_DIR shared writable, each at the
# path it has here, runs GUEST_SCRIPT
# (a path visible in the guest) with bash inside the chroot and powers off.
# The guest writes its exit status to RUN_DIR/vm/status; the console goes to
# RUN_DIR/vm/console.log. Returns the guest script's status, or 124 on timeout,
# or 125 if the guest never reported one.
vm_boot() {
    local run_dir=$1 timeout_s=$2 script=$3 v
    v=$(cached_kernel_version) || die "no cached kernel; run testnet/setup"
    kernel_ready || die "kernel cache incomplete in $CACHE_DIR; run testnet/setup"
    mkdir -p "$run_dir/vm"
    rm -f "$run_dir/vm/status"
    # The guest init reads where to mount the share and what to run from here.
    printf 'MS_RUN_DIR=%q\nMS_SCRIPT=%q\nMS_REPO_DIR=%q\n' "$run_dir" "$script" "$REPO_DIR" >"$run_dir/vm/boot.env"
    local mem=${MESHSEC_TESTNET_VM_MEM:-2048} smp=${MESHSEC_TESTNET_VM_CPUS:-2}
    local rc=0 attempt waited
    # The guest's init prints "guest: ..." within seconds of starting. Rarely
    # (seen twice in this project's runs, both while another VM ran) an emulated boot hangs
    # before that, silently; such a boot is killed and tried once more
    # instead of using up the whole timeout and failing every scenario.
    local boot_wait=${MESHSEC_TESTNET_BOOT_WAIT:-150}
    for attempt in 1 2; do
        rc=0
        timeout --kill-after=10 "$timeout_s" \
            qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp "$smp" -m "$mem" \
            -kernel "$CACHE_DIR/kernel/$v/boot/vmlinuz-$v" \
            -initrd "$(initrd_path "$v")" \
            -append "console=ttyS0 panic=-1 quiet loglevel=3" \
            -nographic -no-reboot -nic none -monitor none -serial stdio \
            -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
            -virtfs "local,path=$REPO_DIR,mount_tag=repo,security_model=none,readonly=on,multidevs=remap" \
            -virtfs "local,path=$run_dir,mount_tag=results,security_model=none,multidevs=remap" \
            </dev/null >"$run_dir/vm/console.log" 2>&1 &
        VM_QEMU_PID=$!
        waited=0
        while kill -0 "$VM_QEMU_PID" 2>/dev/null && ! grep -q 'guest: ' "$run_dir/vm/console.log" 2>/dev/null; do
            ((waited >= boot_wait)) && break
            sleep 1
            waited=$((waited + 1))
        done
        if ((attempt == 1)) && kill -0 "$VM_QEMU_PID" 2>/dev/null && ! grep -q 'guest: ' "$run_dir/vm/console.log"; then
            echo "VM: no sign of the guest after ${boot_wait}s (boot hung); booting once more" >&2
            mv "$run_dir/vm/console.log" "$run_dir/vm/console-hung-boot.log"
            local hung=$VM_QEMU_PID
            vm_kill
            wait "$hung" 2>/dev/null || true
            continue
        fi
        wait "$VM_QEMU_PID" || rc=$?
        break
    done
    VM_QEMU_PID=
    if [[ $rc == 124 || $rc == 137 ]]; then
        return 124
    fi
    [[ -r $run_dir/vm/status ]] || return 125
    return "$(cat "$run_dir/vm/status")"
}

# Kills a VM that vm_boot started, if the caller is interrupted.
vm_kill() {
    if [[ -n ${VM_QEMU_PID:-} ]]; then
        kill -TERM "$VM_QEMU_PID" 2>/dev/null || true
        sleep 0.5
        # timeout(1) forwards TERM to qemu; be sure nothing survives.
        pkill -KILL -P "$VM_QEMU_PID" 2>/dev/null || true
        kill -KILL "$VM_QEMU_PID" 2>/dev/null || true
        VM_QEMU_PID=
    fi
}
