#!/usr/bin/env bash
# Demo: `make -j2` of a real C project (GNU hello, from its Debian source package) is checkpointed and killed
# while it compiles, then restored; the build finishes, and the program it links is byte for byte the one an
# uninterrupted build of the same tree makes.
set -euo pipefail
source "$(dirname "$0")/../common.sh"
need make:make gcc:gcc dpkg-source:dpkg-dev
work="$(mktemp -d /tmp/vos-make.XXXXXX)"
name="make-$$"
export SOURCE_DATE_EPOCH=1700000000 LC_ALL=C

echo "== fetch the source package of GNU hello (deb-src in a sources list of its own; the system's apt is not touched)"
. /etc/os-release
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial"
echo "deb-src http://deb.debian.org/debian ${VERSION_CODENAME:-bookworm} main" > "$work/apt/sources.list"
apt=(apt-get -qq -o Dir::Etc::SourceList="$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists="$work/apt/lists" -o Dir::Cache="$work/apt/cache" -o APT::Sandbox::User=root)
"${apt[@]}" update
(cd "$work" && "${apt[@]}" source hello > /dev/null)
src="$(echo "$work"/hello-*/)"; src="${src%/}"
echo "   $(basename "$src") in $src"
echo "== configure it once; keep a copy of the configured tree"
(cd "$src" && ./configure -q --disable-nls > /dev/null)
cp -a "$src" "$work/configured"
echo "== reference: make -j2 in that tree, uninterrupted; then put the configured tree back in the same place"
(cd "$src" && make -j2 > "$work/ref.log" 2>&1) || { echo "the reference build failed:"; tail "$work/ref.log"; exit 1; }
mv "$src/hello" "$work/hello.ref"
total="$(find "$src" -name '*.o' | wc -l)"
rm -rf "$src"; mv "$work/configured" "$src"
echo "== make -j2 under vrun (job '$name')"
objs() { find "$src" -name '*.o' | wc -l; }
(cd "$src" && exec "$vrun" --quiet --name "$name" --dir "$work" make -j2) > "$work/make.log" 2>&1 &
job=$!
enough() { [ "$(objs)" -ge 6 ]; }
wait_until $job enough || { tail "$work/make.log"; exit 1; }
echo "== checkpoint and kill the whole build mid-way ($(objs) of $total objects so far)"
checkpoint_kill "$name" $job || { tail "$work/make.log"; exit 1; }
[ ! -e "$src/hello" ] || { echo "the build was done before the checkpoint"; exit 1; }
"$vrun" inspect "$img" | sed -n '/^tree/,/^shared/p' | sed 's/^ */   /'
echo "== restore it (make goes on in the foreground until done)"
rc=0; "$vrun" restore --quiet "$img" > /dev/null || rc=$?
[ $rc = 0 ] || { echo "the restored make exited $rc:"; tail "$work/make.log"; exit 1; }
echo "== check: the linked program is identical to the uninterrupted build's, and it runs"
cmp "$work/hello.ref" "$src/hello" || { echo "the binaries differ"; exit 1; }
out="$("$src/hello")"
[ "$out" = "Hello, world!" ] || { echo "hello printed: $out"; exit 1; }
echo "   $src/hello: $(stat -c %s "$src/hello") bytes, same as the reference; it says: $out"
rm -rf "$work"
echo "== ok: the restored make -j2 finished the build, byte-identical to an uninterrupted one"
