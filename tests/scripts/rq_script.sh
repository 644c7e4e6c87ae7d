#!/bin/bash
# An RQ-style queue script (after RQ's test/test_script.sh): behaviour chosen by RQ_PARAM1.
echo "script $0 msg $RQ_MSG_ID count $RQ_COUNT param1 $RQ_PARAM1"
echo "run starting" >&$RQ_WRITE
case "$RQ_PARAM1" in
  done|"") echo "done done sleeping" >&3 ;;
  err) echo "err by design" >&3 ;;
  fails) echo "fails alias of err" >&3 ;;
  relayed) echo "relayed http://elsewhere:3333/q/x/20240101.0000.00.000.1" >&3 ;;
  sneaky) echo "done sneaky" >&3; exit 1 ;;
  slowfirst)
    echo $$ > "$RQ_PARAM2"
    if [ "$RQ_COUNT" = 0 ]; then sleep 300; fi
    echo "done second run" >&3 ;;
  slow) sleep "${RQ_PARAM2:-30}"; echo "done slept" >&3 ;;
  resend1) if [ "$RQ_COUNT" = 0 ]; then echo "resend 1-first try" >&3; else echo "done resent $RQ_COUNT" >&3; fi ;;
  resend2) if [ "$RQ_COUNT" -lt 6 ]; then echo "resend 0-again" >&3; else echo "done count $RQ_COUNT" >&3; fi ;;
  always_resend) echo "resend 0-forever" >&3 ;;
  exit) echo "run exiting with $RQ_PARAM2" >&3; exit "$RQ_PARAM2" ;;
  noverb) exit 0 ;;
  dup)
    echo "dup 0-X-$RQ_PARAM2" >&3
    read -r reply <&$RQ_READ
    echo "$reply" > "$RQ_PARAM3"
    echo "done dup sent" >&3 ;;
  symlink) echo "done $0" >&3 ;;
  env)
    if [ "$RQTESTENV1" = OWEN ] && [ "$RQTESTENV2" = 32 ]; then echo "done env ok" >&3
    else echo "err env missing" >&3; fi ;;
  rqenv) env | grep -E '^(RQ_|SPOOLQ_)' | sort > rqenv.txt; echo "done env dumped" >&3 ;;
  split) printf 'run par' >&3; sleep 0.2; printf 'tial line\n' >&3; sleep 0.2; echo "done split ok" >&3 ;;
  longline) head -c 200000 /dev/zero | tr '\0' 'x' >&3; echo >&3; printf '\x00\x01garbage\xff\n' >&3; echo "done survived" >&3 ;;
  grandchild)
    # A grandchild that would outlive the script: a timeout must kill it too.
    sleep 300 &
    echo $! > "$RQ_PARAM2"
    sleep 300 ;;
  blocking)
    while [ ! -e "$RQ_PARAM3" ]; do sleep 0.05; done
    echo "done unblocked" >&3 ;;
  *) echo "err unknown param1 $RQ_PARAM1" >&3 ;;
esac
exit 0
