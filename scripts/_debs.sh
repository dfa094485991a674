# Sourced by scripts/test: the Debian packages of scripts/debian-packages that are missing here.
# Run as root it installs them; as another user it prints the apt-get line, and the tests that need
# them skip with that line as their reason (under CI=true they fail instead).
debs_missing=()
while read -r probe package _; do
    case "$probe" in ""|\#*) continue ;; esac
    if [[ "$probe" == /* ]]; then
        compgen -G "$probe" >/dev/null && continue
    else
        command -v "$probe" >/dev/null && continue
    fi
    [[ " ${debs_missing[*]} " == *" $package "* ]] || debs_missing+=("$package")
done < scripts/debian-packages
if [ ${#debs_missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "scripts/test: installing the Debian packages the tests use: ${debs_missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${debs_missing[@]}" >/dev/null
    else
        echo "scripts/test: not root, so the tests that need these Debian packages will skip:" >&2
        echo "  apt-get install -y ${debs_missing[*]}    (as root)" >&2
    fi
fi
unset debs_missing
