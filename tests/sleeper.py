"""A stand-in worker for launcher tests (tests/test_signals.py): says it is up, then sleeps until signalled."""
import os
import sys
import time

if __name__ == "__main__":
    # one write, newline included, so two workers on one pipe do not run their lines together
    sys.stdout.write(f"[NEXUS_FAULT_INJECT] worker rank {os.environ.get('RANK')} pid {os.getpid()} up\n")
    sys.stdout.flush()
    while True:
        time.sleep(3600)
