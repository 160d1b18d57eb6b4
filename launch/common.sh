# Sourced by the launch scripts: print each command so that it runs as printed, and run it unless
# the script's --dry-run set dry_run=1.

# Shell-quotes words only where needed ('...' with ' written as '\''), so printed commands run.
shquote() {
  local out=() a q="'"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then
      out+=("$a")
    else
      out+=("$q${a//$q/$q\\$q$q}$q")
    fi
  done
  echo "${out[*]}"
}

# Prints the command (runnable as printed); runs it unless --dry-run.
run() {
  shquote "$@"
  if [[ ${dry_run:-0} -eq 0 ]]; then
    "$@"
  fi
}
