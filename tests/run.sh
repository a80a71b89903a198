#!/usr/bin/env bash
# Runs every test program given, adds up their counts, and ends with one line
# "N passed, N failed, N skipped". Exit status 1 if any check failed or a program crashed.
set -u
cd "$(dirname "$0")/.." || exit 2
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:protect_shadow_gap=0:abort_on_error=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
P=0 F=0 S=0 crashed=0
for t in "$@"; do
  out=$("$t" 2>&1); rc=$?
  line=$(printf '%s\n' "$out" | grep -E '^[a-z_0-9]+: [0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$' | tail -n1)
  if [ -z "$line" ] || { [ $rc -ne 0 ] && ! printf '%s' "$line" | grep -q ', [1-9][0-9]* failed'; }; then
    printf '%s\n' "$out" | tail -n 40
    echo "CRASH $t (exit $rc)"
    crashed=$((crashed + 1))
    continue
  fi
  [ $rc -ne 0 ] && printf '%s\n' "$out" | grep -E '^(FAIL|skip)' | head -n 40
  printf '%s\n' "$out" | grep -E '^skip' | head -n 5
  echo "$line"
  set -- $(printf '%s' "$line" | sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed, ([0-9]+) skipped/\1 \2 \3/')
  P=$((P + $1)) F=$((F + $2)) S=$((S + $3))
done
F=$((F + crashed))
echo "$P passed, $F failed, $S skipped"
[ "$F" -eq 0 ]
