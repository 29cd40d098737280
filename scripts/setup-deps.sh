#!/usr/bin/env bash
# Install what `make test` / `make run` need, idempotently and quietly.
#
# As root: the Debian packages for the real upstreams and real clients (apt-get update only when something
# is missing), and the `vmail` system user that owns test mailboxes. As another user: report what is
# missing and carry on. Then the project venv: created when absent, and `pip install -e '.[test]'` only
# when pyproject.toml is newer than the stamp, so a second run costs well under a second.
#
# Never install `cyrus-imapd` here: it conflicts with `dovecot-imapd` (both provide imap-server) and apt
# silently removes whichever came first. Cyrus's imapd is unpacked privately instead (below).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(
    python3-venv
    dovecot-core dovecot-imapd dovecot-pop3d
    fetchmail mpop getmail6 curl fdm
    systemd
    cyrus-common cyrus-caldav sasl2-bin libsasl2-modules
)

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]})); then
    if [[ $EUID -eq 0 ]]; then
        echo "setup-deps: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt_log=$(mktemp)
        if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
            >"$apt_log" 2>&1; then
            cat "$apt_log" >&2
            rm -f "$apt_log"
            echo "setup-deps: apt-get failed" >&2
            exit 1
        fi
        rm -f "$apt_log"
    else
        echo "setup-deps: not root; missing Debian packages: ${missing[*]}" >&2
        echo "setup-deps: the real-server tests will fail until they are installed" >&2
    fi
fi

# Mail cannot be stored as root: the test Dovecot runs mail processes as this user.
if ! getent passwd vmail >/dev/null; then
    if [[ $EUID -eq 0 ]]; then
        useradd --system --user-group --no-create-home --shell /usr/sbin/nologin vmail
    else
        echo "setup-deps: not root; system user 'vmail' is missing" >&2
    fi
fi

# Cyrus's imapd (the test Cyrus creates mailboxes over IMAP), unpacked privately: the cyrus-imapd package
# must never be installed (see above). Same version as cyrus-common; redone only when that changes.
# tests/realservers/cyrus.py runs it from here ($POP3GW_CYRUS_IMAPD overrides the path).
cyrus_dir=/opt/pop3-gateway/cyrus-imapd
cyrus_version=$(dpkg-query -W -f='${Version}' cyrus-common 2>/dev/null || true)
if [[ -n "$cyrus_version" && "$(cat "$cyrus_dir/.version" 2>/dev/null || true)" != "$cyrus_version" ]]; then
    if [[ $EUID -eq 0 ]]; then
        deb_dir=$(mktemp -d)
        download() { (cd "$deb_dir" && apt-get download -q "cyrus-imapd=$cyrus_version") >"$deb_dir/log" 2>&1; }
        if ! download && ! { apt-get update -q >/dev/null 2>&1 && download; }; then
            cat "$deb_dir/log" >&2
            rm -rf "$deb_dir"
            echo "setup-deps: apt-get download cyrus-imapd=$cyrus_version failed" >&2
            exit 1
        fi
        rm -rf "$cyrus_dir"
        mkdir -p "$cyrus_dir"
        dpkg-deb -x "$deb_dir"/cyrus-imapd_*.deb "$cyrus_dir"
        echo "$cyrus_version" >"$cyrus_dir/.version"
        rm -rf "$deb_dir"
    else
        echo "setup-deps: not root; Cyrus imapd is not unpacked in $cyrus_dir" >&2
    fi
fi

# panva's oidc-provider, the tests' OAuth2 authorization server (tests/realservers/oidc.py runs it under
# node from here; $POP3GW_OIDC_PROVIDER_DIR overrides). Pinned; redone only when the pin changes. The npm
# registry is its only download.
oidc_dir=/opt/pop3-gateway/oidc-provider
oidc_version=9.13.3
if [[ "$(cat "$oidc_dir/.version" 2>/dev/null || true)" != "$oidc_version" ]]; then
    if ! command -v npm >/dev/null; then
        echo "setup-deps: npm is missing; the OAuth2 tests need node 20+ and npm" >&2
    elif [[ $EUID -eq 0 || -w "$(dirname "$oidc_dir")" ]]; then
        mkdir -p "$oidc_dir"
        npm_log=$(mktemp)
        if ! (cd "$oidc_dir" && rm -rf node_modules package.json package-lock.json &&
            npm install --no-audit --no-fund --save-exact --omit=dev --loglevel=error \
                "oidc-provider@$oidc_version") >"$npm_log" 2>&1; then
            cat "$npm_log" >&2
            rm -f "$npm_log"
            echo "setup-deps: npm install oidc-provider@$oidc_version failed" >&2
            exit 1
        fi
        rm -f "$npm_log"
        echo "$oidc_version" >"$oidc_dir/.version"
    else
        echo "setup-deps: not root; oidc-provider is not installed in $oidc_dir" >&2
    fi
fi

stamp=.venv/.setup-deps.stamp
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
    rm -f "$stamp"
fi
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    pip_log=$(mktemp)
    if ! .venv/bin/python -m pip install --disable-pip-version-check -q -e '.[test]' >"$pip_log" 2>&1; then
        cat "$pip_log" >&2
        rm -f "$pip_log"
        echo "setup-deps: pip install failed" >&2
        exit 1
    fi
    rm -f "$pip_log"
    touch "$stamp"
fi
