# Sourced by way_in_probes.sh and way_out_probes.sh: clears the uprobes, then
# defines `probe KIND NAME REGEX` on the binary BIN (argument 1; default the
# loadbench example) and `probes_done`. Needs root.
set -e
BIN=$(realpath "${1:-target/release/examples/loadbench}")
T=/sys/kernel/tracing
echo > $T/uprobe_events
# Offsets are file offsets: the symbol's address minus its segment's (vaddr - offset).
read -r OFF VADDR < <(readelf -lW "$BIN" | awk '$1=="LOAD" && $8=="E" {print $2, $3; exit}')
SHIFT=$((VADDR - OFF))
SYMS=$(mktemp)
nm -C "$BIN" | grep -E ' [tT] ' > "$SYMS"
probe() { # kind name regex: the first (at most 3) functions matching
  local i=0 a
  for a in $(grep -E "$3" "$SYMS" | awk '{print $1}' | head -3); do
    printf '%s:sb/%s%s %s:0x%x\n' "$1" "$2" "${i/#0/}" "$BIN" $((0x$a - SHIFT)) >> $T/uprobe_events
    i=$((i + 1))
  done
}
probes_done() {
  rm "$SYMS"
  echo "$(wc -l < $T/uprobe_events) probes on $BIN"
}
