#!/usr/bin/env bash
# System tools that some tests use, installed from Debian's packages when missing and when this
# runs as root with apt (as on CI); otherwise those tests skip and say why.
#   docker-compose: tests/test_docker.py validates docker/compose.yaml with it;
#   chromium, postgresql: tests/test_cluster_native.py runs MLflow on PostgreSQL and opens its UI.
set -uo pipefail
missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "not installed: ${missing[*]} (their tests will skip)"
    exit 0
fi
echo "installing ${missing[*]} (Debian packages) for the tests"
{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    >/tmp/nem-study-test-deps.log 2>&1 \
    || echo "could not install ${missing[*]} (see /tmp/nem-study-test-deps.log); their tests will skip"
exit 0
