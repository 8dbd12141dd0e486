"""A stand-in worker for launcher tests (tests/test_signals.py): says it is up, then sleeps until signalled."""
import os
import sys
import time

if __name__ == "__main__":
    print(f"[NEXUS_FAULT_INJECT] worker rank {os.environ.get('RANK')} pid {os.getpid()} up", flush=True)
    sys.stdout.flush()
    while True:
        time.sleep(3600)
