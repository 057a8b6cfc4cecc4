#!/usr/bin/env bash
# Run a command as on a machine without Node.js, to check that kernelhib's setup needs none.
# In a private mount namespace (the rest of the machine sees nothing of it), every node,
# nodejs, npm, npx, corepack, yarn and yarnpkg on PATH is removed from view (an overlay with
# whiteouts over its directory), and the global node_modules directories are covered by an
# empty tmpfs. Needs root.
#
#   bash scripts/without-node.sh bash scripts/setup.sh --no-test --lab
set -euo pipefail

if [[ "${1:-}" != --in-namespace ]]; then
    (($#)) || { echo "usage: bash scripts/without-node.sh COMMAND [ARG...]" >&2; exit 2; }
    exec unshare --mount --propagation private -- "$BASH" "${BASH_SOURCE[0]}" --in-namespace "$@"
fi
shift

names=(node nodejs npm npx corepack yarn yarnpkg)
for dir in /usr/lib/node_modules /usr/local/lib/node_modules /usr/share/nodejs; do
    [[ -d "$dir" ]] && mount -t tmpfs -o size=1m,mode=0755 kernelhib-no-node "$dir"
done
# Each PATH directory that holds one of them gets an overlay with a whiteout for it: there,
# the name does not exist at all, for `command -v` as for execve.
scratch="$(mktemp -d)"
mount -t tmpfs -o mode=0700 kernelhib-no-node "$scratch"
IFS=: read -ra path_dirs <<<"$PATH"
for dir in "${path_dirs[@]}"; do
    [[ -d "$dir" ]] || continue
    dir="$(readlink -f "$dir")"
    hide=()
    for name in "${names[@]}"; do
        [[ -e "$dir/$name" || -L "$dir/$name" ]] && hide+=("$name")
    done
    ((${#hide[@]})) || continue
    layer="$scratch/$(printf '%s' "$dir" | tr / _)"
    mkdir -p "$layer/upper" "$layer/work"
    for name in "${hide[@]}"; do mknod "$layer/upper/$name" c 0 0; done
    mount -t overlay kernelhib-no-node \
        -o "lowerdir=$dir,upperdir=$layer/upper,workdir=$layer/work" "$dir"
done
umount --lazy "$scratch" # the overlays keep their layers; the empty mount point goes
rmdir "$scratch"
hash -r
for name in "${names[@]}"; do
    if found="$(command -v "$name")"; then
        echo "without-node.sh: could not hide $found" >&2
        exit 1
    fi
done
exec "$@"
