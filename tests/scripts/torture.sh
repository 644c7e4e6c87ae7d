#!/bin/bash
# Torture-test script: logs every start, takes a little time, then ends as RQ_PARAM1 says.
echo "start $RQ_MSG_ID $RQ_COUNT" >> "$RQ_PARAM2"
sleep "0.0$((RANDOM % 4))"
case "$RQ_PARAM1" in
  done) echo "done ok" >&3 ;;
  err) echo "err by design" >&3 ;;
  perm) exit 100 ;;
  temp) if [ "$RQ_COUNT" -lt 2 ]; then exit 111; fi; echo "done after temp" >&3 ;;
  resend) if [ "$RQ_COUNT" -lt 1 ]; then echo "resend 0-again" >&3; exit 0; fi; echo "done after resend" >&3 ;;
  noverb) exit 0 ;;
esac
