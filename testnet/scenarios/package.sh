#!/usr/bin/env bash
# needs: none
# timeout: 300
# The Debian package: packaging/build-deb builds meshsec_<version>_amd64.deb,
# lintian reports no error, dpkg installs it into a fresh root (never this
# host's), the files are there (stripped binary, unit, conffile, a man page
# per subcommand, completions), meshsec --version runs, man -l renders, the
# bash completion completes, systemd-analyze verify passes and the security
# score is the one docs/packaging.md quotes; installing creates no secret and
# no state, removing keeps the state, purging removes it.
. "$(dirname "$0")/../lib/bed.sh"

REPO=$BED_REPO
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/Cargo.toml" | head -n1)
log "building the package (version $version)"
deb=$("$REPO/packaging/build-deb" 2>"$WORK/build-deb.log" | tail -n1) \
    || { tail -n 20 "$WORK/build-deb.log"; fail "packaging/build-deb failed"; }
assert_eq "$(basename "$deb")" "meshsec_${version}_amd64.deb" "package file name"
assert test -s "$deb"

log "lintian"
lintian --fail-on error "$deb" >"$WORK/lintian.txt" 2>&1 || true
grep -v '^running with root privileges' "$WORK/lintian.txt" | sed 's/^/  lintian: /' || true
refute grep -q '^E:' "$WORK/lintian.txt"
lintian --fail-on error "$deb" >/dev/null 2>&1 || fail "lintian failed"

# A fresh root: dpkg's database and a static busybox for the maintainer
# scripts, nothing else. libc6 is not in it (the host's is used to run the
# binary), hence --force-depends. Run in a private network namespace so
# nothing a maintainer script does can reach this host's XFRM tables.
R=$WORK/root
mkdir -p "$R"/{bin,dev} "$R"/var/lib/dpkg/{info,updates,triggers}
touch "$R"/var/lib/dpkg/{status,available}
mknod -m 666 "$R/dev/null" c 1 3
cp /bin/busybox "$R/bin/busybox"
chroot "$R" /bin/busybox --install -s /bin
rdpkg() { unshare --net dpkg --root="$R" --log=/dev/null --force-depends "$@"; }

log "installing into $R"
rdpkg -i "$deb" >"$WORK/install.txt" 2>&1 || { cat "$WORK/install.txt"; fail "dpkg -i failed"; }
assert_eq "$(dpkg --root="$R" -s meshsec | sed -n 's/^Status: //p')" "install ok installed" "dpkg status"
hint=$(grep '^meshsec: ' "$WORK/install.txt" || true)
log "postinst said: $hint"
assert_eq "$(grep -c '^meshsec: ' "$WORK/install.txt")" 1 "lines the postinst prints"
assert grep -q "meshsec init" <<<"$hint"

log "files"
for f in usr/bin/meshsec usr/lib/systemd/system/meshsec.service etc/meshsec/meshsec.toml \
    usr/share/man/man8/meshsec.8.gz usr/share/bash-completion/completions/meshsec \
    usr/share/zsh/vendor-completions/_meshsec usr/share/fish/vendor_completions.d/meshsec.fish \
    usr/share/doc/meshsec/copyright usr/share/doc/meshsec/changelog.gz; do
    assert test -s "$R/$f"
done
assert test -x "$R/usr/bin/meshsec"
refute grep -q debug_info <(readelf -S "$R/usr/bin/meshsec")
assert grep -qx /etc/meshsec/meshsec.toml "$R/var/lib/dpkg/info/meshsec.conffiles"
# Installing creates no secret and no state (nothing started).
refute test -e "$R/etc/meshsec/cluster.secret"
refute test -e "$R/var/lib/meshsec"
# One man page per subcommand (from the binary's own --help).
subs=$("$R/usr/bin/meshsec" --help | sed -n '/^Commands:/,/^$/p' | awk 'NR > 1 && NF {print $1}' | grep -v '^help$')
assert_cmp "$(wc -w <<<"$subs")" -ge 9 "subcommands in --help"
for s in $subs; do
    assert test -s "$R/usr/share/man/man8/meshsec-$s.8.gz"
done

log "meshsec --version: $("$R/usr/bin/meshsec" --version)"
assert_eq "$("$R/usr/bin/meshsec" --version)" "meshsec $version"

log "man -l"
page() { MANWIDTH=80 man -P cat -l "$R/usr/share/man/man8/$1.8.gz" 2>&1 | sed 's/.\x08//g'; }
page meshsec >"$WORK/meshsec.8.txt"
assert grep -q '^NAME' "$WORK/meshsec.8.txt"
assert grep -q 'meshsec-agent(8)' "$WORK/meshsec.8.txt"
page meshsec-agent >"$WORK/meshsec-agent.8.txt"
assert grep -q -- '--seed <HOST:PORT>' "$WORK/meshsec-agent.8.txt"
assert grep -q "meshsec $version" "$WORK/meshsec-agent.8.txt"

log "bash completion"
comp=$(bash --norc -c '
    source "$1" || exit 1
    complete -p meshsec
    COMP_WORDS=(meshsec me) COMP_CWORD=1 COMP_LINE="meshsec me" COMP_POINT=10
    _meshsec meshsec me meshsec
    echo "words: ${COMPREPLY[*]}"
    COMP_WORDS=(meshsec agent --se) COMP_CWORD=2 COMP_LINE="meshsec agent --se" COMP_POINT=18
    _meshsec meshsec --se agent
    echo "flags: ${COMPREPLY[*]}"
' _ "$R/usr/share/bash-completion/completions/meshsec")
log "$comp"
assert grep -q '^complete .* meshsec$' <<<"$comp"
assert grep -q '^words: members$' <<<"$comp"
assert grep -q '^flags: .*--seed' <<<"$comp"
assert grep -q '^#compdef meshsec' "$R/usr/share/zsh/vendor-completions/_meshsec"
assert grep -q '^complete -c meshsec' "$R/usr/share/fish/vendor_completions.d/meshsec.fish"

log "systemd-analyze verify"
# verify resolves the unit's dependencies (sysinit.target, …), its commands
# (/bin/kill is busybox's) and its Documentation= man pages inside the root.
mkdir -p "$R/lib/systemd"
cp -a /lib/systemd/system "$R/lib/systemd/"
MANPATH=$R/usr/share/man systemd-analyze verify --root="$R" /usr/lib/systemd/system/meshsec.service \
    >"$WORK/verify.txt" 2>&1 || { cat "$WORK/verify.txt"; fail "systemd-analyze verify failed"; }
refute test -s "$WORK/verify.txt"
systemd-analyze security --offline=true "$R/usr/lib/systemd/system/meshsec.service" >"$WORK/security.txt" 2>&1 || true
score=$(sed -n 's/.*Overall exposure level for meshsec.service: \([0-9.]*\).*/\1/p' "$WORK/security.txt")
log "systemd-analyze security: exposure $score"
[[ -n $score ]] || { cat "$WORK/security.txt"; fail "no exposure score"; }
assert grep -q "exposure level.*\\b$score\\b" "$REPO/docs/packaging.md"
rm -rf "$R/lib/systemd"

log "remove keeps the state, purge removes it"
mkdir -p "$R/var/lib/meshsec"
echo key >"$R/var/lib/meshsec/node.key"
echo secret >"$R/etc/meshsec/cluster.secret"
rdpkg -r meshsec >"$WORK/remove.txt" 2>&1 || { cat "$WORK/remove.txt"; fail "dpkg -r failed"; }
refute test -e "$R/usr/bin/meshsec"
assert test -e "$R/var/lib/meshsec/node.key"
assert test -e "$R/etc/meshsec/meshsec.toml"
rdpkg -P meshsec >"$WORK/purge.txt" 2>&1 || { cat "$WORK/purge.txt"; fail "dpkg -P failed"; }
refute test -e "$R/var/lib/meshsec"
refute test -e "$R/etc/meshsec/meshsec.toml"
# The operator's secret is not the package's: purge leaves it.
assert test -e "$R/etc/meshsec/cluster.secret"
left=$(cd "$R" && find . -path ./var/lib/dpkg -prune -o -path ./bin -prune -o -path ./dev -prune \
    -o -type f -print | grep -v '^./etc/meshsec/cluster.secret$' || true)
assert_eq "$left" "" "files left after purge"
log "package ok"
