#!/usr/bin/env bash
# Rewrite this machine's paths out of benchmark logs and JSON (nothing machine-specific is
# committed): the checkout -> repo-relative, site-packages -> <site-packages>, temp folders ->
# <tmp>, the home folder -> ~.   bench/scrub_paths.sh FILE...
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" 2>/dev/null || echo /nonexistent)
sed -i -E -e "s|$repo/||g" -e "s|$site/|<site-packages>/|g" -e "s|/opt/[A-Za-z0-9._/-]*site-packages/|<site-packages>/|g" \
  -e "s|/tmp/[A-Za-z0-9._-]+|<tmp>|g" -e "s|$HOME/|~/|g" "$@"
