#!/usr/bin/env bash
# Stages the build context of one image: a root filesystem holding the stripped binary, the
# shared libraries it links (with the dynamic loader), Debian's CA bundle and passwd/group
# entries for the non-root user, so the Dockerfile's final stage can be FROM scratch and
# nothing has to be pulled. Usage: hack/stage-image.sh BINARY CONTEXT_DIR
set -euo pipefail

binary=$1
context=$2
name=$(basename "$binary")

[ -x "$binary" ] || { echo "stage-image: $binary is not an executable (build it first)" >&2; exit 1; }
ca_bundle=/etc/ssl/certs/ca-certificates.crt
[ -s "$ca_bundle" ] || { echo "stage-image: $ca_bundle is missing (Debian package ca-certificates)" >&2; exit 1; }

rm -rf "$context"
# The Dockerfiles copy each of these top-level directories to its own destination (not the
# whole tree onto /), so a base whose /lib is a symlink (merged /usr) keeps its symlink;
# all four exist even when one stays empty, as COPY of a missing source fails.
mkdir -p "$context/usr/local/bin" "$context/lib" "$context/lib64" "$context/etc/ssl/certs"

# Debug line tables are kept in target/release for backtraces on the host; the image gets
# the binary without symbols or debug sections.
strip --strip-all -o "$context/usr/local/bin/$name" "$binary"

# `ldd` lines are "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" for libraries and
# "/lib64/ld-linux-x86-64.so.2 (0x...)" for the loader; the vDSO has no file. A library
# that is not found would make the image fail at its first start, so it fails here instead.
ldd_output=$(ldd "$binary")
if grep -q "not found" <<<"$ldd_output"; then
    echo "stage-image: $binary links a library that is not installed:" >&2
    echo "$ldd_output" >&2
    exit 1
fi
libraries=$(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$ldd_output" | sort -u)
[ -n "$libraries" ] || { echo "stage-image: ldd lists no libraries for $binary" >&2; exit 1; }
for library in $libraries; do
    case $library in
        /lib/* | /lib64/* | /usr/*) ;;
        *) echo "stage-image: $library is outside /lib, /lib64 and /usr, where the Dockerfile copies from" >&2; exit 1 ;;
    esac
    mkdir -p "$context$(dirname "$library")"
    # -L: the file itself, not the symlink Debian installs at that path (its target would be missing).
    cp -L "$library" "$context$library"
done

# S3 backups and the Kubernetes API use HTTPS; rustls' native roots are read from here.
cp -L "$ca_bundle" "$context$ca_bundle"
chmod 0644 "$context$ca_bundle"

# USER 65532:65532 works without these; they give the uid a name for ps, podman top and
# tools that look the user up, with a home that exists and a shell that does not.
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' >"$context/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$context/etc/group"

echo "staged $context: $(du -sh "$context" | cut -f1) ($(tr '\n' ' ' <<<"$libraries"))"
